"""The search configuration: YAML in, a validated plain dict out.

Every section is checked before any trial runs; a problem raises
`ConfigError` in the package's one error format, naming the key path, what is
allowed and what was received::

    `search_space.dropout` must be a number >= 0 and < 1. Received: search_space.dropout=1.5

A validated config is a fixed point: `validate(yaml.safe_load(yaml.safe_dump(
cfg))) == cfg`, so it can be stored next to the results and compared on
resume.

Example:

>>> cfg = load_config("tuner_configs/quickstart.yaml")
>>> cfg["tuner"]["kind"], cfg["search_space"]["backbone"]
('random', 'saved_models/digits_cnn.keras')
"""

import copy
import warnings

import yaml

from tftransfer import _checks, _names  # neither imports TensorFlow

# The names `tftransfer.optim` and `build_finetuner` accept, from the module that
# holds them without Keras, so that a config is checked quickly.
OPTIMIZERS = tuple(_names.OPTIMIZERS)
DTYPE_POLICIES = _names.DTYPE_POLICIES
TUNERS = ("random", "bayesian", "hyperband", "grid")
STRATEGIES = ("none", "auto", "mirrored", "multi_worker", "one_device")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
REGULARIZERS = ("none", "l1", "l2", "l1_l2")
SAMPLINGS = ("linear", "log")
RANGE_KEYS = ("min", "max", "sampling", "step")
INT_RANGE_KEYS = ("int_min", "int_max", "step")


class ConfigError(ValueError):
    """A search configuration that cannot run, worded as `_checks.invalid` words
    argument errors: "`key.path` must be <allowed>.[ detail] Received: key.path=<value>".

    Args:
        path: String, the dotted key path (or `--config` for the file itself).
        allowed: String, what the key must be.
        received: The value found.
        detail: Optional sentence before `Received:` (why, or what else to do).
        verb: String, the verb after "must". Defaults to `"be"`.
    """

    def __init__(self, path, allowed, received, detail="", verb="be"):
        self.path = path
        super().__init__(_checks.message(path, allowed, received, detail, verb))


def data_error(data, reason):
    """The ConfigError for a `data` section whose data does not load."""
    reason = " ".join(str(reason).split())
    return ConfigError("data", "data that loads", data, detail=f"Loading it fails: {reason}")


# ------------------------------------------------------------ value checkers


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
    """A checker for a number in a range; returns the value (ints to float)."""
    kind = "an integer" if integer else "a number"
    bounds = []
    if lo is not None:
        bounds.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        bounds.append(f"{'<' if hi_open else '<='} {hi}")
    text = kind + (" " + " and ".join(bounds) if bounds else "")

    def check(path, v):
        ok = _is_int(v) if integer else _is_num(v)
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if not ok:
            raise ConfigError(path, text + _string_number_hint(v), v)
        return v if integer else float(v)

    return check


def _string_number_hint(v):
    """For `1e-3`, which YAML 1.1 reads as a string (no dot before the `e`):
    how to write the number."""
    if not isinstance(v, str) or "e" not in v.lower():
        return ""
    try:
        number = float(v)
    except ValueError:
        return ""
    mantissa, _, exponent = v.lower().partition("e")
    return (f" (YAML reads {v!r} as a string, not a number: write "
            f"{float(mantissa)}e{exponent} or {number!r})")


def _one_of(names):
    text = "one of " + ", ".join(repr(n) for n in names)

    def check(path, v):
        if v not in names:
            raise ConfigError(path, text, v)
        return v

    return check


def _string(path, v):
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(path, "a non-empty string", v)
    return v



def _optional_string(path, v):
    return None if v is None else _string(path, v)


def _freeze_policy(path, v):
    text = "'none', 'all', 'top:N' (N >= 0) or 'fraction:F' (0 <= F <= 1)"
    if isinstance(v, str):
        kind, _, arg = v.partition(":")
        try:
            if v in ("none", "all") or (kind == "top" and int(arg) >= 0) or (
                    kind == "fraction" and 0 <= float(arg) <= 1):
                return v
        except ValueError:
            pass
    raise ConfigError(path, text, v)



def _units(path, v):
    if not isinstance(v, list) or not all(_is_int(u) and u > 0 for u in v):
        raise ConfigError(path, "a list of positive integers (may be empty)", v)
    return list(v)



def _jit_compile(path, v):
    if v is True or v is False or v == "auto":
        return v
    raise ConfigError(path, "true, false or 'auto'", v)


def _decay(path, v):
    if v is None or v == "auto":
        return v
    if isinstance(v, str):
        raise ConfigError(path, "a number > 0 and <= 1, 'auto' or null", v)
    return _num(0, 1, lo_open=True)(path, v)


def _ema(path, v):
    if v is None or v == "auto":
        return v
    if isinstance(v, str):
        raise ConfigError(path, "a number >= 0 (epochs), 'auto' or null", v)
    return _num(0)(path, v)


# knob -> (checker, default, allowed forms: fixed/choice/range/int_range)
KNOBS = {
    "backbone": (_string, None, "fc"),
    "preprocessor": (_optional_string, None, "f"),  # BERT-style text encoders only
    "unfreeze": (_freeze_policy, "all", "fcri"),  # what stage 2 trains of the backbone
    "optimizer": (_one_of(OPTIMIZERS), "adam", "fc"),
    "learning_rate": (_num(0, lo_open=True), 1e-3, "fcr"),
    "schedule": (_one_of(SCHEDULES), "constant", "fc"),
    "regularizer_kind": (_one_of(REGULARIZERS), "none", "fc"),
    "regularizer_strength": (_num(0, lo_open=True), 1e-4, "fcr"),
    "dropout": (_num(0, 1, hi_open=True), 0.0, "fcr"),
    "hidden_units": (_units, [], "fc"),
    "label_smoothing": (_num(0, 1, hi_open=True), 0.0, "fcr"),
    "batch_size": (_num(1, integer=True), 32, "fci"),
    "head_epochs": (_num(0, integer=True), 5, "fci"),
    "fine_tune_epochs": (_num(0, integer=True), 3, "fci"),
    "layerwise_lr_decay": (_decay, "auto", "fcr"),
    "lr_factor": (_num(0, 1, lo_open=True), 0.03, "fcr"),
    "fine_tune_warmup": (_num(0), 2.0, "fcr"),
    "fine_tune_ema": (_ema, "auto", "fcr"),
}

# ------------------------------------------------------------------ sections


def _objective(path, v):
    """A metric name or {name, direction} -> {"name", "direction"} (`search.control`)."""
    from tftransfer.search import control

    try:
        return control.parse_objective(v)
    except ValueError as e:
        raise ConfigError(path, str(e), v) from None


def _no_unknown(path, raw, allowed):
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{path}.{key}" if path else str(key),
                              "one of the keys " + ", ".join(allowed), key)


def _section(path, raw, spec):
    """Checks a mapping against `spec` {key: (checker, default)}."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(path, "a mapping", raw)
    _no_unknown(path, raw, spec)
    out = {}
    for key, (check, default) in spec.items():
        sub = f"{path}.{key}" if path else key
        value = raw.get(key, copy.deepcopy(default))
        out[key] = check(sub, value) if check and (value is not None or key in raw) else value
    return out


def _optional(check):
    def wrapped(path, v):
        return None if v is None else check(path, v)
    return wrapped


def _source(path, v):
    if not isinstance(v, str) or not v.strip() or v == "tfds:":
        raise ConfigError(path, "'digits', 'tfds:<name>' or a folder path", v)
    return v


def _image_size(path, v):
    if _is_int(v):
        v = [v, v]
    if not (isinstance(v, list) and len(v) == 2 and all(_is_int(s) and s >= 8 for s in v)):
        raise ConfigError(path, "an integer >= 8 or a list [height, width]", v)
    return list(v)


# The names of tftransfer.export.formats.FORMATS (not imported: config checks run before
# TensorFlow loads; tests/test_tflite.py checks the two lists are equal).
EXPORT_FORMATS = ("serving", "tflite", "tflite-none", "tflite-dynamic", "tflite-float16",
                  "tflite-int8", "onnx")


def _export_formats(path, v):
    if isinstance(v, str):
        v = [v]
    if not (isinstance(v, list) and v and all(f in EXPORT_FORMATS for f in v)
            and len(set(v)) == len(v)):
        raise ConfigError(path, f"a non-empty list of distinct names from {list(EXPORT_FORMATS)}",
                          v)
    return list(v)


def _classes(path, v):
    if not (isinstance(v, list) and len(v) >= 2 and all(_is_int(c) and 0 <= c <= 9 for c in v)
            and len(set(v)) == len(v)):
        raise ConfigError(path, "a list of at least 2 distinct digits 0..9 (a classifier "
                          "needs 2 classes)", v)
    return list(v)


DATA = {
    "source": (_source, "digits"),
    "kind": (_one_of(("images", "text")), "images"),  # text: source/<class>/*.txt
    "classes": (_optional(_classes), None),
    "image_size": (_optional(_image_size), None),
    "channels": (_one_of((1, 3)), 3),
    "validation_split": (_num(0, 1, lo_open=True, hi_open=True), 0.2),
    "per_class": (_optional(_num(1, integer=True)), None),
    "seed": (_num(integer=True), 0),
}

TUNER = {
    "kind": (_one_of(TUNERS), "random"),
    "max_trials": (_num(1, integer=True), 10),
    "objective": (_objective, "val_accuracy"),
    "executions_per_trial": (_num(1, integer=True), 1),
    "seed": (_num(integer=True), 0),
    "max_consecutive_failed_trials": (_num(1, integer=True), 3),
    "max_epochs": (_num(1, integer=True), 10),
    "factor": (_num(2, integer=True), 3),
}

RUN = {
    "directory": (_string, "searches/search"),
    "export_dir": (_optional(_string), None),
    "export_formats": (_export_formats, ["serving"]),
    "strategy": (_one_of(STRATEGIES), "none"),
    "isolate_trials": (_one_of((False, True)), True),
    "worker_max_trials": (_num(1, integer=True), 10),
    "worker_max_rss_growth_mb": (_optional(_num(0, lo_open=True)), 1024.0),
    "dtype_policy": (_one_of(DTYPE_POLICIES), "float32"),
    "jit_compile": (_jit_compile, "auto"),
    "max_time": (_optional(_num(0, lo_open=True)), None),
    "stop_after": (_optional(_num(1, integer=True)), None),
}


def _data(raw):
    data = _section("data", raw, DATA)
    digits = data["source"] == "digits"
    for key in ("classes", "per_class"):
        if data[key] is not None and not digits:
            raise ConfigError(f"data.{key}", "unset unless data.source is 'digits'",
                              data[key], detail=f"Here data.source is {data['source']!r}.")
    if digits:
        data["classes"] = data["classes"] or [5, 6, 7, 8, 9]
    data["image_size"] = data["image_size"] or ([32, 32] if digits else [224, 224])
    return data


# -------------------------------------------------------------------- knobs


def _knob(name, raw):
    """Validates one search-space knob; returns its normalized form."""
    check, _, forms = KNOBS[name]
    path = f"search_space.{name}"
    if name == "backbone" and isinstance(raw, list):
        raw = {"choice": raw}  # A list of backbones is a choice.
    if isinstance(raw, dict):
        if "choice" in raw:
            return _choice(path, raw, check, forms)
        if "min" in raw or "max" in raw:
            return _range(path, raw, check, forms)
        if "int_min" in raw or "int_max" in raw:
            return _int_range(path, raw, forms)
        raise ConfigError(path, _forms(forms), raw)
    if "f" not in forms:
        raise ConfigError(path, _forms(forms), raw)
    return check(path, raw)


_FORMS = {"f": "a value", "c": "{choice: [...]}", "r": "{min, max, sampling, step}",
          "i": "{int_min, int_max, step}"}


def _forms(forms):
    """What a knob may be written as, from its forms ("fcr" -> "a value, {choice...} or ...")."""
    texts = [_FORMS[f] for f in forms]
    return texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " or " + texts[-1]


def _choice(path, raw, check, forms):
    _no_unknown(path, raw, ("choice",))
    values = raw["choice"]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{path}.choice", "a non-empty list", values)
    out = [check(f"{path}.choice[{i}]", v) for i, v in enumerate(values)]
    if None in out:
        raise ConfigError(f"{path}.choice", "a list without null entries (fix the value instead)",
                          values)
    if len({repr(v) for v in out}) != len(out):
        raise ConfigError(f"{path}.choice", "a list of distinct values", values)
    return {"choice": out}


def _range(path, raw, check, forms):
    if "r" not in forms:
        raise ConfigError(path, _forms(forms), raw, detail="This knob takes no {min, max} range.")
    _keys(path, raw, RANGE_KEYS, ("min", "max"))
    if path.endswith(".unfreeze"):
        check = _num(0, 1)  # fraction:F
    lo, hi = check(f"{path}.min", raw["min"]), check(f"{path}.max", raw["max"])
    if not lo < hi:
        raise ConfigError(f"{path}.max", f"a number > min ({lo})", raw["max"])
    sampling = raw.get("sampling", "linear")
    if sampling not in SAMPLINGS:
        raise ConfigError(f"{path}.sampling", "one of 'linear', 'log'", sampling)
    if sampling == "log" and lo <= 0:
        raise ConfigError(f"{path}.min", "a number > 0 for log sampling", raw["min"])
    step = raw.get("step")
    if step is not None:
        step = _num(0, lo_open=True)(f"{path}.step", step)
    return {"min": lo, "max": hi, "sampling": sampling, "step": step}


def _int_range(path, raw, forms):
    if "i" not in forms:
        raise ConfigError(path, _forms(forms), raw,
                          detail="This knob takes no {int_min, int_max} range.")
    _keys(path, raw, INT_RANGE_KEYS, ("int_min", "int_max"))
    lo = _num(0, integer=True)(f"{path}.int_min", raw["int_min"])
    hi = _num(integer=True)(f"{path}.int_max", raw["int_max"])
    if not lo < hi:
        raise ConfigError(f"{path}.int_max", f"an integer > int_min ({lo})", hi)
    step = _num(1, integer=True)(f"{path}.step", raw.get("step", 1))
    return {"int_min": lo, "int_max": hi, "step": step}


def _keys(path, raw, allowed, required):
    _no_unknown(path, raw, allowed)
    for key in required:
        if key not in raw:
            raise ConfigError(f"{path}.{key}", "given (this key is required)", None)


def _search_space(raw):
    if not isinstance(raw, dict):
        raise ConfigError("search_space", "a mapping with at least `backbone`", raw)
    raw = _renamed_unfreeze(raw)
    _no_unknown("search_space", raw, KNOBS)
    if "backbone" not in raw:
        raise ConfigError("search_space.backbone", "given (this key is required)", None)
    space = {name: _knob(name, raw[name]) if name in raw else copy.deepcopy(default)
             for name, (_, default, _) in KNOBS.items()}
    if _largest(space["head_epochs"]) + _largest(space["fine_tune_epochs"]) == 0:
        raise ConfigError("search_space.fine_tune_epochs", "an integer > 0 when "
                          "head_epochs is 0 (every trial would train for 0 epochs)",
                          space["fine_tune_epochs"])
    return space


def _largest(knob):
    """The largest value a validated integer knob can take."""
    if isinstance(knob, dict):
        return max(knob["choice"]) if "choice" in knob else knob["int_max"]
    return knob


def _renamed_unfreeze(raw):
    """`search_space.trainable`, the former name of `unfreeze`: accepted with a warning."""
    if "trainable" not in raw:
        return raw
    if "unfreeze" in raw:
        raise ConfigError("search_space.trainable", "absent when `unfreeze` is given (it is "
                          "`unfreeze`'s former name); keep `unfreeze` only", raw["trainable"])
    warnings.warn("`search_space.trainable` is deprecated: it is now `search_space.unfreeze` "
                  "(what stage 2 of each trial unfreezes). Rename the key; the value is used "
                  "as `unfreeze`.", DeprecationWarning, stacklevel=4)
    return {("unfreeze" if k == "trainable" else k): v for k, v in raw.items()}


# ---------------------------------------------------------------- public API


def validate(raw):
    """Validates a raw config mapping and fills in the defaults.

    Args:
        raw: The mapping read from YAML.

    Returns:
        A new dict with the sections `data`, `search_space`, `tuner`, `run`.

    Raises:
        ConfigError: On unknown keys, wrong types, empty choices, bad ranges.
    """
    if not isinstance(raw, dict):
        raise ConfigError("config", "a mapping with the sections data, search_space, tuner, run",
                          raw)
    _no_unknown("", raw, ("data", "search_space", "tuner", "run", "export"))
    return {
        "data": _data(raw.get("data")),
        "search_space": _search_space(raw.get("search_space")),
        "tuner": _section("tuner", raw.get("tuner"), TUNER),
        "run": _export(raw.get("export"), raw.get("run"),
                       _section("run", raw.get("run"), RUN)),
    }


def _export(raw, raw_run, run):
    """`export: {formats: [...]}`, the other spelling of `run.export_formats`."""
    if raw is None:
        return run
    if not isinstance(raw, dict):
        raise ConfigError("export", "a mapping with the key formats", raw)
    _no_unknown("export", raw, ("formats",))
    if "formats" in raw:
        if isinstance(raw_run, dict) and "export_formats" in raw_run:
            raise ConfigError("export.formats", "given once (it is run.export_formats, "
                              "which is given too)", raw["formats"])
        run["export_formats"] = _export_formats("export.formats", raw["formats"])
    return run


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key written twice in one mapping
    (plain `safe_load` silently keeps the last value)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, (str, int, float, bool, type(None))):
                continue  # an unhashable key: the schema check reports it
            if key in seen:
                raise ConfigError(
                    "--config", "each key once per mapping", self.name, verb="hold",
                    detail=f"{key!r} is written on line {seen[key]} and again on line {line}.")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path):
    """Reads a YAML file as `yaml.safe_load` does, as a ConfigError on failure.

    A key written twice in one mapping is an error (naming the key and both
    lines), and syntax errors keep their line and column.
    """
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except OSError as e:
        raise ConfigError("--config", "a readable YAML file", str(path)) from e
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"valid YAML ({_yaml_problem(e)})", str(path)) from e


def _yaml_problem(error):
    """`line L, column C: problem` of a YAML error (1-based, as editors count)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def load_config(path, overrides=None):
    """Reads, overrides and validates a config file.

    Args:
        path: Path of the YAML file.
        overrides: Optional dict `{"section.key": value}` applied before
            validation (the CLI flags).

    Returns:
        The validated config dict.
    """
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if isinstance(raw, dict):
        raw = copy.deepcopy(raw)
        for dotted, value in (overrides or {}).items():
            section, key = dotted.split(".")
            if not isinstance(raw.get(section, {}), dict):
                break  # validate() reports the bad section.
            raw.setdefault(section, {})
            if raw[section] is None:
                raw[section] = {}
            raw[section][key] = value
    return validate(raw)


def dump(cfg):
    """Returns the YAML text of a validated config."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def differences(old, new, prefix=""):
    """Dotted key paths whose values differ between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict) and not _is_knob_form(a):
            out += differences(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out


def _is_knob_form(d):
    return any(k in d for k in ("choice", "min", "int_min"))

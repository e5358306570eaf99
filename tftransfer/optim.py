"""Optimizers, learning-rate schedules and regularizers from identifiers.

Every `get_*` takes `None`, a short string, a `{"class_name", "config"}` dict
or a ready Keras object, like `keras.optimizers.get`, and fails with the list
of valid names otherwise.

Example:

>>> opt = get_optimizer("sgd", learning_rate=0.01, momentum=0.9, nesterov=True)
>>> sched = get_schedule({"class_name": "warmup_cosine",
...                       "config": {"warmup_steps": 10, "decay_steps": 100}},
...                      learning_rate=1e-3)
>>> reg = get_regularizer("l1_l2:1e-5,1e-4")
"""

import math

import keras

from tftransfer._checks import check_float, check_int, invalid, is_real
from tftransfer._fine_tune_optimizers import NO_DECAY, base_class, fine_tune_class
from tftransfer._names import OPTIMIZERS
from tftransfer._registry import Registry, check_config_dict

_OPTIMIZERS = Registry(
    "optimizer",
    "optimizer",
    {name: getattr(keras.optimizers, cls) for name, cls in OPTIMIZERS.items()},
)


def make_optimizer(identifier="adam", learning_rate=None, *, weight_decay=None, options=None,
                   lr_multipliers=None):
    """A new optimizer of `identifier`'s kind for fine-tuning.

    Like `get_optimizer`, but an optimizer instance or config is rebuilt (a
    fresh one, with no state), decoupled weight decay leaves biases and
    normalization parameters alone, and `lr_multipliers` gives layers their
    own rates; the result saves and reloads with all of it.

    Args:
        identifier: Anything `get_optimizer` takes; an instance is copied
            through its config.
        learning_rate: Float or schedule; None keeps the identifier's.
        weight_decay: Optional float >= 0; when given, biases and
            normalization parameters are excluded from it.
        options: Optional dict of more constructor arguments.
        lr_multipliers: Optional dict `{"<layer>/<variable>": factor}`.

    Returns:
        A `keras.optimizers.Optimizer`.
    """
    kwargs = dict(options or {})
    if isinstance(identifier, keras.optimizers.Optimizer):
        identifier = keras.optimizers.serialize(identifier)
    if isinstance(identifier, dict) and "registered_name" in identifier:  # Keras-serialized
        optimizer = keras.optimizers.deserialize(identifier)
        cls, config = base_class(type(optimizer)), optimizer.get_config()
        for key in ("lr_multipliers", "no_decay"):
            config.pop(key, None)
    else:
        optimizer = get_optimizer(identifier, learning_rate=learning_rate, **kwargs)
        cls, config = type(optimizer), optimizer.get_config()
    config.update(kwargs)
    if learning_rate is not None:
        config["learning_rate"] = learning_rate
    if weight_decay is not None:
        config["weight_decay"] = weight_decay
    if not (weight_decay or lr_multipliers):  # an optimizer's own default decay stays as it is
        return cls.from_config(config)
    config.update(lr_multipliers=lr_multipliers or {}, no_decay=NO_DECAY if weight_decay else [])
    return fine_tune_class(cls).from_config(config)


def optimizer_names():
    """Returns the optimizer names `get_optimizer` accepts."""
    return _OPTIMIZERS.names()


def get_optimizer(identifier="adam", learning_rate=None, **kwargs):
    """Returns a new Keras optimizer.

    Args:
        identifier: A name (`"adam"`, `"sgd"`, `"adamw"`, `"rmsprop"`,
            `"nadam"`, `"adagrad"`, `"lion"`, ...), a
            `{"class_name": name, "config": {...}}` dict, or a
            `keras.optimizers.Optimizer` instance (returned as is).
        learning_rate: Float, a `LearningRateSchedule`, or None to keep the
            optimizer's default (or the dict's `learning_rate`).
        **kwargs: More constructor arguments, e.g. `momentum=0.9`,
            `nesterov=True`, `weight_decay=1e-4`, `clipnorm=1.0`. They
            override the dict's config.

    Returns:
        A `keras.optimizers.Optimizer`.
    """
    if isinstance(identifier, keras.optimizers.Optimizer):
        return identifier
    config = {}
    if isinstance(identifier, dict):
        identifier, config = check_config_dict(identifier, "optimizer")
    cls = _OPTIMIZERS.lookup(identifier)
    config.update(kwargs)
    if learning_rate is not None:
        config["learning_rate"] = learning_rate
    _check_optimizer_numbers(config)
    return _construct(cls, config, "optimizer", identifier)


# Optimizer arguments that must be finite and >= 0 when given as numbers.
_NON_NEGATIVE = ("weight_decay", "momentum", "clipnorm", "clipvalue", "global_clipnorm", "epsilon")


def _check_optimizer_numbers(config):
    if is_real(config.get("learning_rate")):
        check_float(config["learning_rate"], "learning_rate", low=0.0, low_open=True)
    for name in _NON_NEGATIVE:
        if config.get(name) is not None:
            check_float(config[name], name, low=0.0)


def _construct(cls, config, argument, name):
    try:
        return cls(**config)
    except TypeError as e:
        raise ValueError(
            f"Invalid arguments for {argument} {name!r}: {e}. "
            f"Received: {argument}_config={config!r}"
        ) from None


def _warmup_cosine(learning_rate, decay_steps, warmup_steps=0, alpha=0.0, initial_learning_rate=0.0):
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=initial_learning_rate,
        decay_steps=decay_steps,
        alpha=alpha,
        warmup_target=learning_rate,
        warmup_steps=warmup_steps,
    )


def _with_initial(cls):
    def make(learning_rate, **config):
        config.setdefault("initial_learning_rate", learning_rate)
        return cls(**config)

    return make


def _piecewise(learning_rate, boundaries, values=None, factors=None):
    if values is None:
        values = [learning_rate * f for f in (factors or [])]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


_SCHEDULES = Registry(
    "learning-rate schedule",
    "learning_rate",
    {
        "cosine": _with_initial(keras.optimizers.schedules.CosineDecay),
        "cosine_restarts": _with_initial(keras.optimizers.schedules.CosineDecayRestarts),
        "exponential": _with_initial(keras.optimizers.schedules.ExponentialDecay),
        "inverse_time": _with_initial(keras.optimizers.schedules.InverseTimeDecay),
        "polynomial": _with_initial(keras.optimizers.schedules.PolynomialDecay),
        "piecewise": _piecewise,
        "warmup": lambda learning_rate, warmup_steps: WarmupSchedule(learning_rate,
                                                                     warmup_steps),
        "warmup_cosine": _warmup_cosine,
    },
)


@keras.saving.register_keras_serializable(package="tftransfer")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A schedule times a constant factor (stage 2's lower rate on a schedule).

    Args:
        schedule: A `LearningRateSchedule` (or its serialized dict).
        factor: Float > 0.
    """

    def __init__(self, schedule, factor):
        if isinstance(schedule, dict):
            schedule = keras.saving.deserialize_keras_object(schedule)
        self.schedule, self.factor = schedule, float(factor)

    def __call__(self, step):
        return self.schedule(step) * self.factor

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule),
                "factor": self.factor}


@keras.saving.register_keras_serializable(package="tftransfer")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A linear warmup in front of a rate or schedule (stage 2's default).

    The rate at step `s` (counted from 0) is
    `learning_rate(s) * min(1, (s + 1) / warmup_steps)`: a fresh optimizer
    on a freshly unfrozen backbone takes small steps first.

    Args:
        learning_rate: Float > 0 or a `LearningRateSchedule` (or its
            serialized dict), the rate after the warmup.
        warmup_steps: Integer >= 1, the steps to reach it.

    Example:

    >>> WarmupSchedule(1e-3, warmup_steps=4)(1)  # 1e-3 * 2 / 4
    """

    def __init__(self, learning_rate, warmup_steps):
        if isinstance(learning_rate, dict):
            learning_rate = keras.saving.deserialize_keras_object(learning_rate)
        if not isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            learning_rate = check_float(learning_rate, "learning_rate", low=0.0, low_open=True)
        self.learning_rate = learning_rate
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", minimum=1)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        rate = self.learning_rate
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            rate = rate(step)
        return rate * keras.ops.minimum(1.0, (step + 1.0) / float(self.warmup_steps))

    def get_config(self):
        rate = self.learning_rate
        if not isinstance(rate, float):
            rate = keras.saving.serialize_keras_object(rate)
        return {"learning_rate": rate, "warmup_steps": self.warmup_steps}


def schedule_names():
    """Returns the schedule names `get_schedule` accepts."""
    return _SCHEDULES.names()


def get_schedule(identifier, learning_rate=1e-3, *, argument="learning_rate"):
    """Returns a learning rate: a float or a Keras `LearningRateSchedule`.

    Args:
        identifier: A float (returned as is), a `LearningRateSchedule`
            instance, a schedule name, or a `{"class_name": name, "config":
            {...}}` dict with `name` one of `cosine`, `cosine_restarts`,
            `exponential`, `inverse_time`, `polynomial`, `piecewise`,
            `warmup` (linear warmup, then constant), `warmup_cosine`. The
            config holds the schedule's arguments; its `learning_rate` (else
            the `learning_rate` argument) is the starting rate, or the peak
            rate for `warmup` and `warmup_cosine`. `piecewise` takes
            `boundaries` and `values` (or `factors` of `learning_rate`).
        learning_rate: Float, the base rate used by dict schedules.
        argument: String, the argument named in errors. Defaults to
            `"learning_rate"`.

    Returns:
        A float or a `keras.optimizers.schedules.LearningRateSchedule`.
    """
    if isinstance(identifier, keras.optimizers.schedules.LearningRateSchedule):
        return identifier
    if is_real(identifier):
        return check_float(identifier, argument, low=0.0, low_open=True)
    if isinstance(identifier, str):
        identifier = {"class_name": identifier}
    if not isinstance(identifier, dict):
        raise ValueError(
            f"`{argument}` must be a positive float, a keras "
            "LearningRateSchedule, a schedule name or a dict "
            '{"class_name": <schedule>, "config": {...}} with a schedule in '
            f"{schedule_names()}. Received: {argument}={identifier!r}"
        )
    name, config = check_config_dict(identifier, argument)
    if name not in _SCHEDULES and hasattr(keras.optimizers.schedules, str(name)):
        # A Keras-serialised schedule, e.g. from `keras.saving.serialize_keras_object`.
        return keras.optimizers.schedules.deserialize(identifier)
    make = _SCHEDULES.lookup(name, argument)
    base = config.pop("learning_rate", learning_rate)
    if not isinstance(base, keras.optimizers.schedules.LearningRateSchedule):
        check_float(base, argument, low=0.0, low_open=True)
    _check_schedule_config(config, argument)
    return _construct(lambda **c: make(base, **c), config, argument, name)


# Schedule arguments: name -> (kind, low, low_open, high).
_SCHEDULE_ARGS = {
    "decay_steps": ("int", 1, False, None), "first_decay_steps": ("int", 1, False, None),
    "warmup_steps": ("int", 0, False, None), "alpha": ("float", 0.0, False, 1.0),
    "decay_rate": ("float", 0.0, True, None), "t_mul": ("float", 0.0, True, None),
    "m_mul": ("float", 0.0, True, None), "power": ("float", 0.0, True, None),
    "end_learning_rate": ("float", 0.0, False, None),
    "initial_learning_rate": ("float", 0.0, False, None),
}


def _check_schedule_config(config, prefix="learning_rate"):
    """Checks a schedule dict's numbers, named as `<prefix>.config.<key>`."""
    for key, value in config.items():
        if key in _SCHEDULE_ARGS:
            kind, low, low_open, high = _SCHEDULE_ARGS[key]
            argument = f"{prefix}.config.{key}"
            if kind == "int":
                check_int(value, argument, minimum=low)
            else:
                check_float(value, argument, low=low, low_open=low_open, high=high)
    for key in ("values", "factors"):
        if config.get(key) is not None:
            _check_rates(config[key], f"{prefix}.config.{key}")
    if config.get("boundaries") is not None:
        _check_boundaries(config["boundaries"], f"{prefix}.config.boundaries")


def _check_rates(values, argument):
    ok = isinstance(values, (list, tuple)) and len(values) > 0 and all(
        is_real(v) and math.isfinite(v) and v >= 0 for v in values)
    if not ok:
        raise invalid(argument, "a non-empty list of finite floats >= 0", values)


def _check_boundaries(boundaries, argument):
    ok = isinstance(boundaries, (list, tuple)) and all(is_real(b) for b in boundaries) and all(
        a < b for a, b in zip(boundaries, boundaries[1:]))
    if not ok:
        raise invalid(argument, "a list of increasing step numbers", boundaries)


def _parse_factors(kind, text, count, spec):
    parts = [p for p in text.split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != count or any(v < 0 for v in values):
        raise ValueError(
            f"`regularizer` {kind!r} takes {count} non-negative factor(s), as in "
            '"l1:1e-4", "l2:1e-4" or "l1_l2:1e-5,1e-4". '
            f"Received: regularizer={spec!r}"
        )
    return values


_REGULARIZERS = Registry(
    "regularizer",
    "regularizer",
    {
        "l1": ((0.01,), lambda f: keras.regularizers.L1(f[0])),
        "l2": ((0.01,), lambda f: keras.regularizers.L2(f[0])),
        "l1_l2": ((0.01, 0.01), lambda f: keras.regularizers.L1L2(l1=f[0], l2=f[1])),
        "orthogonal": ((0.01,), lambda f: keras.regularizers.OrthogonalRegularizer(f[0])),
    },
)


def get_regularizer(identifier):
    """Returns a Keras regularizer (or None).

    Args:
        identifier: None, `"l1:1e-4"`, `"l2:1e-4"`, `"l1_l2:1e-5,1e-4"`,
            `"orthogonal:0.01"`, a bare name (factor 0.01), a
            `{"class_name", "config"}` dict, or a `keras.regularizers.Regularizer`.

    Returns:
        A `keras.regularizers.Regularizer` or None.
    """
    if identifier is None or isinstance(identifier, keras.regularizers.Regularizer):
        return identifier
    if isinstance(identifier, dict):
        check_config_dict(identifier, "regularizer")
        return keras.regularizers.deserialize(identifier)
    if not isinstance(identifier, str):
        raise ValueError(
            "`regularizer` must be None, a string such as \"l2:1e-4\", a dict "
            "or a keras Regularizer. Received: "
            f"regularizer={identifier!r}"
        )
    name, _, factors = identifier.partition(":")
    defaults, make = _REGULARIZERS.lookup(name)
    if not factors:
        return make(defaults)
    return make(_parse_factors(name, factors, len(defaults), identifier))

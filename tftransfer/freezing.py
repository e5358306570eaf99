"""Freeze policies: which backbone layers train.

A freeze policy (`build_finetuner(trainable=...)`, `fine_tune(unfreeze=...)`,
`FineTuner.freeze(policy)`) is `"none"` (all frozen), `"all"`, `"top:N"` (the last N layers that
have weights), `"fraction:F"` (the last F of them), a regex or a list of
regexes matched against layer names, or a callable `layer -> bool`. Keywords
are matched case-insensitively (`"ALL"`, `"Top:1"`); a regex, list or callable
that selects no layer with weights is refused, naming a few layers.

BatchNormalization layers of a frozen part keep `trainable=False`, which in
Keras 3 also runs them in inference mode: their moving statistics never change.
With `freeze_batchnorm=True` (the default of `build_finetuner`, and the advice of
the Keras transfer-learning guide) they stay frozen even inside a trainable part;
a `HubLayer` (whose BatchNorm is inside the SavedModel) is then called with
`training=False` while its variables train.

Example:

>>> apply(backbone, "top:2")
>>> print(describe_trainable(backbone))
"""

import re

import keras

from tftransfer._checks import few_names, invalid
from tftransfer._registry import close_matches


def leaf_layers(model):
    """Lists the layers of `model` that hold no other layers, depth first."""
    leaves = []
    for layer in model.layers if hasattr(model, "layers") else []:
        if getattr(layer, "layers", None):
            leaves += leaf_layers(layer)
        else:
            leaves.append(layer)
    return leaves


def _top(count, spec, argument="trainable"):
    if count < 0:
        raise invalid(argument, '"top:N" with N >= 0', spec)

    def policy(layers):
        chosen = weighted_layers_of(layers)[-count:] if count else []
        return {id(layer) for layer in chosen}

    return policy


def weighted_layers_of(layers):
    return [layer for layer in layers if layer.weights]


def _fraction(value, spec, argument="trainable"):
    if not 0.0 <= value <= 1.0:
        raise invalid(argument, '"fraction:F" with F in [0, 1]', spec)

    def policy(layers):
        count = round(value * len(weighted_layers_of(layers)))
        return _top(count, spec)(layers)

    return policy


def _regexes(patterns):
    compiled = [re.compile(p) for p in patterns]

    def policy(layers):
        return {id(layer) for layer in layers if any(p.search(layer.name) for p in compiled)}

    return policy


def _callable(fn):
    def policy(layers):
        return {id(layer) for layer in layers if fn(layer)}

    return policy


_KEYWORDS = {
    "none": lambda layers: set(),
    "all": lambda layers: {id(layer) for layer in layers},
}
_FORMS = {"none": "none", "all": "all", "top": "top:N", "fraction": "fraction:F"}
_PREFIXES = {"top": lambda arg, spec, argument: _top(int(arg), spec, argument),
             "fraction": lambda arg, spec, argument: _fraction(float(arg), spec, argument)}


def get_policy(policy, argument="trainable"):
    """Turns a freeze policy identifier into `select(layers) -> set of ids`.

    Keywords and prefixes (`"ALL"`, `"Top:1"`) are matched case-insensitively.
    """
    if isinstance(policy, bool):
        policy = "all" if policy else "none"
    if callable(policy):
        return _callable(policy)
    if isinstance(policy, (list, tuple)):
        return _regexes(_check_regexes(policy, argument))
    if not isinstance(policy, str):
        raise _policy_error(policy, argument)
    keyword = policy.strip().lower()
    if keyword in _KEYWORDS:
        return _KEYWORDS[keyword]
    prefix, sep, arg = keyword.partition(":")
    if sep and prefix in _PREFIXES:
        try:
            return _PREFIXES[prefix](arg.strip(), policy, argument)
        except ValueError as e:
            if "Received" in str(e):
                raise
            raise _policy_error(policy, argument) from None
    return _regexes(_check_regexes([policy], argument, received=policy))


def _is_keyword(policy):
    """True for the policies that may select nothing on purpose ("none", "top:0", ...)."""
    if isinstance(policy, bool):
        return True
    if not isinstance(policy, str):
        return False
    keyword = policy.strip().lower()
    return keyword in _KEYWORDS or keyword.partition(":")[0] in _PREFIXES


def _check_regexes(patterns, argument="trainable", received=None):
    for p in patterns:
        try:
            re.compile(p)
        except (re.error, TypeError):
            raise _policy_error(patterns if received is None else received, argument) from None
    return list(patterns)


def _policy_error(received, argument="trainable"):
    return invalid(
        argument, '"none", "all", "top:N", "fraction:F" (any case), a regex or list of '
        "regexes on layer names, or a callable `layer -> bool`", received)


def selection(backbone, policy="none", freeze_batchnorm=True, argument="trainable"):
    """The leaf layers of `backbone` that freeze policy `policy` makes trainable.

    Raises:
        ValueError: `policy` is malformed, or a regex, list or callable
            selects no layer with weights (the error lists a few names).

    Returns:
        `(layers, chosen)`: all leaf layers, and the set of ids chosen.
    """
    select = get_policy(policy, argument)
    layers = leaf_layers(backbone) or [backbone]
    candidates = [layer for layer in layers if not (freeze_batchnorm and _is_bn(layer))]
    chosen = select(candidates)
    if not _is_keyword(policy) and not any(id(c) in chosen for c in weighted_layers_of(candidates)):
        frozen_bn = [layer for layer in layers if _is_bn(layer) and layer not in candidates]
        raise _selects_nothing(policy, argument, candidates, select(frozen_bn))
    return layers, chosen


def _selects_nothing(policy, argument, candidates, with_bn):
    names = [layer.name for layer in weighted_layers_of(candidates)]
    hint = ("It matches only BatchNormalization layers, kept frozen by "
            "freeze_batchnorm=True." if with_bn else
            f"Layers with weights: {few_names(names)}.")
    if isinstance(policy, str):  # a mistyped keyword is taken as a regex
        close = close_matches(policy.partition(":")[0], ["none", "all", "top", "fraction"])
        hint += "".join(f" Did you mean {_FORMS[c]!r}?" for c in close[:1])
    return invalid(argument, "a policy that selects at least one backbone layer with "
                   "weights (regexes are searched in layer names)", policy, hint)


def apply(backbone, policy="none", freeze_batchnorm=True, argument="trainable"):
    """Sets `trainable` on every leaf layer of `backbone` from a freeze policy.

    Args:
        backbone: A `keras.Model` (or layer).
        policy: A freeze policy (see module docstring).
        freeze_batchnorm: Boolean, keep BatchNormalization layers frozen (in
            inference mode) even in the trainable part. Defaults to `True`.
        argument: String, the argument named in errors (`"trainable"`,
            `"unfreeze"`).

    `"top:N"` and `"fraction:F"` count the layers that may train: with
    `freeze_batchnorm=True`, BatchNormalization layers are not counted.

    Raises:
        ValueError: A malformed policy, or a regex, list or callable that
            selects no layer with weights.

    Returns:
        The number of leaf layers left trainable that own weights.
    """
    layers, chosen = selection(backbone, policy, freeze_batchnorm, argument)
    backbone.trainable = True  # Containers stay trainable; leaves decide.
    for layer in layers:
        layer.trainable = id(layer) in chosen
        if hasattr(layer, "freeze_batchnorm"):  # a HubLayer: its BatchNorm is inside
            layer.freeze_batchnorm = bool(freeze_batchnorm)
    if not any(layer.trainable for layer in layers):
        backbone.trainable = False
    return sum(1 for layer in layers if layer.trainable and layer.weights)


def _is_bn(layer):
    return isinstance(layer, keras.layers.BatchNormalization)


def _count(weights):
    return int(sum(int(keras.ops.size(w)) for w in weights))


def trainable_rows(model):
    """Returns `(name, class, params, trainable)` for each leaf layer with weights."""
    rows = []
    for layer in leaf_layers(model) or [model]:
        if layer.weights:
            rows.append((layer.name, type(layer).__name__, _count(layer.weights),
                         bool(layer.trainable_weights)))
    return rows


def describe_trainable(model, print_fn=None):
    """Prints (and returns) a table of layers, parameter counts and trainable flags.

    Args:
        model: A `keras.Model`.
        print_fn: Optional callable taking the table string. Defaults to
            `print`.

    Returns:
        The table as a string.
    """
    rows = trainable_rows(model)
    width = max([len(r[0]) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'class':<22} {'params':>10}  trainable",
             "-" * (width + 45)]
    for name, cls, params, flag in rows:
        lines.append(f"{name:<{width}}  {cls:<22} {params:>10,}  {'yes' if flag else 'no'}")
    trainable = _count(model.trainable_weights)
    total = _count(model.weights)
    lines.append("-" * (width + 45))
    lines.append(f"trainable params: {trainable:,} of {total:,}")
    table = "\n".join(lines)
    (print_fn or print)(table)
    return table

"""The one validation module: argument checkers and training-data checks.

Every failure is a `ValueError` in the package's one format::

    `dropout` must be a finite float in [0, 1). Received: dropout='0.2'

naming the argument in backticks, what is allowed, and ending with the value
received (arrays are shown as `array(shape=..., dtype=...)`). numpy integers
are accepted wherever ints are, and booleans never count as numbers.

Conventions an experienced Keras user expects:

- `hidden_units=64` means one hidden layer of 64 units, as Keras layers take
  `kernel_size=3` for `(3, 3)`; it is normalized to `(64,)`.
- `input_shape=32` is refused: it could mean `(32, 32, 3)` or `(32, 32, 1)`, so
  the error shows the `(H, W, C)` form to write.
- Numbers given as strings (`dropout="0.2"`) are refused, as in Keras.

Example:

>>> check_float(0.2, "dropout", low=0.0, high=1.0, high_open=True)
0.2
>>> check_int(np.int64(3), "num_classes", minimum=1)
3
"""

import math
import numbers

import numpy as np

_SHOWN_NAMES = 8  # How many layer names or classes an error lists.
_MAX_SHOWN = 300  # Longer received values (datasets, ImageData) are cut.


def shown(value):
    """How a received value appears in an error: arrays by shape and dtype."""
    if isinstance(value, np.ndarray) or _is_tensor(value):
        dtype = getattr(value.dtype, "as_numpy_dtype", value.dtype)  # tf.DType -> numpy
        return f"array(shape={tuple(value.shape)}, dtype={np.dtype(dtype)})"
    if isinstance(value, tuple) and any(isinstance(v, np.ndarray) or _is_tensor(v) for v in value):
        return "(" + ", ".join(shown(v) for v in value) + ")"
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + "..."


def _is_tensor(value):
    return hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "numpy")


def message(argument, allowed, value, detail="", verb="be"):
    """The text of the package's one error format (also `search.ConfigError`'s).

    Args:
        argument: String, the argument's name (or a config key path).
        allowed: String, what the argument must be (`"an integer >= 1"`).
        value: The value received.
        detail: Optional sentence between the rule and `Received:`, e.g. the
            first bad index of an array (a final period is added if missing).
        verb: String, the verb after "must". Defaults to `"be"`.

    Returns:
        `"`argument` must be <allowed>.[ detail] Received: argument=<value>"`.
    """
    detail = detail.strip() if detail else ""
    if detail and not detail.endswith((".", "?", "!")):
        detail += "."
    detail = f" {detail}" if detail else ""
    return f"`{argument}` must {verb} {allowed}.{detail} Received: {argument}={shown(value)}"


def invalid(argument, allowed, value, detail="", verb="be"):
    """Builds the package's `ValueError` for a bad argument.

    Takes the arguments of `message`.

    Returns:
        `ValueError("`argument` must be <allowed>.[ detail] Received: argument=<value>")`.
    """
    return ValueError(message(argument, allowed, value, detail, verb))


def is_int(value):
    """True for Python and numpy integers, False for booleans."""
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value):
    """True for Python and numpy ints and floats, False for booleans and strings."""
    return isinstance(value, (numbers.Real, np.floating, np.integer)) and not isinstance(
        value, (bool, np.bool_))


def _bounds_text(low, high, low_open, high_open):
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def _within(value, low, high, low_open, high_open):
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def check_int(value, argument, *, minimum=None, maximum=None, allow_none=False):
    """Returns `value` as an `int`, or raises the package's `ValueError`.

    Args:
        value: The value to check; numpy integers are accepted, bools refused.
        argument: String, the argument's name.
        minimum: Optional smallest allowed value.
        maximum: Optional largest allowed value.
        allow_none: Boolean, accept (and return) `None`.

    Returns:
        An `int`, or None.
    """
    if value is None and allow_none:
        return None
    ok = is_int(value) and _within(value, minimum, maximum, False, False)
    if not ok:
        bounds = _bounds_text(minimum, maximum, False, False)
        allowed = f"an integer {bounds}".strip() + (" or None" if allow_none else "")
        raise invalid(argument, allowed, value)
    return int(value)


def check_float(value, argument, *, low=None, high=None, low_open=False, high_open=False,
                allow_none=False):
    """Returns a finite `value` within bounds as a `float`, or raises.

    NaN and infinity are always refused; ints (not bools) are accepted.

    Args:
        value: The value to check.
        argument: String, the argument's name.
        low / high: Optional bounds.
        low_open / high_open: Booleans, exclude the bound itself.
        allow_none: Boolean, accept (and return) `None`.

    Returns:
        A `float`, or None.
    """
    if value is None and allow_none:
        return None
    ok = is_real(value) and math.isfinite(value) and _within(value, low, high, low_open, high_open)
    if not ok:
        bounds = _bounds_text(low, high, low_open, high_open)
        allowed = f"a finite float {bounds}".strip() + (" or None" if allow_none else "")
        raise invalid(argument, allowed, value)
    return float(value)


def check_probability(value, argument):
    """Returns a float in `[0, 1)` (dropout, label smoothing), or raises."""
    return check_float(value, argument, low=0.0, high=1.0, high_open=True)


def check_choice(value, argument, choices):
    """Returns `value` if it is one of `choices`, or raises listing them."""
    if not any(isinstance(value, type(c)) and value == c for c in choices):
        raise invalid(argument, f"one of {', '.join(repr(c) for c in choices)}", value)
    return value


def check_shape(value, argument="input_shape", *, rank=3, allow_none=True):
    """Returns an image shape `(H, W, C)` of positive ints as a tuple, or raises.

    Args:
        value: A tuple or list of `rank` positive integers (numpy ints ok).
        argument: String, the argument's name.
        rank: Integer, the number of dimensions. Defaults to `3`.
        allow_none: Boolean, accept (and return) `None`.

    Returns:
        A tuple of ints, or None.
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, (tuple, list)) and len(value) == rank and all(
        is_int(v) and v > 0 for v in value)
    if not ok:
        form = "(height, width, channels)" if rank == 3 else f"a tuple of {rank} positive integers"
        raise invalid(argument, f"a tuple {form} of positive integers, e.g. (224, 224, 3)"
                      + (" or None" if allow_none else ""), value)
    return tuple(int(v) for v in value)


def check_int_sequence(value, argument, *, minimum=1):
    """Returns a tuple of ints >= `minimum`; a single int `n` means `(n,)`.

    Args:
        value: An integer, or a list or tuple of integers (may be empty).
        argument: String, the argument's name.
        minimum: Integer, the smallest allowed entry. Defaults to `1`.

    Returns:
        A tuple of ints.
    """
    items = (value,) if is_int(value) else value
    ok = isinstance(items, (tuple, list)) and all(is_int(v) and v >= minimum for v in items)
    if not ok:
        raise invalid(argument, f"an integer >= {minimum} or a list of them (one per layer)", value)
    return tuple(int(v) for v in items)


def check_bool(value, argument):
    """Returns `value` if it is a bool (or numpy bool), or raises."""
    if not isinstance(value, (bool, np.bool_)):
        raise invalid(argument, "True or False", value)
    return bool(value)


# Argument tables of the public functions. -----------------------------------

def finetuner_arguments(*, num_classes=None, input_shape=None, dropout=0.0, hidden_units=(),
                        label_smoothing=0.0, weight_decay=None, pooling="avg"):
    """Checks the numeric and shape arguments of `build_finetuner`.

    Called with explicit keywords at the top of `build_finetuner` (the other
    arguments have their own resolvers), so a renamed argument fails loudly.

    Returns:
        `(num_classes, hidden_units)` normalized: an `int` (or None) and a tuple.
    """
    if num_classes is not None:
        num_classes = check_int(num_classes, "num_classes", minimum=1)
    check_shape(input_shape, "input_shape")
    check_probability(dropout, "dropout")
    hidden_units = check_int_sequence(hidden_units, "hidden_units")
    check_probability(label_smoothing, "label_smoothing")
    check_float(weight_decay, "weight_decay", low=0.0, allow_none=True)
    check_choice(pooling, "pooling", ("avg", "max"))
    return num_classes, hidden_units


def fine_tune_arguments(*, model=None, head_epochs=5, fine_tune_epochs=5, unfreeze="all",
                        fine_tune_learning_rate=None, lr_factor=0.03, layerwise_lr_decay="auto",
                        freeze_batchnorm=None, batch_size=32, shuffle=True, early_stopping=3,
                        overwrite=False, initial_epoch=0, keep_best_stage=True):
    """Checks the numeric arguments of `fine_tune`, and that `unfreeze` selects a layer.

    Called with explicit keywords at the top of `fine_tune` (the other
    arguments are checked where they are used), so a renamed argument fails
    loudly.
    """
    head_epochs = check_int(head_epochs, "head_epochs", minimum=0)
    fine_tune_epochs = check_int(fine_tune_epochs, "fine_tune_epochs", minimum=0)
    if is_real(fine_tune_learning_rate):
        check_float(fine_tune_learning_rate, "fine_tune_learning_rate", low=0.0, low_open=True)
    check_float(lr_factor, "lr_factor", low=0.0, high=1.0, low_open=True)
    if layerwise_lr_decay not in (None, "auto") and not (
            is_real(layerwise_lr_decay) and 0 < layerwise_lr_decay <= 1):
        raise invalid("layerwise_lr_decay", 'a finite float in (0, 1], "auto" or None',
                      layerwise_lr_decay)
    check_int(batch_size, "batch_size", minimum=1)
    last = max(1, head_epochs + fine_tune_epochs) - 1
    if not (is_int(initial_epoch) and 0 <= initial_epoch <= last):
        raise invalid("initial_epoch", "an integer from 0 to head_epochs + fine_tune_epochs - 1 "
                      f"(here {last})", initial_epoch)
    for name, value in (("shuffle", shuffle), ("overwrite", overwrite),
                        ("keep_best_stage", keep_best_stage)):
        check_bool(value, name)
    if freeze_batchnorm is not None:
        check_bool(freeze_batchnorm, "freeze_batchnorm")
    if early_stopping is not None and early_stopping is not False and not (
            is_int(early_stopping) and early_stopping >= 0):
        raise invalid("early_stopping", "an integer patience >= 0, or None (or False) to turn "
                      "it off", early_stopping)
    if fine_tune_epochs and model is not None:
        _check_unfreeze(model, unfreeze, freeze_batchnorm)


def _check_unfreeze(model, unfreeze, freeze_batchnorm):
    from tftransfer import freezing  # freezing imports this module

    backbone = backbone_of(model)
    if freeze_batchnorm is None:  # the recipe's, as `FineTuner.freeze` takes it
        freeze_batchnorm = getattr(model, "recipe", {}).get("freeze_batchnorm", True)
    if backbone is not None:
        freezing.selection(backbone, unfreeze, freeze_batchnorm=freeze_batchnorm,
                           argument="unfreeze")


def backbone_of(model):
    """The model's backbone (`model.backbone`, else its layer `"backbone"`), or None."""
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        return backbone
    try:
        return model.get_layer("backbone")
    except (ValueError, AttributeError):
        return None


# Training data. ----------------------------------------------------------------

def model_target(model):
    """`(task, num_classes)` a `FineTuner` trains for."""
    return model.task, model.num_classes


def _data_error(argument, which, allowed, received, detail=""):
    """The error for the images (`which=0`) or labels (`which=1`) of `argument`.

    With separate arguments `("x", "y")` the one at fault is named and shown.
    """
    if isinstance(argument, tuple):
        value = received[which] if isinstance(received, tuple) else received
        return invalid(argument[which], allowed, value, detail)
    return invalid(argument, allowed, received, detail, verb="hold")


def check_arrays(x, y, *, num_classes=None, task=None, argument="train"):
    """Checks in-memory training data before anything trains.

    Args:
        x: Images (or any inputs), an array-like of `n` examples.
        y: Labels, an array-like of `n` labels.
        num_classes: Integer, the model's outputs, or None to skip the range
            check of labels.
        task: `"classification"` (integer labels in `[0, num_classes)`),
            `"multi_label"` (0/1 vectors of shape `[n, num_classes]`),
            `"regression"` (finite values) or None (labels not checked).
        argument: String, the argument the pair came in (`"train"`), or a pair
            of names `("x", "y")` when they are separate arguments.

    Returns:
        `(x, y)` as numpy arrays.
    """
    received = (x, y)
    x, y = _as_array(x, argument, 0, received), _as_array(y, argument, 1, received)
    if len(x) == 0:
        raise _data_error(argument, 0, "non-empty arrays (at least one example)", (x, y))
    if len(x) != len(y):
        raise _data_error(argument, 1, "one label per image", (x, y),
                          f"Got {len(x)} images and {len(y)} labels.")
    check_batch(x, y, num_classes=num_classes, task=task, argument=argument)
    return x, y


def _as_array(value, argument, which, received):
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        array = None
    if array is None or array.ndim == 0 or not (
            np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise _data_error(argument, which, "numeric arrays with one row per example", received)
    return array


def check_batch(images, labels, *, num_classes=None, task=None, argument="train",
                index_offset=0, received=None):
    """Checks one batch: finite images, and labels that fit the task.

    For datasets, call it on each batch of the pass that reads the data (the
    feature-cache pass), with `index_offset` the number of examples before it,
    so that errors name the example's index in the whole dataset.

    Args:
        images: Array-like (numpy or eager tensor) of images.
        labels: Array-like of labels.
        num_classes: Integer or None.
        task: `"classification"`, `"multi_label"`, `"regression"` or None.
        argument: String, or a pair `("x", "y")` (see `check_arrays`).
        index_offset: Integer, index of the batch's first example.
        received: Optional value shown after `Received:` (defaults to the
            batch as a pair of arrays).
    """
    images, labels = np.asarray(images), np.asarray(labels)
    shown_as = received if received is not None else (images, labels)
    _check_finite(images, argument, index_offset, shown_as)
    if task and not (np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_):
        raise _data_error(argument, 1, "numeric labels", shown_as)
    check = {"classification": _check_class_ids, "multi_label": _check_multi_hot,
             "regression": _check_targets}.get(task)
    if check:
        check(labels, num_classes, argument, index_offset, shown_as)


def _first_bad(ok_per_example):
    bad = np.flatnonzero(~ok_per_example)
    return int(bad[0]) if len(bad) else None


def _finite_rows(array):
    if not np.issubdtype(array.dtype, np.floating):
        return np.ones(len(array), bool)
    return np.isfinite(array.reshape(len(array), -1)).all(axis=1)


def _check_finite(images, argument, offset, received, chunk=256):
    for start in range(0, len(images), chunk):
        bad = _first_bad(_finite_rows(images[start:start + chunk]))
        if bad is not None:
            row = images[start + bad].reshape(-1)
            raise _data_error(argument, 0, "finite images (no NaN or infinity)", received,
                              f"The first bad image is at index {offset + start + bad} "
                              f"(it holds {row[~np.isfinite(row)][0]}).")


def _check_class_ids(labels, num_classes, argument, offset, received):
    rule = "labels that are " + (
        f"integer class ids in [0, {num_classes}) (num_classes={num_classes})"
        if num_classes is not None else "integer class ids >= 0")
    if labels.ndim == 0 or labels.ndim > 2 or labels.size != len(labels):
        hint = " (one-hot labels? pass np.argmax(y, axis=-1))" if labels.ndim == 2 else ""
        raise _data_error(argument, 1, f"{rule} of shape [n]{hint}", received)
    flat = labels.reshape(-1)
    ok = np.ones(len(flat), bool)
    if flat.dtype.kind == "f":
        ok &= np.isfinite(flat) & (flat == np.round(flat))
    ok &= (flat >= 0) & (flat < (num_classes if num_classes is not None else np.inf))
    bad = _first_bad(ok)
    if bad is not None:
        raise _data_error(argument, 1, rule, received, f"The first bad label is at index "
                          f"{offset + bad}: {flat[bad].item()!r}.")


def _check_multi_hot(labels, num_classes, argument, offset, received):
    rule = f"labels that are 0/1 vectors of shape [n, {num_classes}] (task='multi_label')"
    if labels.ndim != 2 or (num_classes is not None and labels.shape[1] != num_classes):
        raise _data_error(argument, 1, rule, received, f"Got shape {labels.shape}.")
    bad = _first_bad(((labels == 0) | (labels == 1)).all(axis=1))
    if bad is not None:
        raise _data_error(argument, 1, rule, received, f"The first bad label is at index "
                          f"{offset + bad}: {labels[bad].tolist()!r}.")


def _check_targets(labels, num_classes, argument, offset, received):
    if num_classes not in (None, 1) and (labels.ndim != 2 or labels.shape[1] != num_classes):
        raise _data_error(argument, 1, f"regression targets of shape [n, {num_classes}]",
                          received, f"Got shape {labels.shape}.")
    bad = _first_bad(_finite_rows(labels.astype(float)))
    if bad is not None:
        raise _data_error(argument, 1, "finite regression targets (no NaN or infinity)",
                          received, f"The first bad target is at index {offset + bad}.")


def check_dataset(dataset, *, num_classes=None, task=None, argument="train", batches=2):
    """Checks the first `batches` batches of a `tf.data.Dataset` of `(images, labels)`.

    An empty dataset is refused. Datasets of other structures (a single
    tensor, dicts) are only checked for emptiness. Reading the first batches
    of a dataset whose `cache()` is not filled yet discards the partial cache
    (TensorFlow logs a warning); the first epoch fills it.

    Args:
        dataset: A batched `tf.data.Dataset`.
        num_classes / task / argument: As in `check_batch`.
        batches: Integer, how many batches to read. Defaults to `2`.
    """
    offset, seen = 0, 0
    for batch in dataset.take(batches):
        seen += 1
        if isinstance(batch, (tuple, list)) and len(batch) >= 2 and not isinstance(batch[0], dict):
            check_batch(batch[0], batch[1], num_classes=num_classes, task=task,
                        argument=argument, index_offset=offset, received=dataset)
            offset += len(batch[0])
    if not seen:
        raise invalid(argument, "a dataset holding at least one batch (it is empty)", dataset)


def check_class_weight(class_weight, num_classes, task="classification"):
    """Returns `class_weight` as `{int: float}` with a weight for every class, or raises.

    Args:
        class_weight: None, or a dict `{class_id: weight}`.
        num_classes: Integer, the model's classes.
        task: The model's task; class weights apply to `"classification"`
            and `"multi_label"` only.

    Returns:
        A dict, or None.
    """
    if class_weight is None:
        return None
    allowed = f"None or a dict {{class_id: weight >= 0}} for every class 0..{num_classes - 1}"
    if task == "regression":
        raise invalid("class_weight", "None for task='regression' (class weights apply to "
                      "classes)", class_weight)
    if not isinstance(class_weight, dict) or not all(is_int(k) for k in class_weight) or not all(
            is_real(w) and math.isfinite(w) and w >= 0 for w in class_weight.values()):
        raise invalid("class_weight", allowed, class_weight)
    keys = {int(k) for k in class_weight}
    missing = sorted(set(range(num_classes)) - keys)
    extra = sorted(keys - set(range(num_classes)))
    if missing or extra:
        detail = (f"Missing classes: {few_names(missing, str)}." if missing else "") + (
            f" Unknown classes: {few_names(extra, str)}." if extra else "")
        raise invalid("class_weight", allowed, class_weight, detail)
    return {int(k): float(w) for k, w in class_weight.items()}


def few_names(names, show=repr):
    """`'a', 'b', ... (and N more)`: a few names (or with `show=str`, numbers) for an error."""
    text = ", ".join(show(n) for n in names[:_SHOWN_NAMES])
    return text + (f" (and {len(names) - _SHOWN_NAMES} more)" if len(names) > _SHOWN_NAMES else "")


def fine_tune_data(model, train, validation=None, class_weight=None):
    """Checks `fine_tune`'s data against the model's task and number of classes.

    Arrays `(x, y)` are checked whole; `tf.data` datasets on their first
    batches; an `ImageData` (checked by `tftransfer.data`) for its number of
    classes; `class_weight` (else the `ImageData`'s) for a weight per class.
    """
    task, num_classes = model_target(model)
    if hasattr(train, "train") and hasattr(train, "class_names"):  # ImageData
        _check_image_data(train, task, num_classes)
        class_weight = train.class_weight if class_weight is None else class_weight
    # An ImageData's datasets were checked by tftransfer.data; reading them here would
    # truncate their cache.
    datasets = [("validation", validation)] if hasattr(train, "class_names") else [
        ("train", train), ("validation", validation)]
    for name, data in datasets:
        _check_data(data, name, task, num_classes, getattr(model, "input_shape", None))
    if class_weight is not None and num_classes is not None:
        check_class_weight(class_weight, num_classes, task)


def _check_image_data(data, task, num_classes):
    classes = getattr(data, "num_classes", None)
    if task == "classification" and num_classes is not None and classes and classes > num_classes:
        raise invalid("train", f"data with at most {num_classes} classes, the model's "
                      f"num_classes", data, f"It has {classes} classes: "
                      f"{few_names(list(data.class_names))}.")


def _check_data(data, argument, task, num_classes, input_shape):
    import tensorflow as tf  # only when there is data to check

    if data is None and argument == "validation":
        return
    pair = isinstance(data, (tuple, list)) and len(data) == 2
    if not (pair or isinstance(data, tf.data.Dataset) or hasattr(data, "class_names")):
        hint = (f"For a folder of images: tftransfer.data.from_directory({data!r}, model=model)."
                if isinstance(data, str) else "")
        raise invalid(argument, "a batched tf.data.Dataset, a tuple (x, y) of arrays or an "
                      "ImageData", data, hint)
    if pair and not isinstance(data[0], dict):
        x, _ = check_arrays(data[0], data[1], num_classes=num_classes, task=task,
                            argument=argument)
        _check_image_shape(x.shape, input_shape, argument, (x, np.asarray(data[1])))
    elif isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        if isinstance(spec, tuple) and isinstance(spec[0], tf.TensorSpec):
            _check_image_shape(tuple(spec[0].shape), input_shape, argument, data)
        check_dataset(data, num_classes=num_classes, task=task, argument=argument)


def _check_image_shape(shape, input_shape, argument, received):
    """Images `[n, ...]` must match a single-input model's `[None, ...]` where both are known."""
    if not isinstance(input_shape, tuple) or not all(isinstance(d, (int, type(None)))
                                                     for d in input_shape):
        return
    want = input_shape[1:]
    if len(want) == 3 and want[-1] == 1 and len(shape) == 3:  # (n, H, W) for (H, W, 1)
        shape = (*shape, 1)
    fits = len(shape) == len(want) + 1 and all(
        a is None or b is None or a == b for a, b in zip(shape[1:], want))
    if not fits:
        expected = ", ".join("?" if d is None else str(d) for d in want)
        raise _data_error(argument, 0, f"images of shape [n, {expected}], the model's input",
                          received, f"Got shape {tuple(shape)}.")

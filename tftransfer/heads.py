"""Task heads and their `"auto"` losses and metrics.

- `classification`: softmax over `num_classes` (>= 2); integer class ids;
  sparse categorical cross-entropy (label smoothing supported); accuracy, and
  top-5 accuracy above 10 classes.
- `multi_label`: sigmoid per label (`num_classes=1` for a binary problem);
  multi-hot 0/1 vectors; binary cross-entropy; binary accuracy, AUC.
- `regression`: linear, `num_classes` values (default 1); floats; mean squared
  error; mean absolute error.
"""

import keras

from tftransfer._checks import check_choice, check_int_sequence, check_probability, invalid, is_int
from tftransfer.tasks import ACTIVATIONS, check_task


@keras.saving.register_keras_serializable(package="tftransfer")
class SparseCategoricalCrossentropy(keras.losses.Loss):
    """Cross-entropy on integer labels, with label smoothing.

    Keras's own sparse loss has no `label_smoothing`; this one one-hot encodes
    the labels and smooths them.

    Args:
        num_classes: Integer, the number of classes.
        label_smoothing: Float in [0, 1). Defaults to `0.0`.
        from_logits: Boolean. Defaults to `False` (the head outputs softmax).
    """

    def __init__(self, num_classes, label_smoothing=0.0, from_logits=False,
                 name="sparse_categorical_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.label_smoothing = float(label_smoothing)
        self.from_logits = from_logits

    def call(self, y_true, y_pred):
        y_true = keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,))
        one_hot = keras.ops.one_hot(y_true, self.num_classes, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            one_hot, y_pred, from_logits=self.from_logits, label_smoothing=self.label_smoothing
        )

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "label_smoothing": self.label_smoothing, "from_logits": self.from_logits}


def _classification_loss(num_classes, label_smoothing):
    if label_smoothing:
        return SparseCategoricalCrossentropy(num_classes, label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy()


def _classification_metrics(num_classes):
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    if num_classes > 10:
        metrics.append(keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5_accuracy"))
    return metrics


# Loss and metrics of each task's head.
_HEADS = {
    "classification": {"loss": _classification_loss, "metrics": _classification_metrics},
    "multi_label": {
        "loss": lambda n, s: keras.losses.BinaryCrossentropy(label_smoothing=s),
        "metrics": lambda n: [keras.metrics.BinaryAccuracy(name="binary_accuracy"),
                              keras.metrics.AUC(multi_label=True, num_labels=n, name="auc")],
    },
    "regression": {
        "loss": lambda n, s: keras.losses.MeanSquaredError(),
        "metrics": lambda n: [keras.metrics.MeanAbsoluteError(name="mae")],
    },
}


POOLINGS = ("avg", "max")


def check_num_classes(num_classes, task):
    """Validates and defaults `num_classes` for `task`; returns an `int`.

    numpy integers are accepted. One class is refused for `"classification"`:
    a softmax over one output is constantly 1.0 and learns nothing.
    """
    if num_classes is None and task == "regression":
        return 1
    if not is_int(num_classes) or num_classes < 1:
        raise invalid("num_classes", "an integer >= 1 (>= 2 for task='classification'; None "
                      "means 1 for task='regression')", num_classes)
    if task == "classification" and num_classes == 1:
        raise invalid("num_classes", ">= 2 for task='classification' (a softmax over one class "
                      "always outputs 1.0 and learns nothing)", num_classes,
                      "For a binary problem use num_classes=2, or task=\"multi_label\" with "
                      "num_classes=1 (one sigmoid output, labels 0/1 of shape [n, 1]).")
    return int(num_classes)


def build_head(feature_shape, num_classes, *, task="classification", hidden_units=(),
               dropout=0.0, regularizer=None, pooling="avg", dtype=None):
    """The task head on features of `feature_shape`, as a `keras.Sequential`.

    Args:
        feature_shape: Shape of the backbone's features without the batch
            axis, `(d,)` or `(h, w, c)` (pooled first).
        num_classes: Integer, number of classes / labels / regression values.
        task: String, `"classification"`, `"multi_label"` or `"regression"`.
        hidden_units: Integer or sequence of integers, widths of ReLU layers
            before the output layer (`64` means `(64,)`). Defaults to `()`.
        dropout: Float in [0, 1), dropout before each dense layer.
        regularizer: Optional Keras regularizer for the head's kernels.
        pooling: `"avg"` or `"max"`, how feature maps are pooled.
        dtype: Optional dtype policy of the hidden layers; the output layer
            always computes in float32.

    Returns:
        A built `keras.Sequential` named `"head"`; its last layer is
        `"predictions"`.
    """
    task = check_task(task)
    num_classes = check_num_classes(num_classes, task)
    check_probability(dropout, "dropout")
    check_choice(pooling, "pooling", POOLINGS)
    layers = [keras.Input(tuple(feature_shape), name="features")]
    layers += _pool(feature_shape, pooling, dtype)
    for i, units in enumerate(check_int_sequence(hidden_units, "hidden_units")):
        layers += _dropout(dropout, f"head_dropout_{i}")
        layers.append(keras.layers.Dense(units, activation="relu", kernel_regularizer=regularizer,
                                         name=f"head_dense_{i}", dtype=dtype))
    layers += _dropout(dropout, "head_dropout")
    layers.append(keras.layers.Dense(num_classes, activation=ACTIVATIONS[task],
                                     kernel_regularizer=regularizer, name="predictions",
                                     dtype="float32"))
    return keras.Sequential(layers, name="head")


def _pool(feature_shape, pooling, dtype):
    if len(feature_shape) == 1:
        return []
    if len(feature_shape) != 3:
        raise ValueError(
            f"The backbone's features must be [batch, d] or [batch, h, w, c]; "
            f"got shape {(None, *feature_shape)}. Pass `output_layer=` to cut it elsewhere."
        )
    layers = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}
    return [layers[pooling](name="head_pool", dtype=dtype)]


def _dropout(rate, name):
    return [keras.layers.Dropout(rate, name=name)] if rate else []


def auto_loss(task, num_classes, label_smoothing=0.0):
    """The loss a head of `task` trains with."""
    label_smoothing = check_probability(label_smoothing, "label_smoothing")
    return _HEADS[check_task(task)]["loss"](num_classes, label_smoothing)


def auto_metrics(task, num_classes):
    """The metrics reported for a head of `task`."""
    return _HEADS[check_task(task)]["metrics"](num_classes)

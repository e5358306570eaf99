"""Objective metrics on integer class labels: AUC, macro F1, precision at recall.

Keras's `AUC`, `F1Score` and `PrecisionAtRecall` compare `y_true` and
`y_pred` of the same shape; a classifier trained on integer labels gets
them one-hot here first. Each is registered, so a saved model reloads.
"""

import keras


def _one_hot(y_true, y_pred):
    """Integer labels `[b]` or `[b, 1]` -> one-hot like `y_pred`; others unchanged."""
    classes = y_pred.shape[-1]
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == classes:
        return keras.ops.cast(y_true, y_pred.dtype)
    labels = keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,))
    return keras.ops.one_hot(labels, classes, dtype=y_pred.dtype)


@keras.saving.register_keras_serializable(package="tftransfer")
class SparseAUC(keras.metrics.AUC):
    """`keras.metrics.AUC` over the one-hot labels (micro-averaged ROC AUC)."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            sample_weight = keras.ops.reshape(sample_weight, (-1, 1))
        return super().update_state(_one_hot(y_true, y_pred), y_pred, sample_weight)


@keras.saving.register_keras_serializable(package="tftransfer")
class SparseF1Score(keras.metrics.F1Score):
    """`keras.metrics.F1Score` on integer labels (its threshold picks the top class)."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(_one_hot(y_true, y_pred), y_pred, sample_weight)


@keras.saving.register_keras_serializable(package="tftransfer")
class SparsePrecisionAtRecall(keras.metrics.PrecisionAtRecall):
    """`keras.metrics.PrecisionAtRecall` over the one-hot labels."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            sample_weight = keras.ops.reshape(sample_weight, (-1, 1))
        return super().update_state(_one_hot(y_true, y_pred), y_pred, sample_weight)


def make(name, recall=0.8):
    """A fresh metric named `name` (`auc`, `macro_f1`, `precision_at_recall`)."""
    if name == "auc":
        return SparseAUC(name="auc")
    if name == "macro_f1":
        return SparseF1Score(average="macro", threshold=None, name="macro_f1")
    if name == "precision_at_recall":
        return SparsePrecisionAtRecall(recall, name="precision_at_recall")
    raise ValueError(f"Unknown objective metric for `name`; allowed values: auc, macro_f1, "
                     f"precision_at_recall. Received: name={name!r}")

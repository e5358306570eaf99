"""Evaluation reports and pictures: per-class metrics, confusion matrix, curves.

Example:

>>> report = evaluate_classifier(model, (x_test, y_test), class_names=names)
>>> print(format_report(report))
"""

import os

import numpy as np
import tensorflow as tf
from sklearn import metrics as skm

from tftransfer.distribute import in_multi_worker_mode


def _predict(model, data):
    """Returns `(y_true, y_pred)` class ids for arrays or a batched dataset."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        return np.asarray(y).reshape(-1), np.argmax(model.predict(x, verbose=0), axis=-1)
    if hasattr(data, "validation") and hasattr(data, "class_names"):
        data = data.validation
    if not isinstance(data, tf.data.Dataset):
        raise ValueError(
            "`data` must be a tuple (x, y), a batched tf.data.Dataset or an ImageData. "
            f"Received: data of type {type(data).__name__}"
        )
    predict = model.predict_on_batch
    if in_multi_worker_mode(model.distribute_strategy):
        # There `predict_on_batch` gathers the batches of every worker.
        def predict(x):
            return np.asarray(model(x, training=False))
    truth, predicted = [], []
    for batch in data:
        truth.append(np.asarray(batch[1]).reshape(-1))
        predicted.append(np.argmax(predict(batch[0]), axis=-1))
    return np.concatenate(truth), np.concatenate(predicted)


def evaluate_classifier(model, data, class_names=None):
    """Accuracy, per-class precision / recall / F1 and a confusion matrix.

    Args:
        model: A classifier whose output is one score per class.
        data: A tuple `(x, y)` with integer labels, a batched dataset of
            `(images, labels)`, or an `ImageData` (its validation split).
        class_names: Optional list of names; defaults to the model's
            `class_names`, else `"0"`, `"1"`, ...

    Returns:
        A dict with `accuracy` (float), `class_names`, `per_class` (a list
        of dicts with `name`, `precision`, `recall`, `f1`, `support`),
        `macro_f1` and `confusion_matrix` (rows: true, columns: predicted).
    """
    y_true, y_pred = _predict(model, data)
    num_classes = int(model.output_shape[-1])
    class_names = class_names or getattr(model, "class_names", None)
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    labels = list(range(num_classes))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    per_class = [
        {"name": n, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for n, p, r, f, s in zip(names, precision, recall, f1, support)
    ]
    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "macro_f1": float(np.mean(f1)),
        "class_names": names,
        "per_class": per_class,
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels),
    }


def format_report(report):
    """Renders `evaluate_classifier`'s result as a plain-text table."""
    width = max([len(c["name"]) for c in report["per_class"]] + [5])
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for c in report["per_class"]:
        lines.append(f"{c['name']:<{width}}  {c['precision']:>9.3f}  {c['recall']:>6.3f}"
                     f"  {c['f1']:>5.3f}  {c['support']:>7}")
    lines.append(f"accuracy {report['accuracy']:.3f}   macro F1 {report['macro_f1']:.3f}")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history, path):
    """Writes loss and the main metric per epoch, both stages, to a PNG."""
    plt = _pyplot()
    hist = history.history
    metric = next((k for k in hist if not k.startswith("val_") and k != "loss"
                   and k != "learning_rate"), None)
    panels = ["loss"] + ([metric] if metric else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    epochs = np.arange(1, len(hist["loss"]) + 1)
    boundary = getattr(history, "stages", {}).get("fine_tune", (None,))[0]
    for ax, key in zip(axes[0], panels):
        ax.plot(epochs, hist[key], "o-", label=f"train {key}")
        if f"val_{key}" in hist:
            ax.plot(epochs, hist[f"val_{key}"], "s--", label=f"validation {key}")
        if boundary and boundary < len(epochs):
            ax.axvline(boundary + 0.5, color="gray", linestyle=":", label="unfreeze")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# Beyond this many classes the matrix is drawn as an image: no names, no counts per cell.
_LABELLED_CLASSES = 30


def plot_confusion_matrix(report, path):
    """Writes the confusion matrix of `evaluate_classifier` to a PNG.

    Up to 30 classes, each cell shows its count and the axes the class
    names; with more, the matrix is one compact image (row-normalized, so
    each row shows where a class's images went) of fixed size, drawn in
    about the same time for 1,000 classes as for 31.
    """
    plt = _pyplot()
    matrix, names = np.asarray(report["confusion_matrix"]), report["class_names"]
    labelled = len(names) <= _LABELLED_CLASSES
    size = max(4, 0.5 * len(names) + 2) if labelled else 10
    fig, ax = plt.subplots(figsize=(size, size))
    if labelled:
        _labelled_cells(ax, matrix, names)
    else:
        rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(rows, cmap="Blues", interpolation="nearest", aspect="auto")
        fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set_xlabel("predicted" if labelled else "predicted class index")
    ax.set_ylabel("true" if labelled else "true class index")
    ax.set_title(f"accuracy {report['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _labelled_cells(ax, matrix, names):
    """Draws a small matrix with class names and one count per cell."""
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for (i, j), value in np.ndenumerate(matrix):
        color = "white" if value > matrix.max() / 2 else "black"
        ax.text(j, i, str(value), ha="center", va="center", color=color)


def write_training_plots(model, history, validation, output_dir, class_names=None):
    """Writes `curves.png` and, for classifiers with validation data,
    `confusion_matrix.png` into `output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    written = [plot_curves(history, os.path.join(output_dir, "curves.png"))]
    is_classifier = getattr(model, "task", None) == "classification"
    if validation is not None and is_classifier:
        report = evaluate_classifier(model, validation, class_names or model.class_names)
        written.append(plot_confusion_matrix(report, os.path.join(output_dir, "confusion_matrix.png")))
    return written

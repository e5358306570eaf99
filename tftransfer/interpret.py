"""Error analysis of a classifier: top losses, most confused pairs, Grad-CAM.

`interpret(model, data)` predicts `data` once and answers fastai's questions
("which images does it get wrong, and how badly?"): `top_losses(k)` with file
paths, true and predicted labels and scores, `most_confused()`, and
`gradcam(images)`, the class-activation map of the last spatial layer of the
backbone, found by itself even when the backbone is a model nested in the
`FineTuner`. For an opaque backbone (a `HubLayer`, whose feature maps are out
of reach) it falls back to gradient saliency on the input and says so in the
result's `method`. `plot_top_losses(path)` writes a PNG grid with heat maps.

Example:

>>> result = interpret(model, "digits/")            # a folder of class subfolders
>>> result.top_losses(3)[0]
{'index': 17, 'path': 'digits/six/3.png', 'label': 'six', 'predicted': 'five', ...}
>>> result.most_confused()[:1]
[('six', 'five', 4)]
>>> result.plot_top_losses("top_losses.png", k=9)
"""

import os

import keras
import numpy as np
import tensorflow as tf

from tftransfer import _folders, _images
from tftransfer.layers import HubLayer

_EPSILON = 1e-7


def interpret(model, data, *, class_names=None, batch_size=32):
    """Predicts `data` once and returns an `Interpretation` of the errors.

    Args:
        model: A classifier taking 0-255 images and returning class
            probabilities: a `FineTuner` (Grad-CAM needs one) or any
            `keras.Model`.
        data: A folder with one subfolder of images per class (then results
            carry file paths), a tuple `(x, y)` of images and integer labels,
            a batched `tf.data.Dataset` of `(images, labels)`, or an
            `ImageData` (its validation split, else its train split).
        class_names: Optional list of names; defaults to the model's
            `class_names`, the folder's or the `ImageData`'s.
        batch_size: Integer >= 1. Defaults to `32`.

    Returns:
        An `Interpretation`.
    """
    if getattr(model, "task", "classification") != "classification":
        raise ValueError("`interpret` analyses single-label classifiers (softmax output). "
                         f"Received: model with task={model.task!r}")
    images, labels, paths, names = _load(data, model, batch_size)
    known = class_names or getattr(model, "class_names", None)
    if known and paths and names:  # a folder's classes, matched to the model's by name
        labels, names = _relabelled(labels, names, list(known)), None
    names = known or names
    scores = np.asarray(model.predict(images, batch_size=batch_size, verbose=0), np.float64)
    if names is None:
        names = [str(i) for i in range(scores.shape[-1])]
    return Interpretation(model, images, labels, scores, list(names), paths)


class Interpretation:
    """Predictions of a classifier on a labelled set, for error analysis.

    Attributes:
        images: float32 `[n, H, W, C]` 0-255 pixels, as the model saw them.
        labels / predicted: int `[n]` true and predicted class ids.
        scores: `[n, classes]` probabilities.
        losses: `[n]` cross-entropy of each image.
        paths: List of `n` file paths, or None.
        class_names: List of names.
    """

    def __init__(self, model, images, labels, scores, class_names, paths=None):
        self.model, self.images, self.labels = model, images, np.asarray(labels, np.int64)
        self.scores, self.class_names, self.paths = scores, class_names, paths
        self.predicted = np.argmax(scores, axis=-1)
        true_scores = scores[np.arange(len(self.labels)), self.labels]
        self.losses = -np.log(np.clip(true_scores, _EPSILON, 1.0))

    def top_losses(self, k=9):
        """The `k` images with the highest loss, highest first.

        Returns:
            A list of dicts: `index`, `path` (or None), `label` and
            `predicted` (names), `score` (probability of the prediction),
            `true_score` (probability of the true class) and `loss`.
        """
        order = np.argsort(-self.losses, kind="stable")[:_check_k(k)]
        return [self._row(int(i)) for i in order]

    def _row(self, i):
        return {"index": i, "path": self.paths[i] if self.paths else None,
                "label": self.class_names[self.labels[i]],
                "predicted": self.class_names[self.predicted[i]],
                "score": float(self.scores[i, self.predicted[i]]),
                "true_score": float(self.scores[i, self.labels[i]]),
                "loss": float(self.losses[i])}

    def confusion_matrix(self):
        """Integer `[classes, classes]` counts; rows true, columns predicted."""
        n = len(self.class_names)
        matrix = np.zeros((n, n), np.int64)
        np.add.at(matrix, (self.labels, self.predicted), 1)
        return matrix

    def most_confused(self, min_count=1):
        """`(true, predicted, count)` of the off-diagonal cells, most first."""
        matrix = self.confusion_matrix()
        pairs = [(self.class_names[t], self.class_names[p], int(matrix[t, p]))
                 for t, p in zip(*np.nonzero(matrix)) if t != p and matrix[t, p] >= min_count]
        return sorted(pairs, key=lambda pair: -pair[2])

    @property
    def is_text(self):
        """Whether the inputs are texts (no heat maps then)."""
        return self.images.dtype == object

    def gradcam(self, indices=None, layer=None):
        """`gradcam` of some of the images (default: the top 9 losses), for
        their predicted class."""
        if self.is_text:
            raise ValueError("`gradcam` needs an image model; this interpretation holds texts "
                             "(use `top_losses` to read them). Received: text inputs")
        if indices is None:
            indices = [row["index"] for row in self.top_losses(9)]
        indices = np.asarray(indices, np.int64)
        return gradcam(self.model, self.images[indices], layer=layer,
                       class_index=self.predicted[indices])

    def plot_top_losses(self, path, k=9, heatmap=True, layer=None):
        """Writes a PNG grid of the top losses (with Grad-CAM overlays).

        Returns:
            `path`.
        """
        rows = self.top_losses(k)
        maps = self.gradcam([r["index"] for r in rows], layer) if heatmap and rows else None
        titles = [f"{r['label']} -> {r['predicted']}\nloss {r['loss']:.2f} p {r['score']:.2f}"
                  for r in rows]
        return plot_grid(path, self.images[[r["index"] for r in rows]], titles,
                         None if maps is None else maps["heatmaps"])


def _check_k(k):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1. Received: k={k!r}")
    return int(k)


# ---------------------------------------------------------------- data


def _load(data, model, batch_size):
    """`(images, labels, paths, class_names)` of any accepted form of data."""
    if isinstance(data, (str, os.PathLike)):
        return _from_folder(os.fspath(data), model)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return _inputs(np.asarray(data[0])), np.asarray(data[1]).reshape(-1), None, None
    names = None
    if hasattr(data, "class_names") and hasattr(data, "train"):  # ImageData
        names = data.class_names
        data = data.validation if data.validation is not None else data.train
    if isinstance(data, tf.data.Dataset):
        batches = [(np.asarray(b[0]), np.asarray(b[1]).reshape(-1)) for b in data]
        return (_inputs(np.concatenate([b[0] for b in batches])),
                np.concatenate([b[1] for b in batches]), None, names)
    raise ValueError("`data` must be a folder of class subfolders, a tuple (x, y), a batched "
                     f"tf.data.Dataset or an ImageData. Received: data of type "
                     f"{type(data).__name__}")


def _inputs(x):
    """Images as float32 pixels; texts (strings or bytes) kept as an object array of str."""
    if x.dtype.kind in "OSU":
        return np.asarray([v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                           for v in x.reshape(-1)], dtype=object)
    return x.astype(np.float32)


def _from_folder(root, model):
    if not os.path.isdir(root):
        raise ValueError(f"`data` names a folder that does not exist. Received: data={root!r}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    listing = _folders.list_images(root, classes)
    if not listing.paths:
        raise ValueError("`data` must be a folder with one subfolder of images per class. "
                         f"Received: data={root!r}")
    height, width, channels = model.input_shape[1:4]

    def decode(path):
        return _images.decode(tf.io.read_file(path), channels, (height, width))

    images = tf.data.Dataset.from_tensor_slices(listing.paths).map(decode).batch(64)
    x = np.concatenate([batch.numpy() for batch in images])
    return x, listing.labels, list(listing.paths), classes


def _relabelled(labels, folders, class_names):
    """Folder label ids -> the model's ids of the same class names."""
    missing = sorted(set(folders) - set(class_names))
    if missing:
        raise ValueError(f"`data` has class folders the model does not know: {missing}; allowed "
                         f"values: {class_names}. Received: data with classes {folders}")
    lookup = np.asarray([class_names.index(name) for name in folders], np.int64)
    return lookup[np.asarray(labels, np.int64)]


# ---------------------------------------------------------------- Grad-CAM


def gradcam(model, images, *, layer=None, class_index=None):
    """Where the model looks: Grad-CAM heat maps, or input saliency.

    For a `FineTuner` whose backbone is a Keras model, the heat map is
    Grad-CAM (Selvaraju et al.) of `layer` of the backbone, by default the
    last one with a spatial (4-D) output. For a backbone with an opaque
    `HubLayer` (or a model that is no `FineTuner`), it is the gradient
    saliency of the class score on the input pixels.

    Args:
        model: A `FineTuner` (or a `keras.Model` of 0-255 images).
        images: float `[n, H, W, C]` or one `[H, W, C]` image, 0-255.
        layer: Optional name of a backbone layer with a 4-D output.
        class_index: Optional integer or `[n]` integers, the class explained;
            defaults to the predicted one.

    Returns:
        A dict: `heatmaps` (float32 `[n, H, W]` in [0, 1], at the input
        size), `class_index` (`[n]`), `method` (`"gradcam"` or
        `"saliency"`) and `layer` (the layer's name, or None).
    """
    images = np.asarray(images, np.float32)
    images = images[None] if images.ndim == 3 else images
    backbone = getattr(model, "backbone", None)
    name = _spatial_layer(backbone, layer) if backbone is not None else None
    if name is None:
        if layer is not None:
            raise ValueError(f"`layer` needs a FineTuner with a Keras backbone. Received: "
                             f"layer={layer!r}")
        maps, classes = _saliency(model, images, class_index)
        return {"heatmaps": maps, "class_index": classes, "method": "saliency", "layer": None}
    maps, classes = _gradcam(model, name, images, class_index)
    if maps is None:  # the layer's recorded output is not on this backbone's own path
        if layer is not None:
            raise ValueError(f"`layer` must feed this backbone's output; {layer!r} belongs to "
                             f"another graph of a nested model. Received: layer={layer!r}")
        maps, classes = _saliency(model, images, class_index)
        return {"heatmaps": maps, "class_index": classes, "method": "saliency", "layer": None}
    return {"heatmaps": maps, "class_index": classes, "method": "gradcam", "layer": name}


def _spatial_layer(backbone, layer):
    """The backbone layer Grad-CAM uses, or None for an opaque backbone."""
    layers = getattr(backbone, "layers", [])
    if any(isinstance(candidate, HubLayer) for candidate in layers) \
            or not isinstance(backbone, keras.Model) or not hasattr(backbone, "inputs"):
        return None
    spatial = [candidate.name for candidate in layers
               if not isinstance(candidate, keras.layers.InputLayer)
               and len(candidate.output.shape) == 4]
    if layer is None:
        return spatial[-1] if spatial else None
    if layer not in spatial:
        raise ValueError(f"`layer` must name a backbone layer with a 4-D output; allowed "
                         f"values: {spatial}. Received: layer={layer!r}")
    return layer


def _classes(class_index, scores):
    if class_index is None:
        return np.argmax(np.asarray(scores), axis=-1)
    return np.broadcast_to(np.asarray(class_index, np.int64), (scores.shape[0],)).copy()


def _gradcam(model, name, images, class_index):
    backbone = model.backbone
    split = keras.Model(backbone.inputs, [backbone.get_layer(name).output, backbone.outputs[0]])
    x = tf.convert_to_tensor(images)
    with tf.GradientTape() as tape:
        maps, features = split(model.preprocessing(x), training=False)
        scores = model.head(features, training=False)
        classes = _classes(class_index, scores)
        chosen = tf.gather(scores, classes, axis=1, batch_dims=1)
    grads = tape.gradient(chosen, maps)
    if grads is None:
        return None, classes
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1, keepdims=True))
    cam = tf.image.resize(cam, images.shape[1:3], method="bilinear")[..., 0]
    return _normalized(cam.numpy()), classes


def _saliency(model, images, class_index):
    x = tf.convert_to_tensor(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        scores = model(x, training=False)
        classes = _classes(class_index, scores)
        chosen = tf.gather(scores, classes, axis=1, batch_dims=1)
    grads = tape.gradient(chosen, x)
    return _normalized(tf.reduce_max(tf.abs(grads), axis=-1).numpy()), classes


def _normalized(maps):
    """Each map scaled to [0, 1] (all zeros stay zeros)."""
    maps = maps - maps.min(axis=(1, 2), keepdims=True)
    top = maps.max(axis=(1, 2), keepdims=True)
    return (maps / np.where(top > 0, top, 1.0)).astype(np.float32)


# ---------------------------------------------------------------- pictures


def plot_grid(path, images, titles, heatmaps=None, columns=3):
    """Writes images (0-255) in a grid with titles, heat maps overlaid.

    `path` is a file name or a binary file object.

    Returns:
        `path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(images))
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (ax, image) in enumerate(zip(axes.ravel(), images)):
        pixels = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
        ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray")
        if heatmaps is not None:
            ax.imshow(heatmaps[i], cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    if isinstance(path, (str, os.PathLike)):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)
    return path

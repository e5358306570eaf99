"""Prediction on image files, folders, encoded bytes or arrays.

`predict(model, images)` takes a `FineTuner` (or any Keras image model), a
`.keras` file or a serving export directory, decodes and resizes files with
the very function training (`tftransfer.data`) and the export's
`serving_bytes` signature use, and returns one dict per image. Its command
line is `python -m tftransfer.predict MODEL IMAGE_OR_FOLDER... [--top-k K]
[--csv FILE]`.

Example:

>>> results = predict("runs/a/model.keras", "photos/", top_k=3)
>>> results[0]
{'path': 'photos/a.jpg', 'label': 'cat', 'score': 0.93, 'top_k': [('cat', 0.93), ...]}
"""

import json
import os
import pathlib

import keras
import numpy as np
import tensorflow as tf

from tftransfer import _images, _pipeline
from tftransfer.export import _contract
from tftransfer.export.verify import VerifyError, resolve_version_dir
from tftransfer.model import FineTuner
from tftransfer.predict import _text

_TASKS = _contract.TASKS


def predict(model, images, *, top_k=1, batch_size=32, verbose="auto"):
    """Predicts labels and scores for images.

    Args:
        model: A `FineTuner` (or a Keras model taking 0-255 images), a path
            to a `.keras` file, or a serving export (a version directory or
            its base directory, whose highest version is used).
        images: A path to an image file or a folder of images (searched
            recursively), a list of paths, encoded image bytes (JPEG, PNG,
            GIF, BMP, WebP) or a list of them, or an array of images
            `[n, H, W, C]` (or one `[H, W, C]`) with raw pixels in 0-255.
        top_k: Integer >= 1, how many `(label, score)` pairs `top_k` holds.
            Defaults to `1`.
        batch_size: Integer >= 1. Defaults to `32`.
        verbose: `"auto"` (a progress bar for more than one batch), 0 or 1.

    Returns:
        A list with one dict per image, in order: `label` and `score` (the
        top class and its probability; for multi-label models the top label,
        and `labels`, every label scoring 0.5 or more; for regression
        `label` is None and `score` the first value, all in `values`),
        `top_k` (a list of `(label, score)`), and `path` for files.

    Raises:
        ValueError: On a bad argument, a missing file or an image that
            cannot be decoded (the error names it).
    """
    top_k = _check_positive_int("top_k", top_k)
    batch_size = _check_positive_int("batch_size", batch_size)
    predictor = _Predictor.of(model)
    if predictor.text:  # a text model: sentences, .txt files or folders of them
        items = _text.text_items(images)
        batches, count = _text.text_batches(items, batch_size), len(items)
        paths = [path if path else None for _, path in items]
    else:
        batches, paths, count = _inputs(images, predictor, batch_size)
    progress = keras.utils.Progbar(count, unit_name="image") if _show(verbose, count,
                                                                     batch_size) else None
    results = []
    for batch in batches:
        scores = predictor(batch)
        results += [_result(row, predictor, top_k) for row in scores]
        if progress is not None:
            progress.update(len(results))
    for result, path in zip(results, paths or []):
        result["path"] = path
    if predictor.text:
        for result, (text, path) in zip(results, items):
            if path is None:  # a sentence, not a file
                del result["path"]
                result["text"] = text
    return results


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")
    return int(value)


def _show(verbose, count, batch_size):
    return verbose == 1 or (verbose == "auto" and count > batch_size)


# ---------------------------------------------------------------- the model


class _Predictor:
    """A model that maps float 0-255 images to scores, and what it predicts."""

    def __init__(self, call, input_shape, class_names, task, warn_range=None):
        self.call, self.input_shape = call, tuple(input_shape)
        self.task, self.class_names = task, list(class_names)
        self.warn_range = warn_range
        self.text = self.input_shape == ()  # strings [batch] in

    def __call__(self, images):
        dtype = tf.string if self.text else tf.float32
        return np.asarray(self.call(tf.convert_to_tensor(images, dtype)), dtype="float64")

    @classmethod
    def of(cls, model):
        if isinstance(model, keras.Model):
            return cls._keras(model)
        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            if os.path.isfile(path) and path.endswith(".keras"):
                return cls._keras(keras.saving.load_model(path, compile=False))
            if os.path.isdir(path):
                return cls._export(path)
            if not os.path.exists(path):
                raise ValueError(f"`model` names a path that does not exist. "
                                 f"Received: model={path!r}")
        raise ValueError(
            "`model` must be a FineTuner (or keras.Model), a .keras file or a serving export "
            f"directory. Received: model={model!r}"
        )

    @classmethod
    def _keras(cls, model):
        n = int(model.output_shape[-1])
        names = getattr(model, "class_names", None) or [str(i) for i in range(n)]
        task = getattr(model, "task", None) or _infer_task(model)
        warn = model.warn_if_unit_range if isinstance(model, FineTuner) else None
        return cls(lambda x: model(x, training=False), model.input_shape[1:], names, task, warn)

    @classmethod
    def _export(cls, path):
        try:
            version = resolve_version_dir(path)
        except VerifyError as e:
            raise ValueError(f"`model` is a directory but not a serving export ({e}). "
                             f"Received: model={path!r}") from None
        loaded = tf.saved_model.load(str(version))
        signature = loaded.signatures[_contract.DEFAULT_SIGNATURE]
        inputs = signature.structured_input_signature[1]
        name = _contract.TEXTS_INPUT if _contract.TEXTS_INPUT in inputs else _contract.IMAGES_INPUT
        spec = inputs[name]
        meta = _read_json(version / "assets.extra" / _contract.METADATA_FILE)
        names = (version / "assets" / _contract.LABELS_FILE).read_text().splitlines()
        task = meta.get("task", "classification")

        def call(images):
            outputs = signature(**{name: images})
            key = next(k for k in _contract.PRIMARY_OUTPUTS if k in outputs)
            return outputs[key]

        predictor = cls(call, spec.shape[1:], names, task)
        predictor.loaded = loaded  # keeps the SavedModel's variables alive
        return predictor


def _infer_task(model):
    activation = getattr(getattr(model.layers[-1], "activation", None), "__name__", "")
    return {"softmax": "classification", "sigmoid": "multi_label"}.get(activation, "regression")


def _read_json(path):
    return json.loads(path.read_text()) if path.exists() else {}


def _result(scores, predictor, top_k):
    names = predictor.class_names
    if predictor.task == "regression":
        return {"label": None, "score": float(scores[0]), "values": [float(v) for v in scores],
                "top_k": []}
    order = np.argsort(-scores, kind="stable")[:top_k]
    pairs = [(names[i], float(scores[i])) for i in order]
    result = {"label": pairs[0][0], "score": pairs[0][1], "top_k": pairs}
    if predictor.task == "multi_label":
        result["labels"] = [names[i] for i in np.flatnonzero(scores >= 0.5)]
    return result


# ---------------------------------------------------------------- the images


def _inputs(images, predictor, batch_size):
    """`(batches of float32 images, paths or None, count)` for any `images` form."""
    height, width, channels = predictor.input_shape
    if isinstance(images, (np.ndarray, tf.Tensor)):
        return _arrays(np.asarray(images), predictor, batch_size)
    if isinstance(images, (bytes, bytearray)):
        images = [bytes(images)]
    if isinstance(images, (str, os.PathLike)):
        images = files_of(os.fspath(images))
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(
            "`images` must be a path to an image or a folder, a list of paths, encoded image "
            f"bytes (or a list of them) or an array [n, H, W, C]. Received: images={images!r}"
        )
    if all(isinstance(i, (bytes, bytearray)) for i in images):
        sources, paths = [bytes(i) for i in images], None
        names = [f"images[{i}]" for i in range(len(sources))]
    elif all(isinstance(i, (str, os.PathLike)) for i in images):
        sources = paths = names = [_existing(os.fspath(p)) for p in images]
    else:
        raise ValueError("`images` must be all paths or all bytes, not a mix. "
                         f"Received: images={images[:3]!r}...")
    decode = _decoder(paths is not None, channels, (height, width))
    return _decoded_batches(sources, names, decode, batch_size), paths, len(sources)


def _arrays(array, predictor, batch_size):
    if array.ndim == len(predictor.input_shape):
        array = array[None]
    if array.ndim != len(predictor.input_shape) + 1 or array.shape[0] == 0:
        raise ValueError(
            f"`images` as an array must be [n, {', '.join(map(str, predictor.input_shape))}] "
            f"(or one image). Received: images=array(shape={array.shape}, dtype={array.dtype})"
        )
    if predictor.warn_range is not None:
        predictor.warn_range(array, "images")
    if tuple(array.shape[1:]) != predictor.input_shape:
        array = np.stack([_images.fit_image(tf.convert_to_tensor(a), predictor.input_shape[-1],
                                            predictor.input_shape[:2]).numpy() for a in array])
    array = array.astype("float32")
    return (array[i:i + batch_size] for i in range(0, len(array), batch_size)), None, len(array)


def files_of(path):
    """The image files a path names: itself, or a folder's, recursively and sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"`images` names a path that does not exist. Received: images={path!r}")
    found = sorted(str(p) for p in pathlib.Path(path).rglob("*")
                   if p.is_file() and p.suffix.lower() in _images.EXTENSIONS)
    if not found:
        raise ValueError(f"`images` is a folder with no image files ({', '.join(_images.EXTENSIONS)})."
                         f" Received: images={path!r}")
    return found


def _existing(path):
    if not os.path.isfile(path):
        raise ValueError(f"`images` names a file that does not exist. Received: {path!r}")
    return path


def _decoder(from_files, channels, size):
    def decode(source):
        data = tf.io.read_file(source) if from_files else source
        return _images.decode(data, channels, size)

    return decode


def _decoded_batches(sources, names, decode, batch_size):
    """Decodes in parallel (tf.data); a file that fails is named in the error."""
    dataset = _pipeline.steady(tf.data.Dataset.from_tensor_slices(sources)
                               .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
                               .batch(batch_size).prefetch(tf.data.AUTOTUNE))
    done = 0
    try:
        for batch in dataset:
            done += int(batch.shape[0])
            yield batch.numpy()
    except tf.errors.InvalidArgumentError:
        for source, name in zip(sources[done:], names[done:]):
            try:
                decode(tf.constant(source))
            except tf.errors.InvalidArgumentError as e:
                message = (e.message or "").strip().splitlines()[0]
                raise ValueError(
                    f"Cannot decode the image {name!r} ({message}). Formats read: "
                    f"{', '.join(_images.EXTENSIONS)}. Received: images=[..., {name!r}, ...]"
                ) from None
        raise

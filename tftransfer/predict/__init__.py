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

import functools
import json
import os
import tempfile
import warnings
import zipfile

import keras
import numpy as np
import tensorflow as tf

from tftransfer import _folders, _images, _pipeline, tasks
from tftransfer import tta as tta_views
from tftransfer.export import _contract
from tftransfer.export.verify import VerifyError, resolve_version_dir
from tftransfer.model import FineTuner, unit_range_message
from tftransfer.predict import _text, _tflite


def predict(model, images, *, top_k=1, batch_size=32, verbose="auto", tta=False):
    """Predicts labels and scores for images.

    Args:
        model: A `FineTuner` (or a Keras model taking 0-255 images), a path
            to a `.keras` file, or a serving export (a version directory or
            its base directory, whose highest version is used).
        images: A path to an image file or a folder of images (searched
            recursively), a list of such paths, encoded image bytes (JPEG,
            PNG, GIF, BMP, WebP) or a list of them, or an array of images
            `[n, H, W, C]` (or one `[H, W, C]`; `[n, H, W]` for a gray
            model) of raw pixels in 0-255: uint8, or float without NaN.
            Folders follow the listing rule of `from_directory` (hidden
            files and folders ignored, files that are not readable images
            skipped and named).
        top_k: Integer >= 1, how many `(label, score)` pairs `top_k` holds.
            Defaults to `1`.
        batch_size: Integer >= 1. Defaults to `32`.
        verbose: `"auto"` (a progress bar for more than one batch), 0 or 1.
        tta: Test-time augmentation (`tftransfer.tta`): True averages the
            scores of each image, its horizontal flip and four corner crops;
            a list such as `["crops"]` picks views. Defaults to `False`.

    Returns:
        A `Predictions` list with one dict per readable image, in order,
        and `skipped`, the files that could not be read (also named in a
        warning). Each dict has `label` and `score` (the
        top class and its probability; for multi-label models the top label,
        and `labels`, every label scoring 0.5 or more; for regression
        `label` is None and `score` the first value, all in `values`),
        `top_k` (a list of `(label, score)`), and `path` for files.

    Raises:
        ValueError: On a bad argument, a model that is not one of the forms
            above, a missing path, or encoded bytes that cannot be decoded
            (the error names them).
    """
    top_k = _check_positive_int("top_k", top_k)
    batch_size = _check_positive_int("batch_size", batch_size)
    views = tta_views.resolve(tta)
    predictor = _Predictor.of(model)
    if predictor.text:  # a text model: sentences, .txt files or folders of them
        results = Predictions(_text.predict_texts(predictor, images, top_k, batch_size, _result))
        results.skipped = []
        return results
    source = _inputs(images, predictor, batch_size)
    count = len(source.names)
    progress = keras.utils.Progbar(count, unit_name="image") if _show(verbose, count,
                                                                     batch_size) else None
    results = Predictions()
    for batch, rows in source.batches:
        scores = tta_views.averaged(predictor, batch, views) if views else predictor(batch)
        for row, index in zip(scores, rows):
            results.append(_result(row, predictor, top_k))
            if source.paths is not None:
                results[-1]["path"] = source.paths[index]
        if progress is not None:
            progress.update(len(results))
    results.skipped = source.skipped + [source.names[i] for i in source.failed]
    message = _folders.listing_warning(results.skipped, source.excluded, "the result's `skipped`")
    if message:
        warnings.warn(message, stacklevel=2)
    return results


class Predictions(list):
    """The list `predict` returns, one dict per image, and `skipped`: the
    files left out because they could not be read as images."""

    skipped: list

    def __init__(self, *args):
        super().__init__(*args)
        self.skipped = []


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
            if os.path.isfile(path) and path.lower().endswith(".keras"):
                return cls._keras(_load_keras_file(path))
            if os.path.isfile(path) and path.lower().endswith(".tflite"):
                return cls(*_tflite.predictor_args(path), _range_warning(path, None))
            if os.path.isdir(path):
                return cls._export(path)
            if not os.path.exists(path):
                raise ValueError(f"`model` names a path that does not exist. "
                                 f"Received: model={path!r}")
        raise ValueError(
            "`model` must be a FineTuner (or keras.Model), a .keras file, a .tflite file or a "
            f"serving export directory. Received: model={model!r}"
        )

    @classmethod
    def _keras(cls, model):
        n = int(model.output_shape[-1])
        names = tasks.class_names_of(model) or tasks.default_class_names(n)
        task = tasks.task_of(model)
        mode = getattr(model.preprocessing, "mode", None) if isinstance(model, FineTuner) else None
        return cls(lambda x: model(x, training=False), model.input_shape[1:], names, task,
                   _range_warning(model.name, mode))

    @classmethod
    def _export(cls, path):
        try:
            version = resolve_version_dir(path)
        except VerifyError as e:
            raise ValueError(f"`model` is a directory but not a serving export ({e}). "
                             f"Received: model={path!r}") from None
        loaded = tf.saved_model.load(str(version))
        signature = loaded.signatures.get(_contract.DEFAULT_SIGNATURE)
        specs = signature.structured_input_signature[1] if signature is not None else {}
        name = _contract.TEXTS_INPUT if _contract.TEXTS_INPUT in specs else _contract.IMAGES_INPUT
        if name not in specs:
            raise ValueError(
                f"`model` is a SavedModel but not a tftransfer serving export: it has no "
                f"{_contract.DEFAULT_SIGNATURE!r} signature taking {_contract.IMAGES_INPUT!r} "
                "(write one with `tftransfer.export_for_serving`, or pass the .keras file). "
                f"Received: model={path!r}")
        meta = _read_json(version / "assets.extra" / _contract.METADATA_FILE)
        names = _read_labels(version, path, signature)
        task = meta.get("task", "classification")

        def call(images):
            outputs = signature(**{name: images})
            mismatch = _contract.label_mismatch(outputs, names)
            if mismatch:
                raise ValueError(
                    f"The export's {_contract.LABELS_FILE} disagrees with its graph ({mismatch}): "
                    "it was edited after export. Export the model again, or restore "
                    f"{_contract.LABELS_FILE} and {_contract.METADATA_FILE}. Received: "
                    f"model={str(path)!r}")
            key = next(k for k in _contract.PRIMARY_OUTPUTS if k in outputs)
            return outputs[key]

        warn = _range_warning(path, meta.get("preprocessing"))
        predictor = cls(call, specs[name].shape[1:], names, task, warn)
        predictor.loaded = loaded  # keeps the SavedModel's variables alive
        return predictor


def _load_keras_file(path):
    """Loads a `.keras` file (any case of the suffix); a ValueError if it is not one."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"`model` ends in .keras but is not a Keras file (a .keras file is a "
                         f"zip archive written by `model.save`). Received: model={path!r}")
    if path.endswith(".keras"):
        return keras.saving.load_model(path, compile=False)
    with tempfile.TemporaryDirectory() as folder:  # Keras reads only a lower-case suffix
        link = os.path.join(folder, "model.keras")
        os.symlink(os.path.abspath(path), link)
        return keras.saving.load_model(link, compile=False)


def _read_labels(version, path, signature):
    """The export's class names, one per output; a ValueError naming `path` if not."""
    file = version / "assets" / _contract.LABELS_FILE
    names = file.read_text().splitlines() if file.is_file() else None
    outputs = signature.structured_outputs
    key = next((k for k in _contract.PRIMARY_OUTPUTS if k in outputs), None)
    width = outputs[key].shape[-1] if key is not None else None
    if names is None or (width is not None and len(names) < width):
        found = "missing" if names is None else f"{len(names)} line(s)"
        raise ValueError(
            f"`model` is a broken serving export: {file} must hold one class name per line, "
            f"{width} in all ({found}). Export it again with `tftransfer.export_for_serving`. "
            f"Received: model={path!r}")
    return names


def _range_warning(name, mode):
    """A function that warns once when arrays look like 0-1 images."""
    warned = []

    def warn(array, argument):
        if warned or not array.size or not np.issubdtype(array.dtype, np.floating):
            return
        if np.nanmax(array) <= 1.0:
            warned.append(True)
            warnings.warn(unit_range_message(argument, float(np.nanmax(array)), name, mode),
                          stacklevel=4)

    return warn


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


class _Source:
    """Batches of float32 images with their row numbers, and what was left out."""

    def __init__(self, batches, names, paths=None, skipped=(), excluded=None):
        self.batches, self.names, self.paths = batches, names, paths
        self.skipped, self.excluded, self.failed = list(skipped), excluded or {}, []


def _inputs(images, predictor, batch_size):
    """A `_Source` for any `images` form."""
    height, width, channels = predictor.input_shape
    if isinstance(images, (np.ndarray, tf.Tensor)):
        return _arrays(np.asarray(images), predictor, batch_size)
    if isinstance(images, (bytes, bytearray)):
        images = [bytes(images)]
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(
            "`images` must be a path to an image or a folder, a list of paths, encoded image "
            f"bytes (or a list of them) or an array [n, H, W, C]. Received: images={images!r}"
        )
    decode = functools.partial(_images.decode, channels=channels, image_size=(height, width))
    if all(isinstance(i, (bytes, bytearray)) for i in images):
        sources = [bytes(i) for i in images]
        source = _Source(None, [f"images[{i}]" for i in range(len(sources))])
        source.batches = _decoded_batches(sources, decode, batch_size, source, strict=True)
        return source
    if all(isinstance(i, (str, os.PathLike)) for i in images):
        return _files([os.fspath(p) for p in images], decode, batch_size)
    raise ValueError("`images` must be all paths or all bytes, not a mix. "
                     f"Received: images={images[:3]!r}...")


def _files(paths, decode, batch_size):
    """A `_Source` of the image files that files and folders hold (the listing rule)."""
    good, bad, excluded = _folders.list_paths(paths)
    if not good and not bad:
        raise ValueError(f"`images` names no image files ({', '.join(_images.EXTENSIONS)}; "
                         f"hidden files and folders are ignored). Received: images={paths!r}")
    source = _Source(None, good, good, bad, excluded)
    source.batches = _decoded_batches(good, lambda p: decode(tf.io.read_file(p)), batch_size,
                                      source)
    return source


def files_of(path):
    """The readable image files a path names: itself, or a folder's, recursively."""
    return _folders.list_paths([path])[0]


def _arrays(array, predictor, batch_size):
    shape = predictor.input_shape
    if array.ndim in (2, 3) and shape[-1] == 1 and array.shape[-2:] == shape[:2]:
        array = array[..., None]  # gray [H, W] / [n, H, W] for an (H, W, 1) model
    if array.ndim == len(shape):
        array = array[None]
    if array.ndim != len(shape) + 1 or array.shape[0] == 0:
        raise ValueError(
            f"`images` as an array must be [n, {', '.join(map(str, shape))}] "
            f"(or one image). Received: images=array(shape={array.shape}, dtype={array.dtype})"
        )
    array = _images.check_pixels(array, "images")
    if predictor.warn_range is not None:
        predictor.warn_range(array, "images")
    if tuple(array.shape[1:]) != shape:
        array = np.stack([_images.fit_image(tf.convert_to_tensor(a), shape[-1],
                                            shape[:2]).numpy() for a in array])
    array = array.astype("float32")
    rows = np.arange(len(array))
    batches = ((array[i:i + batch_size], rows[i:i + batch_size])
               for i in range(0, len(array), batch_size))
    return _Source(batches, [f"images[{i}]" for i in rows])


def _decoded_batches(sources, decode, batch_size, source, strict=False):
    """`(batch, rows)` decoded in parallel (tf.data). Sources that fail to decode are
    recorded in `source.failed` (files) or raise a ValueError naming them (`strict`)."""
    rows = tf.data.Dataset.from_tensor_slices((sources, np.arange(len(sources))))
    dataset = rows.map(lambda s, i: (decode(s), i), num_parallel_calls=tf.data.AUTOTUNE)
    if not strict:
        dataset = dataset.ignore_errors()
    dataset = _pipeline.steady(dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE))
    done = np.zeros(len(sources), bool)
    try:
        for batch, index in dataset:
            done[index.numpy()] = True
            yield batch.numpy(), index.numpy()
    except tf.errors.InvalidArgumentError:
        name = next((source.names[i] for i in np.flatnonzero(~done) if not _decodes(
            decode, sources[i])), source.names[int(np.argmin(done))])
        raise ValueError(f"Cannot decode the image {name} (not JPEG/PNG/GIF/BMP/WebP, or "
                         f"damaged). Received: images=[..., {name}, ...]") from None
    source.failed.extend(np.flatnonzero(~done).tolist())


def _decodes(decode, data):
    try:
        decode(tf.constant(data))
    except tf.errors.InvalidArgumentError:
        return False
    return True

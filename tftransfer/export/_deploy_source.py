"""What `to_tflite` and `to_onnx` convert, and the images they calibrate and check on.

`resolve(model)` turns a `FineTuner` (or any Keras image model), a `.keras`
file or a serving export directory into a `Source`: the reference function
(float 0-255 images -> scores), its input shape, class names and task, and a
way to write the serving SavedModel the converters read. `images(data, ...)`
turns an `ImageData`, a folder, an array or an `(x, y)` pair into float32
pixels (and labels when known).
"""

import dataclasses
import json
import os
import pathlib

import keras
import numpy as np
import tensorflow as tf

from tftransfer import tasks
from tftransfer.export import _contract

SIGNATURE = _contract.DEFAULT_SIGNATURE
PRIMARY = {"classification": "probabilities", "multi_label": "scores", "regression": "values"}


@dataclasses.dataclass
class Source:
    """A model to convert, seen through its serving function."""

    call: object  # float32 [n, H, W, C] 0-255 -> numpy scores [n, k]
    input_shape: tuple
    class_names: list
    task: str
    write_savedmodel: object  # directory -> None; signature `serving_default`
    module: object = None  # keeps a loaded SavedModel's variables alive


def resolve(model, class_names=None):
    """A `Source` for a Keras model, a `.keras` path or a serving export."""
    if isinstance(model, keras.Model):
        return _keras_source(model, class_names)
    path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    if path and os.path.isfile(path) and path.endswith(".keras"):
        return _keras_source(keras.saving.load_model(path, compile=False), class_names)
    if path and (pathlib.Path(path) / "saved_model.pb").is_file() or (
            path and os.path.isdir(path) and _contract.existing_versions(path)):
        return _export_source(path, class_names)
    raise ValueError(
        "`model` must be a FineTuner (or keras.Model taking 0-255 images), a .keras file or a "
        f"serving export directory written by export_for_serving. Received: model={model!r}")


def _keras_source(model, class_names):
    from tftransfer.export._writer import model_info  # the one reading of a model's own info

    shape = tuple(model.input_shape[1:])
    n = int(model.output_shape[-1])
    info = model_info(model)
    task = tasks.task_of(model)
    names = list(class_names or info.get("class_names") or tasks.default_class_names(n))
    key = PRIMARY[task]
    spec = tf.TensorSpec((None, *shape), tf.float32, name=_contract.IMAGES_INPUT)

    def write(directory):
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            SIGNATURE, lambda images: {key: tf.cast(model(images, training=False), tf.float32)},
            [spec])
        archive.write_out(str(directory), verbose=False)

    def call(images):
        return np.asarray(model.predict_on_batch(np.asarray(images, np.float32)), np.float32)

    return Source(call, shape, names, task, write)


def _export_source(path, class_names):
    from tftransfer.export.verify import resolve_version_dir

    version = resolve_version_dir(path)
    loaded = tf.saved_model.load(str(version))
    signature = loaded.signatures[SIGNATURE]
    spec = signature.structured_input_signature[1][_contract.IMAGES_INPUT]
    meta_path = version / "assets.extra" / _contract.METADATA_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    task = meta.get("task", "classification")
    labels = version / "assets" / _contract.LABELS_FILE
    names = list(class_names or labels.read_text().splitlines())
    key = next(k for k in _contract.PRIMARY_OUTPUTS if k in signature.structured_outputs)
    image_spec = tf.TensorSpec(spec.shape, tf.float32, name=_contract.IMAGES_INPUT)

    def call(images):
        return signature(**{_contract.IMAGES_INPUT: tf.constant(images, tf.float32)})[key].numpy()

    def write(directory):
        module = tf.Module()
        module.loaded = loaded
        serve = tf.function(lambda images: {PRIMARY[task]: signature(images=images)[key]},
                            input_signature=[image_spec])
        tf.saved_model.save(module, str(directory), signatures={SIGNATURE: serve})

    return Source(call, tuple(spec.shape[1:]), names, task, write, module=loaded)


# ------------------------------------------------------------------- images


def images(data, input_shape, *, split, limit, argument):
    """`(x float32 [n, H, W, C] in 0-255, y int [n] or None)` of at most `limit` images.

    Args:
        data: An `ImageData` (its `split`, else its other split), a folder
            (class subfolders give labels; `tftransfer.data.from_directory`'s
            listing), an array `[n, H, W, C]`, an `(x, y)` pair, or a
            `tf.data.Dataset` of `(images, labels)` batches.
        input_shape: `(H, W, C)` the images are fitted to.
        split: "train" or "validation", the `ImageData` split to read first.
        limit: Integer, the most images read.
        argument: The argument's name, for errors.
    """
    from tftransfer.data import ImageData

    if isinstance(data, ImageData):
        other = "validation" if split == "train" else "train"
        dataset = getattr(data, split) or getattr(data, other)
        return _from_dataset(dataset, limit)
    if isinstance(data, (str, os.PathLike)):
        return _from_folder(os.fspath(data), input_shape, split, limit, argument)
    if isinstance(data, tf.data.Dataset):
        return _from_dataset(data, limit)
    if isinstance(data, tuple) and len(data) == 2:
        x, y = _fitted(data[0], input_shape, argument), np.asarray(data[1]).reshape(-1)
        return x[:limit], y[:limit].astype(np.int64)
    if isinstance(data, (np.ndarray, tf.Tensor, list)):
        return _fitted(data, input_shape, argument)[:limit], None
    raise ValueError(
        f"`{argument}` must be an ImageData, a folder of class subfolders, an array of images "
        f"[n, H, W, C] in 0-255, an (images, labels) pair or a tf.data.Dataset. "
        f"Received: {argument}={data!r}")


def _from_dataset(dataset, limit):
    xs, ys, count = [], [], 0
    for batch in dataset:
        x, y = (batch[0], batch[1]) if isinstance(batch, tuple) else (batch, None)
        xs.append(np.asarray(x, np.float32))
        ys.append(None if y is None else np.asarray(y).reshape(-1))
        count += len(xs[-1])
        if count >= limit:
            break
    x = np.concatenate(xs)[:limit]
    y = None if any(v is None for v in ys) else np.concatenate(ys)[:limit].astype(np.int64)
    return x, y


def _from_folder(path, input_shape, split, limit, argument):
    """A folder's images in `tftransfer.data`'s listing, split 80/20 (seeded), so that
    calibration ("train") and verification ("validation") on one folder are disjoint."""
    from tftransfer.data import from_directory

    if not os.path.isdir(path):
        raise ValueError(f"`{argument}` names a folder that does not exist. "
                         f"Received: {argument}={path!r}")
    data = from_directory(path, image_size=input_shape[:2], channels=input_shape[-1],
                          validation_split=0.2, shuffle=False, seed=0, cache=False)
    return _from_dataset(getattr(data, split) or data.train, limit)


def _fitted(x, input_shape, argument):
    from tftransfer import _images

    x = np.asarray(x, np.float32)
    if x.ndim == len(input_shape):
        x = x[None]
    if x.ndim != len(input_shape) + 1 or len(x) == 0:
        raise ValueError(f"`{argument}` as an array must be [n, {', '.join(map(str, input_shape))}]"
                         f" in 0-255. Received: {argument}=array(shape={x.shape})")
    if tuple(x.shape[1:]) != tuple(input_shape):
        x = np.stack([_images.fit_image(tf.constant(a), input_shape[-1], input_shape[:2]).numpy()
                      for a in x])
    return x

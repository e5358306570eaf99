"""The serving contract of tftransfer exports: names, files and tolerances.

The bottom module of `tftransfer.export`: the writer, `verify`, `predict` and
the CLI all read these names from here, so they cannot drift apart.

A version directory `<base_dir>/<N>/` holds the SavedModel, `assets/labels.txt`
and, in `assets.extra/`, `tftransfer.json`, `tf_serving_warmup_requests` and the
optional `model.keras` / `model.tflite`.
"""

import pathlib

import numpy as np
import tensorflow as tf

EXTRA_FORMATS = ("keras", "tflite")
DEFAULT_SIGNATURE = "serving_default"  # images: float32 [batch, H, W, C] in 0-255
BYTES_SIGNATURE = "serving_bytes"  # image_bytes: string [batch], encoded images
IMAGES_INPUT = "images"
BYTES_INPUT = "image_bytes"
TEXTS_INPUT = "texts"  # text models: serving_default takes string [batch]
LABELS_FILE = "labels.txt"
METADATA_FILE = "tftransfer.json"
WARMUP_FILE = "tf_serving_warmup_requests"
TFLITE_TOLERANCE = 1e-4
COMPARE_TOLERANCE = 1e-5
PRIMARY_OUTPUTS = ("probabilities", "scores", "values")
DECODABLE_CHANNELS = (1, 3, 4)


def existing_versions(base_dir):
    """Sorted integer version numbers of the subdirectories of `base_dir`."""
    base = pathlib.Path(base_dir)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir()
                  if p.is_dir() and p.name.isascii() and p.name.isdigit())


def sample_images(shape, batch=1, seed=0):
    """Deterministic random whole-number float32 images [batch, *shape]."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, *shape)).astype("float32")


def encode_png(image):
    """PNG bytes of a float 0-255 image [H, W, C]."""
    return tf.io.encode_png(tf.cast(image, tf.uint8)).numpy()


_SAMPLE_WORDS = ("the", "launch", "of", "a", "new", "idea", "about", "faith", "and", "orbit")


def sample_texts(batch=1, seed=0):
    """Deterministic short sentences, a numpy array of `batch` strings (text models)."""
    rng = np.random.default_rng(seed)
    return np.array([" ".join(rng.choice(_SAMPLE_WORDS, 6)) for _ in range(batch)], object)


def samples_for(signature, batch=1, seed=0):
    """Sample inputs for a serving signature: sentences if it takes strings, else images."""
    spec = next(iter(signature.structured_input_signature[1].values()))
    if spec.dtype == tf.string and spec.name == TEXTS_INPUT:
        return sample_texts(batch, seed)
    return sample_images(tuple(spec.shape[1:]), batch, seed)


def label_mismatch(outputs, names):
    """How the graph's own `labels` output disagrees with `names`, or None.

    Args:
        outputs: The outputs of a classification `serving_default` call
            (`classes` and `labels`, as the writer makes them).
        names: The class names read beside the graph (`labels.txt`).

    Returns:
        A string naming the first class whose names differ, or None when
        they agree (or the outputs have no `labels`).
    """
    if "labels" not in outputs or "classes" not in outputs:
        return None
    classes = np.asarray(outputs["classes"]).ravel()
    graph = [x.decode() if isinstance(x, bytes) else str(x)
             for x in np.asarray(outputs["labels"]).ravel()]
    for index, label in zip(classes, graph):
        listed = names[index] if 0 <= index < len(names) else None
        if listed != label:
            return (f"class {int(index)} is {label!r} in the graph's `labels` output but "
                    f"{listed!r} in {LABELS_FILE}")
    return None

"""Export fine-tuned Keras models as versioned SavedModels for TF Serving.

`export_for_serving(model, "exports/digits")` writes `exports/digits/<N>/`,
version N of a TF Serving model. The model takes raw 0-255 float pixels (its
preprocessing is a layer inside it), so serving has no train/serve skew.
Each version holds the SavedModel, `assets/labels.txt` and, in
`assets.extra/`, `tftransfer.json`, `tf_serving_warmup_requests` and the
optional `model.keras` / `model.tflite`. It is written in
`<base_dir>/.tmp-<N>-<random>/` and renamed into place, so a server watching
base_dir never sees half a version.

Signatures: `serving_default` takes `images` float32 [batch, H, W, C] (0-255);
`serving_bytes` takes `image_bytes` string [batch] (JPEG/PNG/GIF/BMP, decoded,
converted to C channels and resized to HxW in the graph; REST clients send
`{"image_bytes": {"b64": ...}}`). Outputs: classification `probabilities`,
`classes`, `scores`, `labels` (top-k); multi_label `scores`, `label_names`;
regression `values`. docs/serving.md has the tables and the serving recipes.

Check an export: `python -m tftransfer.export verify DIR [--compare M.keras]`.
The names and files of the contract live in `_contract.py`.
"""

import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import tempfile
import uuid
import warnings

import keras
import numpy as np
import tensorflow as tf

import tftransfer
from tftransfer import _images, tasks
from tftransfer._checks import invalid
from tftransfer.export._contract import (
    BYTES_INPUT,
    BYTES_SIGNATURE,
    DECODABLE_CHANNELS,
    DEFAULT_SIGNATURE,
    EXTRA_FORMATS,
    IMAGES_INPUT,
    LABELS_FILE,
    METADATA_FILE,
    PRIMARY_OUTPUTS,
    TEXTS_INPUT,
    TFLITE_TOLERANCE,
    WARMUP_FILE,
    encode_png,
    existing_versions,
    sample_images,
    sample_texts,
)
from tftransfer.model import FineTuner


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What the serving signatures need to know about the model."""

    task: str
    input_shape: tuple
    output_shape: tuple
    class_names: tuple
    top_k: int
    text: bool = False  # the model takes strings: `serving_default(texts)`

    @property
    def num_outputs(self):
        return self.output_shape[-1] if self.output_shape else 1


def export_for_serving(model, base_dir, *, version=None, class_names=None,
                       overwrite=False, task=None, top_k=5, metadata=None,
                       warmup=True, extra_formats=()):
    """Writes `model` as version `version` of a TF Serving model directory.

    Args:
        model: a `FineTuner` (its task, class names, source, preprocessing
            and recipe are used), or any single-input, single-output
            `keras.Model` taking float32 [None, H, W, C] images in 0-255
            (which may carry a dict `tftransfer_info`).
        base_dir: the model's directory (the one TF Serving's
            `--model_base_path` points to); created if missing.
        version: positive int; default one more than the highest version.
        class_names: one name per output; default the model's
            `class_names`, else "0".."n-1".
        overwrite: replace an existing version (old files are renamed aside,
            the new ones renamed in, then the old ones deleted).
        task: "classification", "multi_label" or "regression"; default
            the model's task, else inferred from the last layer's
            activation (softmax, sigmoid, anything else).
        top_k: number of classes in `classes`/`scores`/`labels`
            (capped at the number of classes).
        metadata: JSON-able dict stored in `assets.extra/tftransfer.json`.
        warmup: write `assets.extra/tf_serving_warmup_requests`.
        extra_formats: any of "keras", "tflite": also write
            `assets.extra/model.keras` / `assets.extra/model.tflite`.

    Returns:
        The path of the written version directory, as a string.

    Raises:
        ValueError: on a bad argument or a model outside the contract.
        FileExistsError: the version exists and `overwrite` is False.
    """
    spec = _make_spec(model, class_names, task, top_k)
    formats = _check_extra_formats(extra_formats)
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid("metadata", "a dict or None", metadata)
    base = pathlib.Path(base_dir)
    version = _resolve_version(base, version)
    base.mkdir(parents=True, exist_ok=True)
    final = base / str(version)
    if final.exists() and not overwrite:
        raise FileExistsError(_exists_message(final))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=base))
    try:
        _write_version(tmp, model, spec, version, metadata, warmup, formats)
        _open_to_readers(tmp)
        _publish(tmp, final, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)


# ----------------------------------------------------------------- arguments


def model_info(model):
    """What a model says of itself: a `FineTuner`'s task, class names, source,
    preprocessing and recipe; for another model, its `tftransfer_info` dict."""
    if isinstance(model, FineTuner):
        return {"task": model.task, "class_names": model.class_names,
                "backbone": model.source,
                "preprocessing": getattr(model.preprocessing, "mode", None)
                or type(model.preprocessing).__name__,  # a text model's preprocessing layer
                "hyperparameters": model.recipe}
    return dict(getattr(model, "tftransfer_info", None) or {})


def _make_spec(model, class_names, task, top_k):
    """Checks the model and arguments; returns the `_Spec`."""
    input_shape, output_shape = _model_shapes(model)
    text = input_shape is None
    task = tasks.task_of(model) if task is None else tasks.check_task(task)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise invalid("top_k", "an integer >= 1", top_k)
    if task != "regression" and len(output_shape) != 1:
        raise ValueError(f"A {task} model must output [batch, n]; this "
                         f"model outputs {(None,) + output_shape}.")
    names = class_names if class_names is not None else tasks.class_names_of(model)
    spec = _Spec(task, input_shape, output_shape, (), top_k, text)
    names = _check_class_names(names, spec)
    return dataclasses.replace(spec, class_names=names)


def _model_shapes(model):
    """Returns ((H, W, C), output shape without batch) of a 1-in/1-out model."""
    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    if not inputs or not outputs or len(inputs) != 1 or len(outputs) != 1:
        raise ValueError("export_for_serving needs a built keras.Model with "
                         "one image input and one output.")
    if str(inputs[0].dtype) == "string":  # a text model: a batch of strings, no shape
        return None, tuple(outputs[0].shape[1:])
    shape = tuple(inputs[0].shape)
    if len(shape) != 4 or any(d is None for d in shape[1:]):
        raise ValueError("The model input must be [None, H, W, C] with known "
                         f"H, W and C. Received: input shape={shape}")
    return shape[1:], tuple(outputs[0].shape[1:])


def _check_class_names(names, spec):
    """Returns the class names as a tuple (default "0".."n-1")."""
    count = spec.num_outputs
    return tuple(tasks.check_class_names(names, count) or tasks.default_class_names(count))


def _check_extra_formats(extra_formats):
    formats = (extra_formats,) if isinstance(extra_formats, str) else extra_formats
    formats = tuple(formats or ())
    if any(f not in EXTRA_FORMATS for f in formats):
        raise invalid("extra_formats", f"a list of formats among {', '.join(EXTRA_FORMATS)}",
                      extra_formats)
    return formats


def _resolve_version(base, version):
    if version is None:
        return max(existing_versions(base), default=0) + 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise invalid("version", "an integer >= 1, or None for the next one", version)
    return version


def _exists_message(final):
    return (f"Version directory {final} already exists; pass overwrite=True "
            "to replace it, or another `version`.")


# ------------------------------------------------------------------- writing


def _write_version(path, model, spec, version, metadata, warmup, formats):
    """Writes every file of one version into the (temporary) `path`."""
    signatures = _save_savedmodel(model, spec, path)
    extra = path / "assets.extra"
    extra.mkdir(exist_ok=True)
    (path / "assets").mkdir(exist_ok=True)
    (path / "assets" / LABELS_FILE).write_text("\n".join(spec.class_names) + "\n")
    extras = _write_extra_formats(path, model, spec, formats)
    records = _write_warmup(extra / WARMUP_FILE, spec, signatures) if warmup else 0
    meta = _metadata(model, spec, version, metadata, signatures, records, extras)
    (extra / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))


def _save_savedmodel(model, spec, path):
    """Saves the serving signatures with `keras.export.ExportArchive`.

    The archive tracks exactly the variables the signatures use, including
    raw `tf.Variable`s of layers wrapping a `tf.saved_model.load`ed object.

    Returns:
        The names of the signatures written.
    """
    archive = keras.export.ExportArchive()
    archive.track(model)
    if spec.text:
        return _save_text_signature(archive, model, spec, path)
    image_spec = tf.TensorSpec((None,) + spec.input_shape, tf.float32,
                               name=IMAGES_INPUT)

    def serving_default(images):
        return _serving_outputs(model, spec, images)

    def serving_bytes(image_bytes):
        return _serving_outputs(model, spec, _decode_images(image_bytes, spec))

    archive.add_endpoint(DEFAULT_SIGNATURE, serving_default, [image_spec])
    names = [DEFAULT_SIGNATURE]
    if spec.input_shape[-1] in DECODABLE_CHANNELS:
        bytes_spec = tf.TensorSpec((None,), tf.string, name=BYTES_INPUT)
        archive.add_endpoint(BYTES_SIGNATURE, serving_bytes, [bytes_spec])
        names.append(BYTES_SIGNATURE)
    else:
        warnings.warn(f"No `{BYTES_SIGNATURE}` signature: images cannot be "
                      f"decoded to {spec.input_shape[-1]} channels.")
    archive.write_out(str(path), verbose=False)
    return names


def _save_text_signature(archive, model, spec, path):
    """`serving_default(texts)`: strings in, the preprocessor inside the model."""
    def serving_default(texts):
        return _serving_outputs(model, spec, texts)

    archive.add_endpoint(DEFAULT_SIGNATURE, serving_default,
                         [tf.TensorSpec((None,), tf.string, name=TEXTS_INPUT)])
    archive.write_out(str(path), verbose=False)
    return [DEFAULT_SIGNATURE]


def _serving_outputs(model, spec, images):
    """The signature outputs (a dict) of `model` on float 0-255 `images`."""
    y = tf.cast(model(images, training=False), tf.float32)
    names = tf.constant(spec.class_names)
    if spec.task == "regression":
        return {"values": y}
    if spec.task == "multi_label":
        index = tf.broadcast_to(tf.range(spec.num_outputs), tf.shape(y))
        return {"scores": y, "label_names": tf.gather(names, index)}  # TFLite-able
    scores, classes = tf.math.top_k(y, k=min(spec.top_k, spec.num_outputs))
    return {"probabilities": y, "classes": classes, "scores": scores,
            "labels": tf.gather(names, classes)}


def _decode_images(image_bytes, spec):
    """Decodes a [batch] string tensor to float32 [batch, H, W, C], 0-255,
    with the decode that training and `tftransfer.predict` use."""
    height, width, channels = spec.input_shape
    out = tf.TensorSpec(spec.input_shape, tf.float32)
    return tf.map_fn(lambda data: _images.decode(data, channels, (height, width)), image_bytes,
                     fn_output_signature=out)


def _open_to_readers(root):
    """Gives `root` and everything in it the modes a model server under another
    user needs: directories `0755`, files `0644`, less the bits the umask
    withholds (`mkdtemp` made `root` `0700`)."""
    umask = os.umask(0)
    os.umask(umask)
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o755 & ~umask)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644 & ~umask)


def _publish(tmp, final, overwrite):
    """Renames `tmp` to `final`; with `overwrite`, swaps out the old one."""
    if not final.exists():
        try:
            os.rename(tmp, final)
        except OSError as err:  # created meanwhile by someone else
            raise FileExistsError(_exists_message(final)) from err
        return
    if not overwrite:
        raise FileExistsError(_exists_message(final))
    old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_warmup(path, spec, signatures):
    """Writes PredictionLog warmup records; returns how many (0 if skipped)."""
    try:
        from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
    except ImportError:
        warnings.warn("tensorflow-serving-api is not installed: no warmup "
                      "requests written (pip install tensorflow-serving-api).")
        return 0
    shape = spec.input_shape
    requests = [(DEFAULT_SIGNATURE, TEXTS_INPUT, sample_texts(b, b)) if spec.text else
                (DEFAULT_SIGNATURE, IMAGES_INPUT, sample_images(shape, b, b)) for b in (1, 2)]
    if BYTES_SIGNATURE in signatures:
        png = encode_png(sample_images(shape)[0])
        requests.append((BYTES_SIGNATURE, BYTES_INPUT, np.array([png], object)))
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, key, value in requests:
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = signature
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return len(requests)


def _write_extra_formats(path, model, spec, formats):
    """Writes the `extra_formats` under assets.extra/; returns a report."""
    report = {}
    if "keras" in formats:
        model.save(path / "assets.extra" / "model.keras")
        report["keras"] = {"path": "assets.extra/model.keras"}
    if "tflite" in formats:
        report["tflite"] = _write_tflite(path, model, spec)
    return report


def _write_tflite(path, model, spec):
    """Converts `serving_default` to TFLite and checks it against `model`."""
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(path), signature_keys=[DEFAULT_SIGNATURE])
    flatbuffer = converter.convert()
    (path / "assets.extra" / "model.tflite").write_bytes(flatbuffer)
    images = sample_images(spec.input_shape, batch=2)
    with warnings.catch_warnings():  # tf.lite.Interpreter deprecation note
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    outputs = interpreter.get_signature_runner(DEFAULT_SIGNATURE)(images=images)
    key = next(k for k in PRIMARY_OUTPUTS if k in outputs)
    expected = model(images, training=False)
    diff = float(np.max(np.abs(outputs[key] - np.asarray(expected))))
    if not diff <= TFLITE_TOLERANCE:
        warnings.warn(f"TFLite `{key}` differ from the Keras model by up to "
                      f"{diff:.3g} (> {TFLITE_TOLERANCE}).")
    return {"path": "assets.extra/model.tflite", "max_abs_diff": diff}


def _metadata(model, spec, version, metadata, signatures, records, extras):
    """The content of assets.extra/tftransfer.json."""
    info = model_info(model)
    user = dict(metadata or {})
    pick = lambda key: user.get(key, info.get(key))  # noqa: E731
    return {
        "tftransfer_version": tftransfer.__version__,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": version,
        "task": spec.task,
        "input": {"name": TEXTS_INPUT, "shape": [None], "dtype": "string"} if spec.text else
        {"name": IMAGES_INPUT, "shape": [None, *spec.input_shape], "dtype": "float32",
         "value_range": [0, 255]},
        "output_shape": [None, *spec.output_shape],
        "class_names": list(spec.class_names),
        "top_k": min(spec.top_k, spec.num_outputs),
        "signatures": signatures,
        "backbone": pick("backbone"),
        "preprocessing": pick("preprocessing"),
        "hyperparameters": pick("hyperparameters"),
        "tftransfer_info": info,
        "metadata": user,
        "warmup_records": records,
        "extra_formats": extras,
    }

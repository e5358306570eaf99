"""Verification of a serving export: `verify_export` and its checks.

Run it as `python -m tftransfer.export verify DIR [--compare MODEL.keras]`.
"""

import base64
import json
import pathlib

import keras
import numpy as np
import tensorflow as tf

from tftransfer.export._contract import (
    BYTES_INPUT,
    BYTES_SIGNATURE,
    COMPARE_TOLERANCE,
    DEFAULT_SIGNATURE,
    LABELS_FILE,
    METADATA_FILE,
    PRIMARY_OUTPUTS,
    WARMUP_FILE,
    encode_png,
    existing_versions,
    label_mismatch,
    sample_images,
    samples_for,
)


class VerifyError(Exception):
    """An export failed verification."""


def resolve_version_dir(path):
    """Returns the SavedModel dir: `path` itself or its highest version."""
    path = pathlib.Path(path)
    if (path / "saved_model.pb").is_file():
        return path
    versions = existing_versions(path)
    if versions and (path / str(versions[-1]) / "saved_model.pb").is_file():
        return path / str(versions[-1])
    raise VerifyError(f"{path} is not a SavedModel directory (no saved_model.pb)"
                      " nor a base directory with numbered versions.")


def verify_export(path, *, compare=None, model_name=None, out=print):
    """Loads an export, runs every signature and checks the side files.

    Args:
        path: a version directory or a base directory (highest version).
        compare: optional `.keras` file; `serving_default` must match it.
        model_name: name in the printed curl command (default: base dir).
        out: where the report lines go.

    Returns:
        The list of problems found (empty when all is good).

    Raises:
        VerifyError: `path` is not a loadable SavedModel.
    """
    vdir = resolve_version_dir(path)
    out(f"SavedModel: {vdir}")
    try:
        loaded = tf.saved_model.load(str(vdir))
    except Exception as err:  # noqa: BLE001 - any load failure is a finding
        raise VerifyError(f"cannot load {vdir} as a SavedModel: {err}") from err
    meta = _read_metadata(vdir)
    problems = _check_signatures(loaded, meta, out)
    if DEFAULT_SIGNATURE in loaded.signatures:
        problems += _check_labels(vdir, loaded, meta)
        problems += _check_bytes_path(loaded)
        problems += _check_warmup(vdir, loaded, out)
        if compare:
            problems += _compare_keras(loaded, compare, out)
        out(_curl_command(vdir, loaded, model_name))
    return problems


def _read_metadata(vdir):
    path = vdir / "assets.extra" / METADATA_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as err:
        raise VerifyError(f"{path} is not valid JSON: {err}") from err


def _spec_line(name, spec):
    return f"    {name}: {spec.dtype.name} {list(spec.shape)}"



def _call_default(loaded, images):
    fn = loaded.signatures[DEFAULT_SIGNATURE]
    key, spec = next(iter(fn.structured_input_signature[1].items()))
    return fn(**{key: tf.constant(images, spec.dtype)})  # images, or texts (strings)


def _primary(outputs):
    """The main numeric output: probabilities, scores or values."""
    return next((outputs[k] for k in PRIMARY_OUTPUTS if k in outputs), None)


def _check_signatures(loaded, meta, out):
    """Prints every signature, runs it on a sample; returns problems."""
    expected = meta.get("signatures") or [DEFAULT_SIGNATURE]
    problems = [f"signature `{name}` is missing" for name in expected
                if name not in loaded.signatures]
    if DEFAULT_SIGNATURE not in loaded.signatures:
        return problems or [f"signature `{DEFAULT_SIGNATURE}` is missing"]
    images = samples_for(loaded.signatures[DEFAULT_SIGNATURE], batch=2)
    for name, fn in loaded.signatures.items():
        out(f"signature {name}:")
        inputs = fn.structured_input_signature[1]
        for key, spec in inputs.items():
            out(_spec_line(key, spec) + "  (input)")
        for key, spec in fn.structured_outputs.items():
            out(_spec_line(key, spec))
        try:
            result = fn(**_sample_inputs(inputs, images))
        except Exception as err:  # noqa: BLE001 - report, do not crash
            problems.append(f"signature `{name}` fails on a sample: {err}")
            continue
        for key, value in result.items():
            out(f"    sample {key}[0]: {_short(value.numpy()[0])}")
    return problems


def _takes_text(loaded):
    return samples_for(loaded.signatures[DEFAULT_SIGNATURE]).dtype == object


def _image_shape(loaded):
    """(H, W, C) of the image input of `serving_default`."""
    inputs = loaded.signatures[DEFAULT_SIGNATURE].structured_input_signature[1]
    return tuple(next(iter(inputs.values())).shape[1:])


def _sample_inputs(inputs, images):
    """`images` as the signature wants them: floats, or PNG strings (texts as they are)."""
    if images.dtype == object:  # sample texts of a text model
        return {key: tf.constant(list(images), spec.dtype) for key, spec in inputs.items()}
    return {key: tf.constant([encode_png(i) for i in images])
            if spec.dtype == tf.string else tf.constant(images, spec.dtype)
            for key, spec in inputs.items()}


def _short(array, limit=5):
    flat = np.asarray(array).ravel()
    items = [x.decode() if isinstance(x, bytes) else x.item() for x in flat[:limit]]
    items = [round(x, 4) if isinstance(x, float) else x for x in items]
    return str(items) + (f" ... ({flat.size} values)" if flat.size > limit else "")


def _check_labels(vdir, loaded, meta):
    """labels.txt must have one line per output of `serving_default`."""
    outputs = loaded.signatures[DEFAULT_SIGNATURE].structured_outputs
    primary = _primary(outputs)
    shape = primary.shape if primary is not None else ()
    n = shape[-1] if len(shape) > 1 else 1
    path = vdir / "assets" / LABELS_FILE
    if not path.is_file():
        optional = primary is None or "values" in outputs
        return [] if optional else [f"assets/{LABELS_FILE} is missing"]
    lines = path.read_text().splitlines()
    if len(lines) != n:
        return [f"assets/{LABELS_FILE} has {len(lines)} lines, the model "
                f"has {n} outputs"]
    if meta.get("class_names") not in (None, lines):
        return [f"assets/{LABELS_FILE} differs from {METADATA_FILE}"]
    images = samples_for(loaded.signatures[DEFAULT_SIGNATURE], batch=8, seed=3)
    mismatch = label_mismatch(_call_default(loaded, images), lines)
    return [f"assets/{LABELS_FILE} disagrees with the graph: {mismatch}"] if mismatch else []


def _check_bytes_path(loaded):
    """`serving_bytes` on PNGs must match `serving_default` on their pixels."""
    if BYTES_SIGNATURE not in loaded.signatures:
        return []
    images = sample_images(_image_shape(loaded), batch=2, seed=1)
    pngs = tf.constant([encode_png(i) for i in images])
    got = _primary(loaded.signatures[BYTES_SIGNATURE](image_bytes=pngs))
    want = _primary(_call_default(loaded, images))
    diff = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
    if diff <= COMPARE_TOLERANCE:
        return []
    return [f"`{BYTES_SIGNATURE}` on PNG differs from `{DEFAULT_SIGNATURE}` "
            f"on the same pixels by {diff:.3g}"]


def _check_warmup(vdir, loaded, out):
    """Every warmup record must parse and run, as TF Serving does at load."""
    path = vdir / "assets.extra" / WARMUP_FILE
    if not path.is_file():
        out("warmup: no assets.extra/" + WARMUP_FILE)
        return []
    try:
        from tensorflow_serving.apis import prediction_log_pb2
    except ImportError:
        out("warmup: not checked (tensorflow-serving-api not installed)")
        return []
    problems, count = [], 0
    try:
        for count, record in enumerate(tf.data.TFRecordDataset(str(path)), 1):
            try:
                _run_warmup_record(loaded, prediction_log_pb2, record.numpy())
            except Exception as err:  # noqa: BLE001
                problems.append(f"warmup record {count} fails: {err}")
    except tf.errors.OpError as err:  # truncated or corrupt file: TF Serving would fail too
        message = (err.message or type(err).__name__).strip().splitlines()[0]
        return [f"warmup: assets.extra/{WARMUP_FILE} is corrupt after {count} records "
                f"({type(err).__name__}: {message})"]
    out(f"warmup: {count} PredictionLog records")
    return problems + ([] if 0 < count <= 1000 else
                       [f"warmup: {count} records (TF Serving wants 1-1000)"])


def _run_warmup_record(loaded, prediction_log_pb2, record):
    request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
    fn = loaded.signatures[request.model_spec.signature_name or DEFAULT_SIGNATURE]
    fn(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()})


def _compare_keras(loaded, keras_path, out):
    """`serving_default` must match the Keras model within 1e-5."""
    try:
        model = keras.models.load_model(keras_path, compile=False)
    except Exception as err:  # noqa: BLE001
        return [f"cannot load {keras_path} with keras.models.load_model: {err}"]
    images = samples_for(loaded.signatures[DEFAULT_SIGNATURE], batch=2, seed=2)
    want = np.asarray(model(tf.constant(list(images)) if images.dtype == object else images,
                            training=False), np.float32)
    got = np.asarray(_primary(_call_default(loaded, images)))
    if got.shape != want.shape:
        return [f"--compare: shapes differ: export {got.shape}, keras {want.shape}"]
    diff = float(np.max(np.abs(got - want)))
    out(f"compare with {keras_path}: max abs diff {diff:.3g}")
    return [] if diff <= COMPARE_TOLERANCE else [
        f"--compare: outputs differ by {diff:.3g} (> {COMPARE_TOLERANCE})"]


def _curl_command(vdir, loaded, model_name):
    """Ready REST requests for TF Serving on localhost:8501."""
    name = model_name or (vdir.parent.name if vdir.name.isdigit() else vdir.name)
    url = f"http://localhost:8501/v1/models/{name}:predict"
    if _takes_text(loaded):
        body = json.dumps({"instances": ["a sentence to classify"]})
        return f"REST request (text):\n  curl -d '{body}' -X POST {url}"
    if BYTES_SIGNATURE not in loaded.signatures:
        return (f"REST request:\n  curl -d '{{\"instances\": [<H x W x C "
                f"nested list of 0-255 floats>]}}' -X POST {url}")
    gray = np.full(_image_shape(loaded), 128, np.uint8)
    b64 = base64.b64encode(encode_png(gray)).decode()
    body = json.dumps({"signature_name": BYTES_SIGNATURE,
                       "instances": [{BYTES_INPUT: {"b64": b64}}]})
    own = body.replace(b64, "'\"$(base64 -w0 image.jpg)\"'")
    return (f"REST request (a gray test image):\n  curl -d '{body}' -X POST {url}"
            f"\nwith your own image:\n  curl -d '{own}' -X POST {url}")


# ----------------------------------------------------------------------- CLI

"""Tests of tftransfer.export: TF Serving SavedModels, versions, verify CLI."""

import configparser
import datetime
import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import prediction_log_pb2

import tftransfer
from tftransfer import export as ex
from tftransfer.export import __main__ as cli
from tftransfer.export import _writer as writer

SHAPE = (16, 16, 3)
NAMES = ["zero", "one", "two", "three", "four"]


def _cnn(activation="softmax", units=5, shape=SHAPE, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(units, activation=activation)(x)
    return keras.Model(inputs, outputs)


class _Affine(tf.Module):
    """A small module with raw tf.Variables and a traced __call__."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(tf.random.stateless_normal([8, 6], (1, 2)))
        self.b = tf.Variable(tf.fill([6], 0.5))

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        return tf.nn.relu(tf.matmul(x, self.w) + self.b)


class HubLike(keras.layers.Layer):
    """Wraps a `tf.saved_model.load`ed module like keras's TFSMLayer did."""

    def __init__(self, module_path, **kwargs):
        super().__init__(**kwargs)
        self.module_path = module_path
        self._loaded = tf.saved_model.load(module_path)
        for variable in self._loaded.variables:
            self._track_variable(variable)

    def call(self, x):
        return self._loaded(x)


@pytest.fixture(scope="module")
def cnn():
    model = _cnn()
    model.tftransfer_info = {
        "task": "classification", "backbone": "saved_models/digits_cnn.keras",
        "preprocessing": "none", "hyperparameters": {"learning_rate": 0.001}}
    return model


@pytest.fixture(scope="module")
def exported(cnn, tmp_path_factory):
    base = tmp_path_factory.mktemp("exports") / "digits"
    path = ex.export_for_serving(cnn, base, class_names=NAMES, top_k=3,
                                 metadata={"dataset": "digits"})
    return pathlib.Path(path)


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(str(exported))


def _images(n=4, shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape)).astype("uint8")


def _png(image):
    return tf.io.encode_png(image).numpy()


def _pil_bytes(image, fmt, mode=None, **kwargs):
    pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    (pil.convert(mode) if mode else pil).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _tree_hashes(root):
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _entries(base):
    return sorted(p.name for p in pathlib.Path(base).iterdir())


# ------------------------------------------------------------ signatures


def test_serving_default_matches_keras(cnn, loaded):
    images = _images().astype("float32")
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    want = cnn(images, training=False).numpy()
    np.testing.assert_allclose(out["probabilities"].numpy(), want, atol=1e-5)
    order = np.argsort(-want, axis=1)[:, :3]
    np.testing.assert_array_equal(out["classes"].numpy(), order)
    assert out["classes"].dtype == tf.int32
    np.testing.assert_allclose(out["scores"].numpy(),
                               np.take_along_axis(want, order, 1), atol=1e-5)
    labels = [[NAMES[i] for i in row] for row in order]
    assert out["labels"].numpy().astype(str).tolist() == labels


def test_signature_names_and_specs(loaded):
    assert set(loaded.signatures) == {"serving_default", "serving_bytes"}
    default = loaded.signatures["serving_default"]
    (spec,) = default.structured_input_signature[1].values()
    assert list(default.structured_input_signature[1]) == ["images"]
    assert spec.shape.as_list() == [None, *SHAPE] and spec.dtype == tf.float32
    byte_inputs = loaded.signatures["serving_bytes"].structured_input_signature[1]
    assert list(byte_inputs) == ["image_bytes"]
    assert byte_inputs["image_bytes"].dtype == tf.string
    for name in ("serving_default", "serving_bytes"):
        outputs = loaded.signatures[name].structured_outputs
        assert set(outputs) == {"probabilities", "classes", "scores", "labels"}
        assert outputs["labels"].dtype == tf.string


def test_serving_bytes_png_and_jpeg_match_float_path(loaded):
    images = _images(3, seed=1)
    jpegs = [_pil_bytes(i, "JPEG", quality=90) for i in images]
    decoded = np.stack([tf.io.decode_jpeg(j).numpy() for j in jpegs])
    for data, pixels in (([_png(i) for i in images], images), (jpegs, decoded)):
        got = loaded.signatures["serving_bytes"](image_bytes=tf.constant(data))
        want = loaded.signatures["serving_default"](
            images=tf.constant(pixels.astype("float32")))
        np.testing.assert_array_equal(got["classes"], want["classes"])
        np.testing.assert_allclose(got["probabilities"], want["probabilities"],
                                   atol=1e-5)


def test_serving_bytes_resizes_and_converts_channels(loaded):
    big = _images(1, (40, 24, 3), seed=2)[0]
    gray = _images(1, (16, 16, 1), seed=3)[0]
    data = [_png(big), _png(gray), _pil_bytes(_images(1, seed=4)[0], "GIF"),
            _pil_bytes(_images(1, seed=5)[0], "BMP")]
    got = loaded.signatures["serving_bytes"](image_bytes=tf.constant(data))
    # The shared decode (tftransfer._images) resizes bilinearly and rounds to whole pixels.
    resized = tf.round(tf.image.resize(big.astype("float32"), SHAPE[:2], "bilinear"))
    pixels = [resized.numpy(), np.repeat(gray, 3, -1).astype("float32")]
    pixels += [tf.io.decode_image(d, channels=3, expand_animations=False).numpy()
               for d in data[2:]]
    want = loaded.signatures["serving_default"](
        images=tf.constant(np.stack(pixels).astype("float32")))
    np.testing.assert_allclose(got["probabilities"], want["probabilities"],
                               atol=1e-5)


def test_grayscale_model_decodes_every_format(tmp_path):
    model = _cnn(shape=(16, 16, 1), units=3)
    path = ex.export_for_serving(model, tmp_path, warmup=False)
    fn = tf.saved_model.load(path).signatures["serving_bytes"]
    rgb = _images(1, seed=6)[0]
    data = [_pil_bytes(rgb, f) for f in ("GIF", "BMP", "JPEG", "PNG")]
    out = fn(image_bytes=tf.constant(data))
    assert out["probabilities"].shape == (4, 3)
    assert np.all(np.isfinite(out["probabilities"].numpy()))


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_multi_label_and_regression_outputs(tmp_path):
    sigmoid = _cnn("sigmoid", units=4)
    path = ex.export_for_serving(sigmoid, tmp_path / "ml", warmup=False,
                                 class_names=["a", "b", "c", "d"],
                                 extra_formats=("tflite",))  # string outputs
    out = tf.saved_model.load(path).signatures["serving_default"](
        images=tf.constant(_images(2).astype("float32")))
    assert set(out) == {"scores", "label_names"}
    np.testing.assert_allclose(out["scores"], sigmoid(_images(2).astype("float32")),
                               atol=1e-5)
    assert out["label_names"].numpy().astype(str).tolist() == [list("abcd")] * 2
    linear = _cnn(None, units=2)
    path = ex.export_for_serving(linear, tmp_path / "reg", warmup=False)
    fn = tf.saved_model.load(path).signatures["serving_default"]
    assert set(fn.structured_outputs) == {"values"}
    meta = json.loads((pathlib.Path(path) / "assets.extra/tftransfer.json").read_text())
    assert meta["task"] == "regression"


def test_task_argument_overrides_inference(tmp_path, cnn):
    path = ex.export_for_serving(cnn, tmp_path, task="regression", warmup=False)
    fn = tf.saved_model.load(path).signatures["serving_default"]
    assert set(fn.structured_outputs) == {"values"}


def _save_hub_style(path):
    """Saves `_Affine` the TF-Hub way: a root with `variables`, `__call__`."""
    module = _Affine()
    root = tf.train.Checkpoint()
    root.variables = [module.w, module.b]
    root.trainable_variables = [module.w, module.b]
    root.__call__ = module.__call__
    tf.saved_model.save(root, str(path))


def test_hub_like_layer_exports_and_reloads(tmp_path):
    _save_hub_style(tmp_path / "hub")
    keras.utils.set_random_seed(0)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = HubLike(str(tmp_path / "hub"))(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    raw = [v for v in model.weights if not isinstance(v, keras.Variable)]
    assert len(raw) == 2  # the raw tf.Variables of the loaded module
    path = ex.export_for_serving(model, tmp_path / "exports", warmup=False)
    images = _images(3).astype("float32")
    want = model(images, training=False).numpy()
    shutil.rmtree(tmp_path / "hub")  # the export must not need it
    out = tf.saved_model.load(path).signatures["serving_default"](
        images=tf.constant(images))
    np.testing.assert_allclose(out["probabilities"].numpy(), want, atol=1e-5)


# -------------------------------------------------------------- versions


def test_versions_increment_and_existing_version_is_kept(tmp_path, cnn):
    base = tmp_path / "m"
    assert ex.export_for_serving(cnn, base, warmup=False) == str(base / "1")
    assert ex.export_for_serving(cnn, base, warmup=False) == str(base / "2")
    before = _tree_hashes(base / "2")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ex.export_for_serving(_cnn(seed=9), base, version=2, warmup=False)
    assert _tree_hashes(base / "2") == before
    assert _entries(base) == ["1", "2"]
    assert ex.export_for_serving(cnn, base, version=7, warmup=False).endswith("7")
    assert ex.export_for_serving(cnn, base, warmup=False) == str(base / "8")


def test_overwrite_replaces_version(tmp_path, cnn):
    base = tmp_path / "m"
    ex.export_for_serving(cnn, base, warmup=False)
    other = _cnn(seed=9)
    path = ex.export_for_serving(other, base, version=1, overwrite=True,
                                 warmup=False, class_names=list("abcde"))
    assert path == str(base / "1") and _entries(base) == ["1"]
    images = _images(2).astype("float32")
    out = tf.saved_model.load(path).signatures["serving_default"](
        images=tf.constant(images))
    np.testing.assert_allclose(out["probabilities"], other(images), atol=1e-5)
    assert (base / "1/assets/labels.txt").read_text() == "a\nb\nc\nd\ne\n"


def test_crash_mid_export_leaves_nothing(tmp_path, cnn, monkeypatch):
    base = tmp_path / "m"
    original = writer._save_savedmodel

    def crash(model, spec, path):
        original(model, spec, path)
        (path / "half-written").write_text("x")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(writer, "_save_savedmodel", crash)
    with pytest.raises(KeyboardInterrupt):
        ex.export_for_serving(cnn, base)
    assert _entries(base) == []


def test_crash_during_overwrite_keeps_old_version(tmp_path, cnn, monkeypatch):
    base = tmp_path / "m"
    ex.export_for_serving(cnn, base, warmup=False)
    before = _tree_hashes(base / "1")

    def crash(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer, "_write_extra_formats", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        ex.export_for_serving(_cnn(seed=9), base, version=1, overwrite=True)
    assert _entries(base) == ["1"] and _tree_hashes(base / "1") == before


# ------------------------------------------------------------ side files


def test_labels_and_metadata(exported):
    assert (exported / "assets/labels.txt").read_text().splitlines() == NAMES
    meta = json.loads((exported / "assets.extra/tftransfer.json").read_text())
    assert meta["tftransfer_version"] == tftransfer.__version__
    assert meta["task"] == "classification"
    assert meta["input"]["shape"] == [None, *SHAPE]
    assert meta["input"]["value_range"] == [0, 255]
    assert meta["class_names"] == NAMES and meta["top_k"] == 3
    assert meta["backbone"] == "saved_models/digits_cnn.keras"
    assert meta["hyperparameters"] == {"learning_rate": 0.001}
    assert meta["metadata"] == {"dataset": "digits"}
    assert meta["signatures"] == ["serving_default", "serving_bytes"]
    age = datetime.datetime.now(datetime.timezone.utc) - \
        datetime.datetime.fromisoformat(meta["exported_at"])
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=10)


def test_warmup_records_are_prediction_logs_that_run(exported, loaded):
    path = exported / "assets.extra/tf_serving_warmup_requests"
    signatures = []
    for record in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        name = request.model_spec.signature_name
        signatures.append(name)
        inputs = {k: tf.constant(tf.make_ndarray(v))
                  for k, v in request.inputs.items()}
        out = loaded.signatures[name](**inputs)
        assert out["probabilities"].shape[0] == next(iter(inputs.values())).shape[0]
    assert signatures.count("serving_default") >= 1
    assert signatures.count("serving_bytes") >= 1


def test_default_install_writes_warmup_requests_without_warning(tmp_path, cnn):
    setup = configparser.ConfigParser()
    setup.read(pathlib.Path(__file__).resolve().parents[1] / "setup.cfg")
    required = setup["options"]["install_requires"].split()
    assert "tensorflow-serving-api>=2.21,<2.22" in required
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = ex.export_for_serving(cnn, tmp_path)
    assert not [w for w in caught if "serving-api" in str(w.message)]
    warmup = pathlib.Path(path, "assets.extra", "tf_serving_warmup_requests")
    assert sum(1 for _ in tf.data.TFRecordDataset(str(warmup))) == 3


def test_warmup_skipped_without_serving_api(tmp_path, cnn, monkeypatch):
    for name in ("tensorflow_serving", "tensorflow_serving.apis",
                 "tensorflow_serving.apis.predict_pb2",
                 "tensorflow_serving.apis.prediction_log_pb2"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.warns(UserWarning, match="tensorflow-serving-api"):
        path = ex.export_for_serving(cnn, tmp_path)
    assert not os.path.exists(os.path.join(path, "assets.extra",
                                           "tf_serving_warmup_requests"))


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_extra_formats_keras_and_tflite(tmp_path, cnn):
    path = pathlib.Path(ex.export_for_serving(
        cnn, tmp_path, warmup=False, extra_formats=("keras", "tflite")))
    meta = json.loads((path / "assets.extra/tftransfer.json").read_text())
    assert meta["extra_formats"]["tflite"]["max_abs_diff"] <= 1e-4
    images = _images(2).astype("float32")
    reloaded = keras.models.load_model(path / "assets.extra/model.keras")
    np.testing.assert_allclose(reloaded(images), cnn(images), atol=1e-6)
    interpreter = tf.lite.Interpreter(
        model_path=str(path / "assets.extra/model.tflite"))
    out = interpreter.get_signature_runner("serving_default")(images=images)
    np.testing.assert_allclose(out["probabilities"], cnn(images), atol=1e-4)


# ----------------------------------------------------------------- verify


def test_verify_passes_on_good_export(exported, cnn, tmp_path, capsys):
    model_path = tmp_path / "model.keras"
    cnn.save(model_path)
    assert cli.main(["verify", str(exported.parent),
                    "--compare", str(model_path)]) == 0
    out = capsys.readouterr().out
    assert "signature serving_bytes:" in out and "image_bytes: string" in out
    assert "max abs diff" in out and "3 PredictionLog records" in out
    assert "/v1/models/digits:predict" in out and '"b64": "' in out
    assert out.rstrip().endswith("OK: the export is ready for TF Serving")


def test_verify_fails_on_other_keras_model(exported, tmp_path, capsys):
    model_path = tmp_path / "other.keras"
    _cnn(seed=9).save(model_path)
    assert cli.main(["verify", str(exported), "--compare", str(model_path)]) == 1
    assert "--compare: outputs differ" in capsys.readouterr().err


def test_verify_fails_on_wrong_labels(exported, tmp_path, capsys):
    copy = tmp_path / "3"
    shutil.copytree(exported, copy)
    (copy / "assets/labels.txt").write_text("a\nb\n")
    assert cli.main(["verify", str(copy)]) == 1
    assert "labels.txt has 2 lines, the model has 5 outputs" in capsys.readouterr().err


def test_verify_reports_a_truncated_warmup_file(exported, tmp_path, capsys):
    copy = tmp_path / "4"
    shutil.copytree(exported, copy)
    warmup = copy / "assets.extra" / "tf_serving_warmup_requests"
    warmup.write_bytes(warmup.read_bytes()[:-7])
    assert cli.main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "FAIL: warmup: assets.extra/tf_serving_warmup_requests is corrupt after" in err
    assert "DataLossError" in err


def test_verify_cli_rejects_non_savedmodel(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    proc = subprocess.run(
        [sys.executable, "-m", "tftransfer.export", "verify", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "is not a SavedModel directory" in proc.stderr


def test_verify_fails_on_missing_signature(tmp_path, capsys):
    module = tf.Module()
    module.f = tf.function(lambda x: {"y": x * 2},
                           input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"other": module.f})
    assert cli.main(["verify", str(tmp_path)]) == 1
    assert "signature `serving_default` is missing" in capsys.readouterr().err


def test_verify_usage_errors(tmp_path, capsys):
    assert cli.main([]) == 2
    assert cli.main(["verify", str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


# ---------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kwargs, message", [
    ({"version": 0}, "`version` must be an integer >= 1, or None for the next one. "
     "Received: version=0"),
    ({"version": "3"}, "`version` must be an integer >= 1, or None for the next one. "
     "Received: version='3'"),
    ({"task": "boxes"}, "Unknown task for `task`. Valid names are: classification, "
     "multi_label, regression. Received: task='boxes'"),
    ({"class_names": ["a", "b"]}, "`class_names` must be a list of 5 non-empty strings "
     "without newlines, one per output. Received: class_names=['a', 'b']"),
    ({"top_k": 0}, "`top_k` must be an integer >= 1. Received: top_k=0"),
    ({"extra_formats": ("onnx",)}, "`extra_formats` must be a list of formats among keras, "
     "tflite. Received: extra_formats=('onnx',)"),
])
def test_bad_arguments(tmp_path, cnn, kwargs, message):
    with pytest.raises(ValueError) as info:
        ex.export_for_serving(cnn, tmp_path / "m", **kwargs)
    assert str(info.value) == message
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("source,extra", [
    ("digits_cnn_hub", {}),
    ("digits_cnn_tf1", {"signature": "image_feature_vector", "output_key": "feature_vector"}),
])
def test_finetuner_with_savedmodel_backbone_exports_and_reloads(tmp_path, source, extra):
    from conftest import SAVED

    from tftransfer import build_finetuner
    from tftransfer.datasets import load_digits_images

    model = build_finetuner(str(SAVED / source), num_classes=5, trainable="all", **extra)
    x, y = load_digits_images(classes=(5, 6, 7, 8, 9))
    model.fit(x[:32], y[:32], epochs=1, verbose=0)
    names = ["five", "six", "seven", "eight", "nine"]
    path = ex.export_for_serving(model, tmp_path / "digits", class_names=names)
    reloaded = tf.saved_model.load(path)
    out = reloaded.signatures["serving_default"](images=tf.constant(x[:8]))
    np.testing.assert_allclose(out["probabilities"].numpy(), model.predict(x[:8], verbose=0),
                               atol=1e-5)
    top = [names[i] for i in np.argmax(model.predict(x[:8], verbose=0), axis=1)]
    assert [row[0].decode() for row in out["labels"].numpy()] == top
    meta = json.loads((pathlib.Path(path) / "assets.extra" / "tftransfer.json").read_text())
    assert meta["backbone"] == str(SAVED / source)


def _modes(root):
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777
            for p in [root, *root.rglob("*")]}


def test_published_version_is_readable_by_other_users(exported):
    modes = _modes(exported)
    umask = os.umask(0)
    os.umask(umask)
    for name, mode in modes.items():
        directory = (exported / name).is_dir() if name != "." else True
        want = (0o755 if directory else 0o644) & ~umask
        assert mode == want, (name, oct(mode), oct(want))
    assert modes["."] & 0o005 == 0o005 or umask & 0o005  # others may list and enter it


def test_labels_edited_with_metadata_are_caught_by_verify_and_predict(exported, tmp_path,
                                                                       capsys):
    copy = tmp_path / "5"
    shutil.copytree(exported, copy)
    rotated = NAMES[1:] + NAMES[:1]  # every class renamed, the two files still agree
    (copy / "assets/labels.txt").write_text("\n".join(rotated) + "\n")
    meta_path = copy / "assets.extra/tftransfer.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "class_names": rotated}))
    assert cli.main(["verify", str(copy)]) == 1
    assert "labels.txt disagrees with the graph: class" in capsys.readouterr().err
    with pytest.raises(ValueError, match="disagrees with its graph"):
        tftransfer.predict(str(copy), _images(2))

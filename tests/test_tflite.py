"""Tests of LiteRT / ONNX export: quantization modes, labels inside, verification, predict."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from conftest import SAVED

import tftransfer
from tftransfer import build_finetuner, export_for_serving
from tftransfer.datasets import few_shot_split
from tftransfer.export import (
    VerificationError,
    _deploy_source,
    _tflite_metadata,
    read_labels,
    to_onnx,
    to_tflite,
)
from tftransfer.export import __main__ as cli
from tftransfer.export._litert import LiteRTModel
from tftransfer.export.onnx import OnnxModel
from tftransfer.export.tflite import convert

NAMES = ["five", "six", "seven", "eight", "nine"]
MODES = ("none", "dynamic", "float16", "int8")
# Least agreement with the Keras model per mode, and the bench's int8 tolerance.
AGREEMENT = {"none": 0.999, "dynamic": 0.95, "float16": 0.99, "int8": 0.95}
INT8_MAX_DROP_PTS = 1.0


@pytest.fixture(scope="module")
def task(digits_target):
    """The quickstart task: digits 5-9, 50 training images per class."""
    x, y = digits_target
    x_train, y_train, x_val, y_val = few_shot_split(x, y, per_class=50, seed=0)
    return (x_train, y_train), (x_val[:300], y_val[:300])


@pytest.fixture(scope="module")
def model(task):
    tf.keras.utils.set_random_seed(0)
    (x, y), _ = task
    m = build_finetuner(str(SAVED / "digits_cnn.keras"), num_classes=5, learning_rate=1e-2)
    m.class_names = NAMES
    m.fit(x, y, epochs=10, batch_size=32, verbose=0)
    return m


@pytest.fixture(scope="module")
def converted(model, task, tmp_path_factory):
    """One conversion per mode: {mode: report}."""
    out = tmp_path_factory.mktemp("tflite")
    train, val = task
    return {mode: to_tflite(model, out / f"digits_{mode}.tflite", quantization=mode,
                            representative_data=train, validation_data=val)
            for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_agrees_with_keras_on_labelled_images(converted, mode):
    report = converted[mode]
    assert report["passed"] and report["labelled"] and report["images"] == 300
    assert report["top1_agreement"] >= AGREEMENT[mode]
    assert report["distinct_predictions"] == 5
    assert report["latency_ms_per_image"] > 0 and report["reference_latency_ms_per_image"] > 0
    on_disk = json.loads(open(report["path"][:-len(".tflite")] + ".report.json").read())
    assert on_disk == report
    assert os.path.getsize(report["path"]) == report["size_bytes"]


def test_float_is_exact_int8_within_bench_tolerance_and_smaller(converted):
    assert converted["none"]["max_abs_diff"] < 1e-4
    assert converted["none"]["accuracy_drop_pts"] == 0
    assert converted["int8"]["accuracy_drop_pts"] <= INT8_MAX_DROP_PTS
    assert converted["int8"]["calibration_images"] == 250
    sizes = {m: converted[m]["size_bytes"] for m in MODES}
    assert sizes["int8"] < 0.35 * sizes["none"]
    assert sizes["dynamic"] < 0.35 * sizes["none"]
    assert sizes["float16"] < 0.6 * sizes["none"]


def test_labels_are_inside_the_file_and_beside_it(converted):
    path = converted["int8"]["path"]
    content = open(path, "rb").read()
    assert read_labels(path) == NAMES
    with zipfile.ZipFile(io.BytesIO(content)) as archive:  # TFLite metadata's packing
        assert archive.namelist() == ["labels.txt"]
        assert archive.getinfo("labels.txt").compress_type == zipfile.ZIP_STORED
        assert archive.read("labels.txt").decode().splitlines() == NAMES
    beside = os.path.join(os.path.dirname(path), "labels.txt")
    assert open(beside).read().splitlines() == NAMES
    runner = Interpreter(model_content=content).get_signature_runner("serving_default")
    assert runner(images=np.zeros((1, 32, 32, 3), np.float32))["probabilities"].shape == (1, 5)


def test_compaction_keeps_signature_labels_and_outputs_bit_identical(model, task, monkeypatch):
    source = _deploy_source.resolve(model, None)
    monkeypatch.setattr(_tflite_metadata, "compact", lambda m: m)  # the converter's own file
    full = convert(source, "int8", np.asarray(task[0][0][:20], np.float32))
    monkeypatch.undo()
    small = _tflite_metadata.add_labels(full, NAMES, float_input=True)
    assert len(small) < len(full) - 1000  # the fused tensor names alone are 1.6 kB
    x = task[1][0][:20]
    np.testing.assert_array_equal(LiteRTModel(small)(x), LiteRTModel(full)(x))
    interpreter = Interpreter(model_content=small)
    assert interpreter.get_signature_list() == {
        "serving_default": {"inputs": ["images"], "outputs": ["probabilities"]}}
    names = [d["name"] for d in interpreter.get_tensor_details()]
    assert sorted(n for n in names if n) == ["images", "probabilities"]
    assert read_labels(small) == NAMES


def test_shared_arrays_shrink_int8_and_weights_stay_16_byte_aligned(converted, task):
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    content = open(converted["int8"]["path"], "rb").read()
    end = content.rfind(b"PK\x03\x04")  # the labels zip after the flatbuffer
    tree = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    packed = {}
    for kind in (flatbuffers.Builder, _tflite_metadata.SharingBuilder):
        builder = kind(1024)
        builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
        packed[kind] = bytes(builder.Output())
    shared = packed[_tflite_metadata.SharingBuilder]
    assert len(shared) == end  # what to_tflite published
    # 234 per-channel zero points of 8 bytes, mostly identical vectors of zeros
    assert len(shared) < len(packed[flatbuffers.Builder]) - 1000
    x = task[1][0][:20]
    np.testing.assert_array_equal(LiteRTModel(content)(x), LiteRTModel(
        packed[flatbuffers.Builder] + content[end:])(x))
    root = schema.Model.GetRootAs(shared, 0)
    starts = [root.Buffers(i)._tab.Vector(root.Buffers(i)._tab.Offset(4))
              for i in range(root.BuffersLength()) if root.Buffers(i).DataLength()]
    assert len(starts) > 5 and all(start % 16 == 0 for start in starts)


def test_int8_model_takes_raw_pixels(converted, model, task):
    lite = LiteRTModel(converted["int8"]["path"])
    assert lite.input_shape == (32, 32, 3) and lite.class_names == NAMES
    x, _ = task[1]
    agree = np.mean(lite(x).argmax(-1) == model.predict(x, verbose=0).argmax(-1))
    assert agree >= AGREEMENT["int8"]
    assert np.mean(lite(x / 255.0).argmax(-1) == model.predict(x, verbose=0).argmax(-1)) < agree


def test_all_black_calibration_is_caught_and_nothing_published(model, task, tmp_path):
    black = np.zeros((64, 32, 32, 3), np.float32)
    with pytest.raises(VerificationError) as caught:
        to_tflite(model, tmp_path / "bad.tflite", quantization="int8",
                  representative_data=black, validation_data=task[1])
    message = str(caught.value)
    assert "top1_agreement=" in message and "< min_agreement=0.9" in message
    assert caught.value.report["top1_agreement"] < 0.5
    assert os.listdir(tmp_path) == []


def test_predict_on_tflite_matches_model_predict(converted, model, task, tmp_path):
    x = np.round(task[1][0][:8])  # whole pixel values, as PNG files keep them
    files = []
    for i, image in enumerate(x):
        files.append(str(tmp_path / f"{i}.png"))
        tf.io.write_file(files[-1], tf.io.encode_png(image.astype(np.uint8)))
    want = model.predict(x, verbose=0)
    for images in (x, files):
        got = tftransfer.predict(converted["none"]["path"], images, top_k=3)
        assert [r["label"] for r in got] == [NAMES[i] for i in want.argmax(-1)]
        np.testing.assert_allclose([r["score"] for r in got], want.max(-1), atol=1e-5)
        assert [len(r["top_k"]) for r in got] == [3] * 8
    keras_rows = tftransfer.predict(model, files, top_k=3)
    lite_rows = tftransfer.predict(converted["none"]["path"], files, top_k=3)
    assert [r["path"] for r in lite_rows] == files
    assert [[n for n, _ in r["top_k"]] for r in lite_rows] == [
        [n for n, _ in r["top_k"]] for r in keras_rows]


def test_existing_file_is_never_overwritten_silently(converted, model):
    path = converted["none"]["path"]
    before = open(path, "rb").read()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        to_tflite(model, path)
    assert open(path, "rb").read() == before


@pytest.mark.parametrize("kwargs, message", [
    ({"quantization": "int4"}, "Unknown `quantization`. Valid values are: none, dynamic, "
                               "float16, int8. Received: quantization='int4'"),
    ({"quantization": "int8"}, "quantization='int8' needs `representative_data`"),
    ({"io_type": "uint8"}, "An integer `io_type` needs quantization='int8'. "
                           "Received: io_type='uint8', quantization='none'"),
    ({"min_agreement": 1.5}, "`min_agreement` must be a number in [0, 1]. "
                             "Received: min_agreement=1.5"),
])
def test_bad_arguments(model, tmp_path, kwargs, message):
    with pytest.raises(ValueError) as caught:
        to_tflite(model, tmp_path / "m.tflite", **kwargs)
    assert message in str(caught.value)
    assert os.listdir(tmp_path) == []


def test_cli_int8_uint8_io_from_serving_export_and_folder(model, task, tmp_path, capsys):
    x, y = task[0]
    for i, (image, label) in enumerate(zip(x, y)):
        folder = tmp_path / "data" / NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        tf.io.write_file(str(folder / f"{i}.png"), tf.io.encode_png(image.astype(np.uint8)))
    base = export_for_serving(model, tmp_path / "export", class_names=NAMES, warmup=False)
    out = tmp_path / "lite" / "digits.tflite"
    argv = ["tflite", base, str(out), "--quantize", "int8", "--io", "uint8",
            "--data", str(tmp_path / "data")]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out.split("\nOK:")[0])
    assert report["io_type"] == "uint8" and report["images"] == 50  # the folder's 20%
    assert report["calibration_images"] == 200 and report["top1_agreement"] >= 0.95
    lite = LiteRTModel(out)
    assert lite.input_dtype == np.uint8 and lite.class_names == NAMES
    assert cli.main(argv) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def test_onnx_export_matches_keras(model, task, tmp_path):
    report = to_onnx(model, tmp_path / "digits.onnx", validation_data=task[1])
    assert report["top1_agreement"] == 1.0 and report["max_abs_diff"] < 1e-4
    onnx_model = OnnxModel(tmp_path / "digits.onnx")
    assert onnx_model.class_names == NAMES
    assert sorted(os.listdir(tmp_path)) == ["digits.onnx", "digits.report.json", "labels.txt"]


def test_search_config_export_formats(tmp_path, model, task):
    from tftransfer.export.formats import FORMATS, export_formats
    from tftransfer.search import config

    assert config.EXPORT_FORMATS == FORMATS
    space = {"search_space": {"backbone": "saved_models/digits_cnn.keras"}}
    run = config.validate({**space, "run": {"export_formats": ["serving", "tflite-int8"]}})
    assert run["run"]["export_formats"] == ["serving", "tflite-int8"]
    assert config.validate(space)["run"]["export_formats"] == ["serving"]
    with pytest.raises(config.ConfigError) as caught:
        config.validate({**space, "run": {"export_formats": ["tflite-int4"]}})
    assert str(caught.value).startswith("`run.export_formats` must be a non-empty list of "
                                        "distinct names from ['serving',")
    # the spelling `export: {formats: [...]}` is the same setting, given once
    both = config.validate({**space, "export": {"formats": ["serving", "onnx"]}})
    assert both["run"]["export_formats"] == ["serving", "onnx"]
    with pytest.raises(config.ConfigError, match=r"^`export.formats` must be given once"):
        config.validate({**space, "export": {"formats": ["onnx"]},
                         "run": {"export_formats": ["serving"]}})
    with pytest.raises(config.ConfigError, match=r"^`export.format` must be one of the keys"):
        config.validate({**space, "export": {"format": ["onnx"]}})
    paths = export_formats(model, tmp_path, ["serving", "tflite-float16"],
                           validation_data=task[1], class_names=NAMES)
    assert paths["serving"] == str(tmp_path / "1")
    assert read_labels(paths["tflite-float16"]) == NAMES

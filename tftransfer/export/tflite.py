"""LiteRT (TFLite) export with post-training quantization, labels inside, verified.

`to_tflite(model, "digits_int8.tflite", quantization="int8",
representative_data=data)` converts the model's serving function (its
preprocessing layer included, so the `.tflite` takes raw 0-255 pixels like
every other form of the model), puts the class names inside the file (TFLite
model metadata, `labels.txt` as associated file), runs it with the LiteRT
interpreter on validation images against the model, and publishes
`digits_int8.tflite`, `labels.txt` and `digits_int8.report.json` only when the
two agree. Command line: `python -m tftransfer.export tflite MODEL OUT
--quantize int8 --data DIR`.

Conversion goes through a SavedModel written by `keras.export.ExportArchive`:
`TFLiteConverter.from_concrete_functions` on a Keras 3 model leaves the weights
as resource variables that the converted model cannot read (it outputs NaN, or
int8 calibration fails with "READ_VARIABLE failed to invoke"), while
`from_saved_model` freezes them.
"""

import json
import os
import pathlib
import tempfile
import warnings

import tensorflow as tf

from tftransfer.export import _deploy_check, _deploy_source, _tflite_metadata
from tftransfer.export._litert import LiteRTModel

QUANTIZATIONS = ("none", "dynamic", "float16", "int8")
IO_TYPES = {"float": None, "int8": tf.int8, "uint8": tf.uint8}
NUM_CALIBRATION = 300
NUM_VALIDATION = 1000


def _none(converter, representative):
    del converter, representative  # float32, as trained


def _dynamic(converter, representative):
    del representative  # weights int8, activations float: no calibration
    converter.optimizations = [tf.lite.Optimize.DEFAULT]


def _float16(converter, representative):
    del representative
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]


def _int8(converter, representative):
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in representative)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]


_MODES = {"none": _none, "dynamic": _dynamic, "float16": _float16, "int8": _int8}


def to_tflite(model, path, *, quantization="none", representative_data=None,
              validation_data=None, io_type="float", min_agreement=None, class_names=None,
              num_calibration=NUM_CALIBRATION, overwrite=False):
    """Converts, verifies and publishes a `.tflite` model with its labels inside.

    Args:
        model: A `FineTuner` (or a Keras model taking 0-255 images), a `.keras`
            file or a serving export directory (`export_for_serving`).
        path: The `.tflite` file to write; `labels.txt` and
            `<name>.report.json` are written beside it.
        quantization: `"none"` (float32), `"dynamic"` (int8 weights, float
            activations), `"float16"` (float16 weights) or `"int8"` (full
            integer, calibrated on `representative_data`). Defaults to `"none"`.
        representative_data: Training images to calibrate int8 on (an
            `ImageData`, whose `train` split is read; a folder of class
            subfolders; an array `[n, H, W, C]` in 0-255; or an `(x, y)`
            pair). Required for `"int8"`; at most `num_calibration` are used.
        validation_data: Labelled images to verify on (same forms; an
            `ImageData`'s `validation` split). Defaults to the representative
            data, else 32 random images (agreement only, no accuracy).
        io_type: `"float"` (float32 0-255 pixels in, float scores out),
            `"int8"` or `"uint8"` (integer input and output tensors; int8 only).
            Defaults to `"float"`.
        min_agreement: Float in [0, 1], the least share of images on which the
            `.tflite` must pick the model's top-1 class. Defaults to `0.9`.
        class_names: One name per output; defaults to the model's.
        num_calibration: Integer, the most representative images used.
            Defaults to `300`.
        overwrite: Replace existing files. Defaults to `False` (then an
            existing file raises `FileExistsError` before any work).

    Returns:
        The report (the content of `<name>.report.json`) as a dict, with `path`.

    Raises:
        VerificationError: The converted model agrees too little with `model`
            (nothing is written; the error names the figure and threshold).
        FileExistsError: A target exists and `overwrite` is False.
        ValueError: A bad argument.

    Example:
        >>> report = to_tflite(model, "out/digits_int8.tflite", quantization="int8",
        ...                    representative_data=(x_train, y_train))
        >>> report["top1_agreement"], report["size_bytes"]
        (0.977, 30712)
    """
    quantization, io_type, min_agreement = _check_args(quantization, io_type, min_agreement,
                                                       representative_data)
    path = _check_path(path)
    _deploy_check.refuse_existing({str(path): None}, overwrite)
    source = _deploy_source.resolve(model, class_names)
    labels = ("\n".join(source.class_names) + "\n").encode()
    side = {str(path.with_name(_tflite_metadata.LABELS_NAME)): labels}
    _deploy_check.refuse_existing(side, overwrite)
    calibration = None
    if representative_data is not None:
        calibration = _deploy_source.images(representative_data, source.input_shape,
                                            split="train", limit=num_calibration,
                                            argument="representative_data")[0]
    content = convert(source, quantization, calibration, io_type)
    report = verify(source, content, validation_data, representative_data, min_agreement,
                    what=f"{quantization} .tflite")
    report.update(format="tflite", quantization=quantization, io_type=io_type,
                  path=str(path), class_names=source.class_names,
                  calibration_images=0 if calibration is None else len(calibration))
    files = {**side, _report_path(path): json.dumps(report, indent=2).encode(),
             str(path): content}
    _deploy_check.publish(files, overwrite)
    return report


def _check_args(quantization, io_type, min_agreement, representative_data):
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"Unknown `quantization`. Valid values are: {', '.join(QUANTIZATIONS)}. "
                         f"Received: quantization={quantization!r}")
    if io_type not in IO_TYPES:
        raise ValueError(f"Unknown `io_type`. Valid values are: {', '.join(IO_TYPES)}. "
                         f"Received: io_type={io_type!r}")
    if io_type != "float" and quantization != "int8":
        raise ValueError("An integer `io_type` needs quantization='int8'. "
                         f"Received: io_type={io_type!r}, quantization={quantization!r}")
    if quantization == "int8" and representative_data is None:
        raise ValueError("quantization='int8' needs `representative_data`: a few hundred "
                         "training images (an ImageData, a folder or an array in 0-255) to "
                         "calibrate on. Received: representative_data=None")
    agreement = _deploy_check.MIN_AGREEMENT if min_agreement is None else min_agreement
    return quantization, io_type, _deploy_check.check_min_agreement(agreement)


def _check_path(path):
    path = pathlib.Path(path)
    if path.suffix != ".tflite":
        raise ValueError(f"`path` must end in .tflite. Received: path={str(path)!r}")
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _report_path(path):
    return str(path.with_name(path.stem + ".report.json"))


def convert(source, quantization, calibration, io_type="float"):
    """The `.tflite` bytes of `source`, quantized, with its labels inside."""
    with tempfile.TemporaryDirectory(prefix="tftransfer-tflite-") as tmp:
        source.write_savedmodel(tmp)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            tmp, signature_keys=[_deploy_source.SIGNATURE])
        _MODES[quantization](converter, calibration)
        converter.exclude_conversion_metadata = True  # converter options, not read at run time
        if IO_TYPES[io_type] is not None:
            converter.inference_input_type = converter.inference_output_type = IO_TYPES[io_type]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flatbuffer = converter.convert()
    return _tflite_metadata.add_labels(flatbuffer, source.class_names,
                                       float_input=io_type == "float",
                                       channels=source.input_shape[-1])


def verify(source, content, validation_data, representative_data, min_agreement, *, what):
    """The report of `content` against `source`; raises `VerificationError` below
    `min_agreement`."""
    candidate = LiteRTModel(content)
    x, y = validation_images(source, validation_data, representative_data)
    report = _deploy_check.compare(source.call, candidate, x, y, source.task)
    report["size_bytes"] = len(content)
    report["task"] = source.task
    _deploy_check.enforce(report, min_agreement, what)
    return report


def validation_images(source, validation_data, representative_data):
    """Validation images (and labels): given, else representative, else random."""
    data = validation_data if validation_data is not None else representative_data
    if data is None:
        from tftransfer.export._contract import sample_images

        warnings.warn("No `validation_data`: the converted model is only compared with the "
                      "reference on 32 random images (no accuracy).", stacklevel=3)
        return sample_images(source.input_shape, batch=32), None
    return _deploy_source.images(data, source.input_shape, split="validation",
                                 limit=NUM_VALIDATION, argument="validation_data")


def read_labels(path):
    """The class names stored inside a `.tflite` file (None without metadata)."""
    return _tflite_metadata.read_labels(os.fspath(path))

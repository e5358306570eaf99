"""ONNX export: tf2onnx from the serving SavedModel, verified with onnxruntime.

`to_onnx(model, "digits.onnx", validation_data=data)` writes the model's
serving function (preprocessing included: raw 0-255 float pixels in, scores
out) as ONNX, puts the class names in the model's `metadata_props`
(`labels`, one per line), checks it with onnxruntime against the model the
way `to_tflite` checks LiteRT, and publishes `digits.onnx`, `labels.txt` and
`digits.report.json` only when they agree. Needs the `onnx` extra
(`pip install tftransfer[onnx]`: tf2onnx, onnxruntime).

tf2onnx runs as `python -m tf2onnx.convert --saved-model ...` in a child
process: its documented interface, and one that keeps its graph rewrites out
of this process.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

from tftransfer.export import _deploy_check, _deploy_source
from tftransfer.export.tflite import validation_images

OPSET = 17
LABELS_KEY = "labels"


class OnnxModel:
    """An `.onnx` image model run by onnxruntime, as a function of 0-255 images.

    Args:
        model: The path of an `.onnx` file, or its bytes.
    """

    def __init__(self, model):
        import onnxruntime

        content = model if isinstance(model, (bytes, bytearray)) else pathlib.Path(
            model).read_bytes()
        self.size_bytes = len(content)
        self._session = onnxruntime.InferenceSession(bytes(content),
                                                     providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        meta = self._session.get_modelmeta().custom_metadata_map
        self.class_names = meta[LABELS_KEY].splitlines() if LABELS_KEY in meta else None

    def __call__(self, images):
        """Float32 scores `[n, k]` of float `images` `[n, H, W, C]` in 0-255."""
        feed = {self._input: np.asarray(images, np.float32)}
        return np.asarray(self._session.run(None, feed)[0], np.float32)


def to_onnx(model, path, *, validation_data=None, min_agreement=None, class_names=None,
            opset=OPSET, overwrite=False):
    """Converts, verifies and publishes an `.onnx` model with its labels inside.

    Args:
        model: A `FineTuner` (or a Keras model taking 0-255 images), a `.keras`
            file or a serving export directory.
        path: The `.onnx` file to write; `labels.txt` and `<name>.report.json`
            are written beside it.
        validation_data: Labelled images to verify on (as for `to_tflite`).
            Defaults to 32 random images (agreement only).
        min_agreement: Float in [0, 1]. Defaults to `0.9`.
        class_names: One name per output; defaults to the model's.
        opset: Integer, the ONNX opset. Defaults to `17`.
        overwrite: Replace existing files. Defaults to `False`.

    Returns:
        The report (the content of `<name>.report.json`) as a dict.

    Raises:
        VerificationError: onnxruntime's results agree too little with `model`.
        RuntimeError: tf2onnx failed (its last lines are in the message).
        FileExistsError: A target exists and `overwrite` is False.
    """
    agreement = _deploy_check.check_min_agreement(
        _deploy_check.MIN_AGREEMENT if min_agreement is None else min_agreement)
    path = pathlib.Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"`path` must end in .onnx. Received: path={str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    _deploy_check.refuse_existing({str(path): None}, overwrite)
    source = _deploy_source.resolve(model, class_names)
    labels = ("\n".join(source.class_names) + "\n").encode()
    side = {str(path.with_name("labels.txt")): labels}
    _deploy_check.refuse_existing(side, overwrite)
    content = convert(source, opset)
    x, y = validation_images(source, validation_data, None)
    report = _deploy_check.compare(source.call, OnnxModel(content), x, y, source.task)
    report.update(size_bytes=len(content), task=source.task)
    _deploy_check.enforce(report, agreement, "ONNX model")
    report.update(format="onnx", opset=opset, path=str(path), class_names=source.class_names)
    report_path = str(path.with_name(path.stem + ".report.json"))
    _deploy_check.publish({**side, report_path: json.dumps(report, indent=2).encode(),
                           str(path): content}, overwrite)
    return report


def convert(source, opset=OPSET):
    """The `.onnx` bytes of `source`'s serving function, class names in metadata."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="tftransfer-onnx-") as tmp:
        saved = os.path.join(tmp, "saved_model")
        source.write_savedmodel(saved)
        out = os.path.join(tmp, "model.onnx")
        command = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", saved,
                   "--signature_def", _deploy_source.SIGNATURE, "--opset", str(opset),
                   "--output", out]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0 or not os.path.isfile(out):
            tail = "\n".join(done.stderr.strip().splitlines()[-8:])
            raise RuntimeError(f"tf2onnx could not convert the model (exit {done.returncode}):"
                               f"\n{tail}")
        model = onnx.load(out)
    entry = model.metadata_props.add()
    entry.key, entry.value = LABELS_KEY, "\n".join(source.class_names)
    onnx.checker.check_model(model)
    return model.SerializeToString()

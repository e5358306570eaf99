"""Runs a `.tflite` image model with the LiteRT interpreter, on 0-255 float pixels.

Shared by the verification step of `to_tflite` and by `tftransfer.predict`, so
that both feed a quantized model the same way: float32 images in 0-255 go in
(quantized to the input tensor's int8/uint8 scale when the model takes
integers), dequantized float scores come out.

Example:
    >>> model = LiteRTModel("digits_int8.tflite")
    >>> model(images).shape, model.class_names
    ((8, 5), ['five', 'six', 'seven', 'eight', 'nine'])
"""

import os

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from tftransfer.export import _tflite_metadata

SIGNATURE = "serving_default"
_TASKS = {"probabilities": "classification", "scores": "multi_label", "values": "regression"}


class LiteRTModel:
    """A `.tflite` image classifier (or regressor) as a function of 0-255 images.

    Args:
        model: The path of a `.tflite` file, or its bytes.
        num_threads: Integer, interpreter threads. Defaults to `None` (LiteRT's
            choice).

    Attributes:
        input_shape: `(H, W, C)` of one image.
        class_names: The names stored in the file's metadata, or None.
        input_dtype / output_dtype: numpy dtypes of the tensors.
    """

    def __init__(self, model, *, num_threads=None):
        content = model if isinstance(model, (bytes, bytearray)) else _read(model)
        self.size_bytes = len(content)
        self._interpreter = Interpreter(model_content=bytes(content), num_threads=num_threads)
        signatures = self._interpreter.get_signature_list()
        key = SIGNATURE if SIGNATURE in signatures else next(iter(signatures), None)
        if key is None:
            raise ValueError("The .tflite file has no signature to run; convert it with "
                             "tftransfer.export.to_tflite.")
        self._runner = self._interpreter.get_signature_runner(key)
        self._input = signatures[key]["inputs"][0]
        self._output = _primary(signatures[key]["outputs"])
        self._in = self._runner.get_input_details()[self._input]
        self._out = self._runner.get_output_details()[self._output]
        self.input_shape = tuple(int(d) for d in self._in["shape"][1:])
        self.input_dtype, self.output_dtype = self._in["dtype"], self._out["dtype"]
        self.class_names = _tflite_metadata.read_labels(content)

    def __call__(self, images):
        """Float32 scores `[n, k]` of float `images` `[n, H, W, C]` in 0-255."""
        images = np.asarray(images, np.float32)
        outputs = self._runner(**{self._input: _quantize(images, self._in)})
        return _dequantize(outputs[self._output], self._out)

    @property
    def task(self):
        """The task, from the output's name (as `to_tflite` names it)."""
        return _TASKS.get(self._output, "classification")

    @property
    def num_outputs(self):
        shape = self._out["shape"]
        return int(shape[-1]) if len(shape) > 1 else 1


def _read(path):
    path = os.fspath(path)
    with open(path, "rb") as f:
        return f.read()


def _primary(outputs):
    """The scores output: the one named like the serving export's, else the first."""
    for name in _TASKS:
        if name in outputs:
            return name
    return outputs[0]


def _quantize(images, detail):
    """`images` as the input tensor wants them (float, or int8/uint8 via its scale)."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return images.astype(dtype)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(images / scale + zero_point), info.min, info.max).astype(dtype)


def _dequantize(values, detail):
    if np.dtype(detail["dtype"]).kind == "f":
        return values.astype(np.float32)
    scale, zero_point = detail["quantization"]
    return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)

"""`predict` on a `.tflite` file: the LiteRT model behind the same `_Predictor`.

The images are decoded and resized as for every other form of the model; the
file's own metadata gives the class names (`labels.txt` beside it otherwise).
"""

import pathlib

from tftransfer.export._litert import LiteRTModel


def predictor_args(path):
    """`(call, input_shape, class_names, task)` for `_Predictor` from a `.tflite` path."""
    model = LiteRTModel(path)
    names = model.class_names or _labels_beside(path) or [
        str(i) for i in range(model.num_outputs)]
    return (lambda images: model(images.numpy()), model.input_shape, names, model.task)


def _labels_beside(path):
    labels = pathlib.Path(path).with_name("labels.txt")
    return labels.read_text().splitlines() if labels.is_file() else None

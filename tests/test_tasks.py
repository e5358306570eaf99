"""One task rule: the FineTuner, the export and `predict` read a model's task and
labels the same way (`tftransfer.tasks`)."""

import json
import pathlib

import keras
import numpy as np
import pytest
from conftest import SAVED

from tftransfer import FineTuner, build_finetuner, export_for_serving, predict, tasks

SHAPE = (16, 16, 3)


def _plain(last):
    """A Keras model (not a FineTuner) with 3 outputs that ends in `last`."""
    inputs = keras.Input(SHAPE)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    return keras.Model(inputs, last(keras.layers.Dense(3)(x)))


ENDINGS = {
    "softmax_layer": (keras.layers.Softmax, "classification"),
    "softmax_activation": (lambda: keras.layers.Activation("softmax"), "classification"),
    "sigmoid_activation": (lambda: keras.layers.Activation("sigmoid"), "multi_label"),
    "linear": (lambda: keras.layers.Identity(), "regression"),
}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_export_and_predict_agree_on_the_task(ending, tmp_path):
    make, task = ENDINGS[ending]
    model = _plain(make())
    images = np.random.default_rng(0).uniform(0, 255, (2, *SHAPE)).astype("float32")
    assert tasks.task_of(model) == task
    path = pathlib.Path(export_for_serving(model, tmp_path, warmup=False))
    assert json.loads((path / "assets.extra" / "tftransfer.json").read_text())["task"] == task
    for source in (model, str(path)):
        results = predict(source, images)
        if task == "regression":
            assert [r["label"] for r in results] == [None, None]
        else:
            assert all(r["label"] in ("0", "1", "2") for r in results)
            assert ("labels" in results[0]) == (task == "multi_label")


@pytest.mark.parametrize("task,num_classes", [
    ("classification", 3), ("multi_label", 3), ("regression", 1)])
def test_a_finetuner_inside_another_model_is_read_as_its_task(task, num_classes):
    model = build_finetuner(str(SAVED / "digits_cnn.keras"), num_classes=num_classes, task=task)
    assert isinstance(model, FineTuner) and tasks.task_of(model) == task
    inputs = keras.Input(model.input_shape[1:])
    wrapped = keras.Model(inputs, model(inputs))  # no `task` attribute: read from the head
    assert tasks.task_of(wrapped) == task


def test_task_names_are_canonical_and_unknown_ones_refused():
    assert tasks.check_task("Multi-Label") == "multi_label"
    with pytest.raises(ValueError, match=r"Did you mean 'regression'\?.*Received: task='regresion'"):
        tasks.check_task("regresion")


def test_finetuner_and_export_refuse_bad_class_names_alike(tmp_path):
    model = build_finetuner(str(SAVED / "digits_cnn.keras"), num_classes=3)
    with pytest.raises(ValueError) as from_model:
        model.class_names = ["a", "b"]
    with pytest.raises(ValueError) as from_export:
        export_for_serving(model, tmp_path, class_names=["a", "b"], warmup=False)
    assert str(from_model.value) == str(from_export.value) == (
        "`class_names` must be a list of 3 non-empty strings without newlines, one per "
        "output. Received: class_names=['a', 'b']")

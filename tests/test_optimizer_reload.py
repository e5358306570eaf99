"""Every optimizer of the table, with and without `weight_decay` and
`layerwise_lr_decay`, reloads with `keras.models.load_model` in a new process
after `import tftransfer` only, predicts identically and trains on."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
from conftest import ROOT

from tftransfer import build_finetuner
from tftransfer._names import OPTIMIZERS

# (weight_decay, layerwise_lr_decay) of each variant.
VARIANTS = {"plain": (None, None), "decay": (1e-2, None), "layerwise": (None, 0.5)}

# Runs in the new process: load every model, compare, train one more step.
_RELOAD = """
import json, sys
import numpy as np
import keras
import tftransfer  # noqa: F401  (registers tftransfer's classes; nothing else is imported)

folder = sys.argv[1]
data = np.load(f"{folder}/data.npz")
report = {}
for name in json.loads(open(f"{folder}/cases.json").read()):
    model = keras.models.load_model(f"{folder}/{name}.keras")
    model.run_eagerly = True  # one step each: tracing would cost more than it runs
    same = bool(np.array_equal(model.predict_on_batch(data["x"]), data[name]))
    before = [np.array(w) for w in model.trainable_weights]
    model.train_on_batch(data["x"], data["y"])
    moved = any(not np.array_equal(a, np.array(w)) for a, w in zip(before, model.trainable_weights))
    report[name] = {"optimizer": type(model.optimizer).__name__, "same": same, "moved": moved,
                    "config": json.loads(json.dumps(model.optimizer.get_config(), default=str))}
print(json.dumps(report))
"""


def _backbone():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv_a")(inputs)
    x = keras.layers.Conv2D(4, 3, name="conv_b")(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def _saved_model(path, optimizer, weight_decay, layerwise, x, y):
    model = build_finetuner(_backbone(), num_classes=3, trainable="all", optimizer=optimizer,
                            learning_rate=1e-2, weight_decay=weight_decay)
    if layerwise is not None:
        model.compile_stage(layerwise_lr_decay=layerwise)
    model.run_eagerly = True  # one step each: tracing would cost more than it runs
    model.train_on_batch(x, y)  # the optimizer has state to save
    model.save(path)
    return model


def test_every_optimizer_reloads_in_a_new_process(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (6, 8, 8, 3)).astype("float32")
    y = np.array([0, 1, 2, 0, 1, 2])
    outputs, expected = {}, {}
    for optimizer in OPTIMIZERS:
        for variant, (decay, layerwise) in VARIANTS.items():
            name = f"{optimizer}-{variant}"
            model = _saved_model(tmp_path / f"{name}.keras", optimizer, decay, layerwise, x, y)
            outputs[name] = np.asarray(model.predict_on_batch(x))
            expected[name] = (type(model.optimizer).__name__,
                              model.optimizer.get_config().get("lr_multipliers"))
    np.savez(tmp_path / "data.npz", x=x, y=y, **outputs)
    (tmp_path / "cases.json").write_text(json.dumps(sorted(outputs)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(report) == sorted(outputs)
    for name, (cls, multipliers) in expected.items():
        assert report[name]["optimizer"] == cls, name
        assert report[name]["config"].get("lr_multipliers") == multipliers, name
        assert report[name]["same"] and report[name]["moved"], (name, report[name])
    fine_tune_classes = {report[n]["optimizer"] for n in report if not n.endswith("plain")}
    assert len(fine_tune_classes) == len(OPTIMIZERS)
    assert all(c.startswith("FineTune") for c in fine_tune_classes)

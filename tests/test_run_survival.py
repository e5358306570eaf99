"""Runs that survive what real runs meet: kill -9 in either stage, an interrupted overwrite,
a corrupt or half-written backup, another recipe on resume, an empty validation split,
a 1,000-class report."""

import csv
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import SAVED, Crash, EpochCount

from tftransfer import build_finetuner, evaluate_classifier, fine_tune
from tftransfer import data as tfdata
from tftransfer.datasets import few_shot_split
from tftransfer.reports import plot_confusion_matrix

DIGITS = str(SAVED / "digits_cnn.keras")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.fixture(scope="module")
def few_shot(digits_target):
    x, y = digits_target
    x_few, y_few, x_rest, y_rest = few_shot_split(x, y, per_class=8, seed=0)
    x_val, y_val, _, _ = few_shot_split(x_rest, y_rest, per_class=4, seed=1)
    return (x_few, y_few), (x_val, y_val)


def _epochs_logged(run_dir):
    with open(os.path.join(run_dir, "history.csv")) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


RUN = """
import json, os, signal, sys
import keras, numpy as np
import tensorflow as tf
from tftransfer import build_finetuner, fine_tune
from tftransfer.datasets import few_shot_split, load_digits_images

out, kill_epoch, kill_batch = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

class Kill(keras.callbacks.Callback):  # a deterministic kill -9, mid-epoch
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == (kill_epoch, kill_batch):
            os.kill(os.getpid(), signal.SIGKILL)
    def on_epoch_end(self, epoch, logs=None):
        print("EPOCH", epoch, flush=True)

tf.config.experimental.enable_op_determinism()
keras.utils.set_random_seed(0)
x, y = load_digits_images(classes=(5, 6, 7, 8, 9))
x, y, xv, yv = few_shot_split(x, y, per_class=8, seed=0)
model = build_finetuner(sys.argv[1], num_classes=5, learning_rate=1e-2)
history = fine_tune(model, (x, y), (xv[:40], yv[:40]), head_epochs=3, fine_tune_epochs=2,
                    batch_size=8, shuffle=False, early_stopping=None, verbose=0,
                    output_dir=out, callbacks=[Kill()])
np.savez(os.path.join(out, "weights.npz"), *model.get_weights())
with open(os.path.join(out, "result.json"), "w") as f:
    json.dump({"history": history.history, "stages": history.stages}, f)
"""


@pytest.fixture(scope="module")
def run_script(tmp_path_factory):
    """`run(out, kill_epoch, kill_batch)`: RUN in a new process; `base / "whole"` is
    the uninterrupted run, made once for both kills."""
    base = tmp_path_factory.mktemp("survival")
    script = base / "run.py"
    script.write_text(RUN)

    def run(out, kill_epoch=-1, kill_batch=-1):
        return subprocess.run([sys.executable, str(script), DIGITS, str(out),
                               str(kill_epoch), str(kill_batch)],
                              capture_output=True, text=True, env=ENV, timeout=600)

    whole = run(base / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    return run, base / "whole"


@pytest.mark.slow
@pytest.mark.parametrize("kill_epoch, ran_after", [
    (1, [1, 2, 3, 4]),  # stage 1 is epochs 0-2
    (4, [4]),  # stage 2 (3-4): a resumed weight average goes on as the uninterrupted one
])
def test_kill_9_resumes_to_the_uninterrupted_run(run_script, tmp_path, kill_epoch, ran_after):
    run, whole = run_script
    killed = run(tmp_path / "killed", kill_epoch=kill_epoch, kill_batch=2)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ran = [int(line.split()[1]) for line in resumed.stdout.splitlines() if line.startswith("EPOCH")]
    assert ran == ran_after  # from the start of the epoch the kill cut short
    dirs = {"whole": whole, "killed": tmp_path / "killed"}
    results = {name: json.loads((d / "result.json").read_text()) for name, d in dirs.items()}
    assert results["killed"]["stages"] == results["whole"]["stages"] == {
        "head": [0, 3], "fine_tune": [3, 5]}
    assert _epochs_logged(tmp_path / "killed") == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(results["killed"]["history"]["val_loss"],
                               results["whole"]["history"]["val_loss"], rtol=1e-4, atol=1e-5)
    weights = {name: np.load(d / "weights.npz") for name, d in dirs.items()}
    for key in weights["whole"].files:
        np.testing.assert_allclose(weights["killed"][key], weights["whole"][key],
                                   rtol=1e-4, atol=1e-5)


LOAD = """
import sys, keras, numpy as np, tftransfer
model = keras.models.load_model(sys.argv[1])
print("OK", model.predict(np.zeros((1, 32, 32, 3), "float32"), verbose=0).shape)
"""


def test_interrupted_overwrite_keeps_the_old_run_until_the_new_one_publishes(few_shot,
                                                                           tmp_path):
    train, val = few_shot
    out = tmp_path / "run"
    run = dict(head_epochs=1, fine_tune_epochs=2, early_stopping=None, verbose=0,
               output_dir=out)
    fine_tune(build_finetuner(DIGITS, num_classes=5), train, val, **run)
    model_bytes = (out / "model.keras").read_bytes()
    state = (out / "fine_tune_state.json").read_text()
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C as epoch 1 begins
        fine_tune(build_finetuner(DIGITS, num_classes=5), train, val, overwrite=True,
                  callbacks=[Crash(1, KeyboardInterrupt)], **run)
    assert (out / "model.keras").read_bytes() == model_bytes
    assert (out / "fine_tune_state.json").read_text() == state
    assert _epochs_logged(out) == [0, 1, 2]
    loaded = subprocess.run([sys.executable, "-c", LOAD, str(out / "model.keras")],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert "OK (1, 5)" in loaded.stdout, loaded.stderr[-2000:]
    count = EpochCount()  # the same call again resumes the replacement, then publishes it
    fine_tune(build_finetuner(DIGITS, num_classes=5), train, val, overwrite=True,
              callbacks=[count], **run)
    assert count.epochs == [1, 2]
    assert (out / "model.keras").read_bytes() != model_bytes
    assert json.loads((out / "fine_tune_state.json").read_text())["done"]
    assert not (out / ".replacement").exists() and _epochs_logged(out) == [0, 1, 2]


def test_corrupt_latest_backup_falls_back_to_the_one_before(few_shot, tmp_path):
    train, val = few_shot
    out = tmp_path / "run"
    run = dict(head_epochs=1, fine_tune_epochs=4, early_stopping=None, verbose=0,
               output_dir=out)
    with pytest.raises(RuntimeError, match="killed"):
        fine_tune(build_finetuner(DIGITS, num_classes=5), train, val,
                  callbacks=[Crash(4)], **run)
    backups = out / "backup" / "stage2"
    assert sorted(os.listdir(backups)) == ["epoch-00003.weights.h5", "epoch-00004.weights.h5"]
    latest = backups / "epoch-00004.weights.h5"
    latest.write_bytes(latest.read_bytes()[:2000])  # as a full disk leaves it
    count = EpochCount()
    with pytest.warns(UserWarning, match="epoch-00004.weights.h5 cannot be read"):
        fine_tune(build_finetuner(DIGITS, num_classes=5), train, val, callbacks=[count], **run)
    assert count.epochs == [3, 4]  # from the backup after epoch 2
    assert _epochs_logged(out) == [0, 1, 2, 3, 4]


def test_backup_cut_short_by_a_full_disk_is_never_published(few_shot, tmp_path, monkeypatch):
    train, val = few_shot
    out = tmp_path / "run"
    run = dict(head_epochs=1, fine_tune_epochs=3, early_stopping=None, verbose=0,
               output_dir=out)
    save, stage2_saves = keras.Model.save_weights, []

    def full_disk(self, filepath, *args, **kwargs):
        if "stage2" in str(filepath):
            stage2_saves.append(filepath)
            if len(stage2_saves) == 2:
                with open(filepath, "wb") as f:
                    f.write(b"\x89HDF\r\n\x1a\n" + bytes(100))
                raise OSError(28, "No space left on device")
        return save(self, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save_weights", full_disk)
    with pytest.raises(OSError, match="No space left"):
        fine_tune(build_finetuner(DIGITS, num_classes=5), train, val, **run)
    monkeypatch.setattr(keras.Model, "save_weights", save)
    names = os.listdir(out / "backup" / "stage2")
    assert [n for n in names if not n.startswith(".tmp-")] == ["epoch-00002.weights.h5"]
    count = EpochCount()
    fine_tune(build_finetuner(DIGITS, num_classes=5), train, val, callbacks=[count], **run)
    assert count.epochs == [2, 3]
    assert _epochs_logged(out) == [0, 1, 2, 3]


def test_resume_refuses_a_model_built_with_another_recipe(few_shot, tmp_path):
    train, val = few_shot
    out = tmp_path / "run"
    run = dict(head_epochs=1, fine_tune_epochs=2, early_stopping=None, verbose=0,
               output_dir=out)
    with pytest.raises(RuntimeError, match="killed"):
        fine_tune(build_finetuner(DIGITS, num_classes=5, learning_rate=0.01), train, val,
                  callbacks=[Crash(2)], **run)
    other = build_finetuner(DIGITS, num_classes=5, learning_rate=0.5)
    with pytest.raises(ValueError, match=r"`output_dir` '.*run' holds an unfinished fine_tune "
                       r"run with other data or settings \(changed: recipe.learning_rate "
                       r"\(was 0.01, now 0.5\)\)"):
        fine_tune(other, train, val, **run)
    wider = build_finetuner(DIGITS, num_classes=5, learning_rate=0.01, dropout=0.5)
    with pytest.raises(ValueError, match=r"changed: model.dropout \(was 0.0, now 0.5\)"):
        fine_tune(wider, train, val, **run)


def test_empty_validation_split_gets_a_clear_error(digits_target):
    x, y = digits_target
    x, y, _, _ = few_shot_split(x, y, per_class=2, seed=0)
    images = tfdata.from_arrays(x, y, image_size=(32, 32), validation_split=0.2, batch_size=4)
    with pytest.raises(ValueError, match=r"`validation` holds no images: the ImageData's "
                       r"validation split is empty.*`validation_split`"):
        fine_tune(build_finetuner(DIGITS, num_classes=5), images, head_epochs=1,
                  fine_tune_epochs=0, verbose=0)


def test_confusion_matrix_of_1000_classes_is_one_compact_image(tmp_path):
    classes = 1000
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(inputs))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3000, 4)).astype("float32"), rng.integers(0, classes, 3000)
    report = evaluate_classifier(model, (x, y))
    path = plot_confusion_matrix(report, tmp_path / "cm.png")
    assert os.path.getsize(path) > 1000
    from PIL import Image

    assert Image.open(path).size == (1000, 1000)  # 10 x 10 inches at 100 dpi, whatever the count

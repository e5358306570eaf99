"""fine_tune: two stages that help, unfreezing, resume, feature cache, layer-wise rates."""

import csv
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SAVED, Crash, EpochCount, changed, weights_of

from tftransfer import build_finetuner, evaluate_classifier, fine_tune, format_report
from tftransfer.datasets import few_shot_split

DIGITS = str(SAVED / "digits_cnn.keras")


@pytest.fixture(scope="module")
def few_shot(digits_target):
    """10 labelled images per class of digits 5-9, a validation and a test set."""
    x, y = digits_target
    x_few, y_few, x_rest, y_rest = few_shot_split(x, y, per_class=10, seed=0)
    x_val, y_val, x_test, y_test = few_shot_split(x_rest, y_rest, per_class=30, seed=1)
    return (x_few, y_few), (x_val, y_val), (x_test, y_test)


def _accuracy(model, data):
    return float(np.mean(np.argmax(model.predict(data[0], verbose=0), -1) == data[1]))


def test_two_stages_beat_scratch_and_stage_one(few_shot):
    train, val, test = few_shot
    settings = dict(head_epochs=20, verbose=0, early_stopping=5, batch_size=10)
    staged = build_finetuner(DIGITS, num_classes=5, learning_rate=1e-2)
    fine_tune(staged, train, val, fine_tune_epochs=15, unfreeze="all", lr_factor=0.1, **settings)
    keras.utils.set_random_seed(0)
    head_only = build_finetuner(DIGITS, num_classes=5, learning_rate=1e-2)
    fine_tune(head_only, train, val, fine_tune_epochs=0, **settings)
    keras.utils.set_random_seed(0)
    scratch = build_finetuner(keras.models.clone_model(keras.saving.load_model(DIGITS)),
                              num_classes=5, trainable="all", freeze_batchnorm=False,
                              learning_rate=1e-2)
    scratch.fit(*train, batch_size=10, epochs=35, verbose=0)
    acc = {name: _accuracy(m, test) for name, m in
           (("staged", staged), ("head_only", head_only), ("scratch", scratch))}
    assert acc["staged"] >= acc["scratch"] + 0.10, acc
    assert acc["staged"] >= acc["head_only"], acc


def test_stage_two_unfreezes_and_lowers_learning_rate(few_shot):
    train, val, _ = few_shot
    model = build_finetuner(DIGITS, num_classes=5, learning_rate=1e-2)
    backbone = model.backbone
    before = weights_of(backbone)
    history = fine_tune(model, train, val, head_epochs=1, fine_tune_epochs=1, unfreeze="top:1",
                        fine_tune_warmup=0.0, verbose=0)
    moved = {path.split("/")[-2] for path in changed(before, weights_of(backbone))}
    assert moved == {"conv3"}
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-2 * 0.03)  # lr_factor
    assert history.stages == {"head": (0, 1), "fine_tune": (1, 2)}
    assert len(history.history["loss"]) == 2 and "val_accuracy" in history.history


def test_interrupted_run_resumes_at_the_epoch_it_reached(few_shot, tmp_path):
    train, val, _ = few_shot
    run = dict(head_epochs=1, fine_tune_epochs=4, early_stopping=None, verbose=0,
               output_dir=tmp_path / "run")
    model = build_finetuner(DIGITS, num_classes=5)
    with pytest.raises(RuntimeError, match="killed"):
        fine_tune(model, train, val, callbacks=[Crash(at=2)], **run)
    keras.backend.clear_session()
    count = EpochCount()
    restarted = build_finetuner(DIGITS, num_classes=5)
    history = fine_tune(restarted, train, val, callbacks=[count], **run)
    assert count.epochs == [2, 3, 4]  # epochs 0 and 1 are not run again
    with open(tmp_path / "run" / "history.csv") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [0, 1, 2, 3, 4]
    assert history.stages["fine_tune"] == (1, 5)
    for name in ("curves.png", "confusion_matrix.png"):
        assert os.path.getsize(tmp_path / "run" / name) > 1000
    with pytest.raises(FileExistsError, match="overwrite=True"):
        fine_tune(build_finetuner(DIGITS, num_classes=5), train, val, **run)


def test_cached_and_uncached_stage_one_reach_the_same_head(few_shot):
    train, val, _ = few_shot
    heads = {}
    for cache in (False, True):
        keras.utils.set_random_seed(0)
        model = build_finetuner(DIGITS, num_classes=5, learning_rate=1e-2)
        fine_tune(model, train, val, head_epochs=5, fine_tune_epochs=0, cache_features=cache,
                  shuffle=False, early_stopping=None, verbose=0)
        heads[cache] = model.head.get_layer("predictions").get_weights()
        keras.backend.clear_session()
    for cached, uncached in zip(heads[True], heads[False]):
        np.testing.assert_allclose(cached, uncached, atol=1e-5)
    assert not np.allclose(heads[True][0], 0)


def test_layerwise_decay_updates_early_layers_less(few_shot):
    train, _, _ = few_shot
    steps = {}
    for decay in (None, 0.1):
        keras.utils.set_random_seed(0)
        model = build_finetuner(DIGITS, num_classes=5, learning_rate=1e-2)
        backbone = model.backbone
        fine_tune(model, train, head_epochs=1, fine_tune_epochs=0, verbose=0)
        before = {n: np.array(backbone.get_layer(n).kernel) for n in ("conv1", "conv3")}
        fine_tune(model, train, head_epochs=0, fine_tune_epochs=1, layerwise_lr_decay=decay,
                  verbose=0)
        steps[decay] = {n: float(np.mean(np.abs(np.array(backbone.get_layer(n).kernel) - b)))
                        for n, b in before.items()}
        keras.backend.clear_session()
    assert steps[0.1]["conv1"] < 0.05 * steps[0.1]["conv3"], steps
    assert steps[None]["conv1"] > 0.2 * steps[None]["conv3"], steps


def test_layerwise_rates_table():
    model = build_finetuner(DIGITS, num_classes=5, trainable="all")
    rates = model.layerwise_multipliers(0.5)
    by_layer = {path.split("/")[-2]: rate for path, rate in rates.items()}
    assert by_layer == {"conv3": 0.5, "conv2": 0.25, "conv1": 0.125}


def test_evaluate_classifier_exact_numbers():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Activation("softmax")(inputs * 10.0))
    x = np.eye(3, dtype="float32")[[0, 0, 1, 2, 2, 2]]  # predicts 0 0 1 2 2 2
    y = np.array([0, 1, 1, 2, 2, 0])
    report = evaluate_classifier(model, (x, y), class_names=["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(4 / 6)
    np.testing.assert_array_equal(report["confusion_matrix"], [[1, 0, 1], [1, 1, 0], [0, 0, 2]])
    a, b, c = report["per_class"]
    assert (a["precision"], a["recall"], a["support"]) == (0.5, 0.5, 2)
    assert (b["precision"], b["recall"]) == (1.0, 0.5)
    assert c["precision"] == pytest.approx(2 / 3) and c["f1"] == pytest.approx(0.8)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    assert evaluate_classifier(model, dataset)["accuracy"] == report["accuracy"]
    assert format_report(report).splitlines()[-1] == "accuracy 0.667   macro F1 0.656"


BAD = [
    (dict(head_epochs=-1), r"Received: head_epochs=-1"),
    (dict(lr_factor=2.0), r"`lr_factor` must be a finite float in \(0, 1\]. Received: lr_factor=2.0"),
    (dict(layerwise_lr_decay=0.0), r"Received: layerwise_lr_decay=0.0"),
    (dict(cache_features="ram"), r"Received: cache_features='ram'"),
    (dict(unfreeze="top:many"), r"Received: unfreeze='top:many'"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_arguments(kwargs, message, small_batch):
    model = build_finetuner(DIGITS, num_classes=5)
    with pytest.raises(ValueError, match=message):
        fine_tune(model, small_batch, head_epochs=kwargs.pop("head_epochs", 1),
                  fine_tune_epochs=1, verbose=0, **kwargs)
    with pytest.raises(ValueError, match="`train` must be a batched tf.data.Dataset"):
        fine_tune(model, "images/", verbose=0)


def test_image_folder_data_with_augmentation_skips_the_cache(digits_target, monkeypatch):
    from tftransfer import _feature_cache
    from tftransfer import data as tfdata

    x, y = digits_target
    images = tfdata.from_arrays(x[:60], y[:60], image_size=(32, 32), validation_split=0.2,
                                augment=["flip"], class_names=list("abcde"), batch_size=16)
    assert images.augmented
    extracted = []

    def spy(*args):
        extracted.append(1)
        raise LookupError("feature cache used")

    monkeypatch.setattr(_feature_cache, "extract_all", spy)
    model = build_finetuner(DIGITS, num_classes=5)
    history = fine_tune(model, images, head_epochs=1, fine_tune_epochs=1, verbose=0)
    assert extracted == [] and "val_loss" in history.history
    plain = tfdata.from_arrays(x[:60], y[:60], image_size=(32, 32), batch_size=16)
    with pytest.raises(LookupError, match="feature cache used"):  # not augmented: cached
        fine_tune(build_finetuner(DIGITS, num_classes=5), plain, head_epochs=1,
                  fine_tune_epochs=0, verbose=0)


def test_disk_feature_cache_matches_memory_cache(few_shot, tmp_path):
    train, val, _ = few_shot
    heads = {}
    for cache in (True, "disk"):
        keras.utils.set_random_seed(0)
        model = build_finetuner(DIGITS, num_classes=5, learning_rate=1e-2)
        fine_tune(model, train, val, head_epochs=3, fine_tune_epochs=0, cache_features=cache,
                  shuffle=False, early_stopping=None, verbose=0, output_dir=tmp_path / str(cache))
        heads[cache] = model.head.get_layer("predictions").get_weights()[0]
        keras.backend.clear_session()
    assert sorted(os.listdir(tmp_path / "disk" / "feature_cache"))[:2] == ["train.data-00000-of-00001",
                                                                          "train.index"]
    np.testing.assert_allclose(heads["disk"], heads[True], atol=1e-5)


KILLED_RUN = """
import os, signal, sys
import keras
from tftransfer import build_finetuner, fine_tune
from tftransfer.datasets import few_shot_split, load_digits_images

class Kill(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
    def on_epoch_end(self, epoch, logs=None):
        print("EPOCH", epoch, flush=True)

x, y = load_digits_images(classes=(5, 6, 7, 8, 9))
x, y, _, _ = few_shot_split(x, y, per_class=10, seed=0)
model = build_finetuner(sys.argv[1], num_classes=5)
fine_tune(model, (x, y), (x, y), head_epochs=2, fine_tune_epochs=3, early_stopping=None,
          verbose=0, output_dir=sys.argv[2], callbacks=[Kill()])
"""


@pytest.mark.slow
def test_sigkilled_process_resumes_after_restart(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    run = [sys.executable, str(script), DIGITS, str(tmp_path / "out")]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    first = subprocess.run(run + ["3"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == -9, first.stderr[-2000:]  # killed as epoch 3 of 5 began
    second = subprocess.run(run + ["-1"], capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    epochs = [int(line.split()[1]) for line in second.stdout.splitlines() if line.startswith("EPOCH")]
    assert epochs == [3, 4]  # 5 epochs in total, not 7 or 8

"""Stage 2 of fine_tune: the default recipe does not collapse; its rate takes any schedule."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import ROOT, SAVED

from tftransfer import build_finetuner, fine_tune, optim
from tftransfer.datasets import few_shot_split

DIGITS = str(SAVED / "digits_cnn.keras")


@pytest.fixture(scope="module")
def few_shot(digits_target):
    x, y = digits_target
    x_few, y_few, x_rest, y_rest = few_shot_split(x, y, per_class=10, seed=0)
    x_val, y_val, _, _ = few_shot_split(x_rest, y_rest, per_class=30, seed=1)
    return (x_few, y_few), (x_val, y_val)


@pytest.fixture(scope="module")
def stage1_weights(few_shot):
    """The quickstart's stage 1 (20 head epochs at Adam 1e-2), run once for every setting."""
    keras.utils.set_random_seed(0)
    model = build_finetuner(DIGITS, num_classes=5, dropout=0.2, learning_rate=1e-2)
    fine_tune(model, *few_shot, head_epochs=20, fine_tune_epochs=0, batch_size=10,
              early_stopping=None, verbose=0)
    return model.get_weights()


def _first_stage2_epoch(few_shot, weights, **settings):
    """Validation accuracy at stage 1's end and after stage 2's first epoch from there."""
    model = build_finetuner(DIGITS, num_classes=5, dropout=0.2, learning_rate=1e-2)
    model.set_weights(weights)
    stage1_end = model.evaluate(*few_shot[1], verbose=0, return_dict=True)["accuracy"]
    keras.utils.set_random_seed(0)
    history = fine_tune(model, *few_shot, head_epochs=0, fine_tune_epochs=1, batch_size=10,
                        early_stopping=None, keep_best_stage=False, verbose=0, **settings)
    return stage1_end, history.history["val_accuracy"][-1]


def test_default_stage2_does_not_collapse(few_shot, stage1_weights):
    # The quickstart's settings; before issue 25 the first unfrozen epoch fell from 0.78 to 0.27.
    stage1_end, after = _first_stage2_epoch(few_shot, stage1_weights)
    assert after >= stage1_end - 0.05, (stage1_end, after)
    _, old_after = _first_stage2_epoch(few_shot, stage1_weights, lr_factor=0.1,
                                       fine_tune_warmup=0, layerwise_lr_decay=None)
    assert old_after < stage1_end - 0.2, (stage1_end, old_after)


def test_early_stopping_waits_for_the_end_of_the_warmup(few_shot, stage1_weights):
    # A rate 30x stage 1's makes the validation loss rise from the first unfrozen epoch;
    # patience 1 would stop after epoch 2, but the 2 warmup epochs are not watched.
    model = build_finetuner(DIGITS, num_classes=5, dropout=0.2, learning_rate=1e-2)
    model.set_weights(stage1_weights)
    keras.utils.set_random_seed(0)
    history = fine_tune(model, *few_shot, head_epochs=0, fine_tune_epochs=8, batch_size=10,
                        early_stopping=1, fine_tune_learning_rate=0.3, fine_tune_warmup=2.0,
                        keep_best_stage=False, verbose=0)
    losses = history.history["val_loss"]
    assert len(losses) >= 2 + 1 + 1, losses  # warmup, the first watched epoch, patience
    # the weights kept are those of the best watched epoch, not of a warmup epoch
    kept = model.evaluate(*few_shot[1], verbose=0, return_dict=True)["loss"]
    assert kept == pytest.approx(min(losses[2:]), rel=1e-3), (kept, losses)


@pytest.mark.parametrize("early_stopping", [None, 1])
def test_stage2_validates_and_keeps_the_weight_average(few_shot, stage1_weights,
                                                      early_stopping):
    # What the history reports for an epoch is what the model holds: the average
    # (Keras `use_ema` + `SwapEMAWeights`), after the last epoch or restored from the best.
    model = build_finetuner(DIGITS, num_classes=5, dropout=0.2, learning_rate=1e-2)
    model.set_weights(stage1_weights)
    keras.utils.set_random_seed(0)
    history = fine_tune(model, *few_shot, head_epochs=0, fine_tune_epochs=6, batch_size=10,
                        fine_tune_ema=2.0, fine_tune_learning_rate=3e-3, fine_tune_warmup=0.0,
                        early_stopping=early_stopping, keep_best_stage=False, verbose=0)
    assert model.optimizer.use_ema and model.optimizer.ema_momentum == pytest.approx(0.9)
    losses = history.history["val_loss"]
    kept = model.evaluate(*few_shot[1], verbose=0, return_dict=True)["loss"]
    assert kept == pytest.approx(losses[-1] if early_stopping is None else min(losses),
                                 rel=1e-4), (kept, losses)
    if early_stopping is None:  # the same steps without the average end elsewhere
        plain = build_finetuner(DIGITS, num_classes=5, dropout=0.2, learning_rate=1e-2)
        plain.set_weights(stage1_weights)
        keras.utils.set_random_seed(0)
        fine_tune(plain, *few_shot, head_epochs=0, fine_tune_epochs=6, batch_size=10,
                  fine_tune_ema=0, fine_tune_learning_rate=3e-3, fine_tune_warmup=0.0,
                  early_stopping=None, keep_best_stage=False, verbose=0)
        assert not plain.optimizer.use_ema
        assert not np.allclose(plain.backbone.weights[0], model.backbone.weights[0])


def test_fine_tune_ema_momentum_and_bad_values():
    from tftransfer import _stage2_rate

    assert _stage2_rate.ema_momentum("auto", 5, 10) == pytest.approx(0.95)  # 4 epochs of 5 steps
    assert _stage2_rate.ema_momentum(1.0, 100, 10) == pytest.approx(0.99)
    assert _stage2_rate.ema_momentum(0, 5, 10) is None
    assert _stage2_rate.ema_momentum(None, 5, 10) is None
    with pytest.warns(UserWarning, match="weight average"):
        assert _stage2_rate.ema_momentum("auto", None, 10) is None
    for bad in (-1.0, float("nan"), "always", True):
        with pytest.raises(ValueError, match=r"^`fine_tune_ema` must be a finite float >= 0 "
                           r"\(epochs\), \"auto\" or None\. Received: fine_tune_ema="):
            _stage2_rate.check_ema(bad)


SCHEDULES = [
    ({"class_name": "cosine", "config": {"learning_rate": 1e-4}}, "CosineDecay"),
    ("cosine", "CosineDecay"),
    (keras.optimizers.schedules.ExponentialDecay(1e-4, 10, 0.5), "ExponentialDecay"),
    ({"class_name": "warmup", "config": {"warmup_steps": 3}}, "WarmupSchedule"),
]


@pytest.mark.parametrize("rate,kind", SCHEDULES)
def test_fine_tune_learning_rate_takes_schedules(rate, kind, small_batch):
    model = build_finetuner(DIGITS, num_classes=5, learning_rate=1e-2)
    fine_tune(model, small_batch, head_epochs=0, fine_tune_epochs=1, batch_size=8, verbose=0,
              fine_tune_learning_rate=rate)
    schedule = model.optimizer.get_config()["learning_rate"]  # the stage-2 optimizer's
    assert schedule["class_name"] == kind
    if kind == "CosineDecay":  # decays over stage 2: 1 epoch of 4 batches
        assert schedule["config"]["decay_steps"] == 4
        assert schedule["config"]["initial_learning_rate"] == pytest.approx(
            1e-4 if isinstance(rate, dict) else 1e-2 * 0.03)  # stage 1 times `lr_factor`


BAD = [
    ("cosinee", "Unknown learning-rate schedule for `fine_tune_learning_rate`. Did you mean "
                "'cosine'"),
    ([1e-3], r"`fine_tune_learning_rate` must be a positive float, a keras "
             r"LearningRateSchedule.*Received: fine_tune_learning_rate=\[0.001\]"),
    ({"class_name": "cosine", "config": {"decay_steps": 0}},
     "`fine_tune_learning_rate.config.decay_steps` must be .*Received: "
     "fine_tune_learning_rate.config.decay_steps=0"),
    (-1.0, "Received: fine_tune_learning_rate=-1.0"),
]


@pytest.mark.parametrize("rate,message", BAD)
def test_fine_tune_learning_rate_refuses_garbage(rate, message, small_batch):
    model = build_finetuner(DIGITS, num_classes=5)
    with pytest.raises(ValueError, match=message):
        fine_tune(model, small_batch, fine_tune_learning_rate=rate, verbose=0)
    with pytest.raises(ValueError, match="Received: fine_tune_warmup=-1"):
        fine_tune(model, small_batch, fine_tune_warmup=-1, verbose=0)


def test_warmup_schedule_values_and_json_round_trip():
    inner = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=8)
    for rate in (1e-3, inner):
        schedule = optim.WarmupSchedule(rate, warmup_steps=4)
        config = json.loads(json.dumps(keras.saving.serialize_keras_object(schedule)))
        again = keras.saving.deserialize_keras_object(config)
        steps = np.arange(10)
        expected = [float(schedule(s)) for s in steps]
        assert [float(again(s)) for s in steps] == pytest.approx(expected)
        full = [float(rate(s)) if callable(rate) else rate for s in steps]
        assert expected == pytest.approx([f * min(1, (s + 1) / 4) for s, f in zip(steps, full)])


_RELOAD = """
import json, sys
import keras, numpy as np
import tftransfer  # noqa: F401  (registers WarmupSchedule and the layer-wise optimizers)
model = keras.models.load_model(sys.argv[1])
data = np.load(sys.argv[2])
predictions = model.predict(data["x"], verbose=0).tolist()
model.train_on_batch(data["x"], data["y"])
config = model.optimizer.get_config()
print(json.dumps([config["learning_rate"]["class_name"], config["use_ema"], predictions]))
"""


def test_model_after_default_stage2_reloads_and_trains_in_a_new_process(small_batch, tmp_path):
    model = build_finetuner(DIGITS, num_classes=5, learning_rate=1e-2)
    fine_tune(model, small_batch, head_epochs=0, fine_tune_epochs=1, batch_size=8, verbose=0)
    model.save(tmp_path / "m.keras")
    np.savez(tmp_path / "d.npz", x=small_batch[0][:8], y=small_batch[1][:8])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path / "m.keras"),
                           str(tmp_path / "d.npz")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    schedule, use_ema, predictions = json.loads(done.stdout.strip().splitlines()[-1])
    assert (schedule, use_ema) == ("WarmupSchedule", True)  # the stage-2 optimizer, as saved
    np.testing.assert_allclose(predictions, model.predict(small_batch[0][:8], verbose=0),
                               rtol=1e-5, atol=1e-6)  # the weights kept: the average


def test_auto_layerwise_rates_span_the_backbone_depth():
    model = build_finetuner(DIGITS, num_classes=5)
    model.freeze("all")
    third = 30 ** (-1 / 3)
    assert model.layerwise_multipliers("auto") == pytest.approx(
        {"conv3/kernel": third, "conv2/kernel": third ** 2, "conv1/kernel": 1 / 30})
    model.freeze("top:1")  # the top layer keeps the rate of its depth
    assert model.layerwise_multipliers("auto") == pytest.approx({"conv3/kernel": third})


def test_layerwise_rates_reach_hub_layer_variables(small_batch):
    x, y = small_batch[0][:8], small_batch[1][:8]
    moved = {}
    for decay in (None, 0.5):
        keras.utils.set_random_seed(0)
        model = build_finetuner(str(SAVED / "digits_cnn_hub"), num_classes=5)
        model.freeze("all")
        model.compile_stage(1e-3, layerwise_lr_decay=decay)
        model.run_eagerly = True  # one step: tracing would cost more than it runs
        conv1 = next(w for w in model.backbone.weights if w.name == "conv1__kernel")
        before = np.array(conv1)
        model.train_on_batch(x, y)
        moved[decay] = float(np.max(np.abs(np.array(conv1) - before)))
    # Adam's first step moves each weight by about its rate: conv1 is 3 layers down (0.5**3;
    # its BatchNorm is frozen and does not count).
    assert 0.08 * moved[None] < moved[0.5] < 0.2 * moved[None], moved


def test_hub_backbone_gets_the_rates_of_the_same_keras_backbone():
    keras_model = build_finetuner(DIGITS, num_classes=5)
    hub_model = build_finetuner(str(SAVED / "digits_cnn_hub"), num_classes=5)
    for freeze_batchnorm in (True, False):
        rates = {}
        for name, model in (("keras", keras_model), ("hub", hub_model)):
            model.freeze("all", freeze_batchnorm=freeze_batchnorm)
            rates[name] = {k.removeprefix("hub/").replace("__", "/"): v  # hub/conv1__kernel
                           for k, v in model.layerwise_multipliers("auto").items()}
        assert rates["hub"] == pytest.approx(rates["keras"])
    # BatchNorm learns at the rate of the convolution it normalizes; the span stays 30x.
    assert rates["keras"]["bn1/gamma"] == rates["keras"]["conv1/kernel"] == pytest.approx(1 / 30)


def test_hub_layer_freeze_batchnorm_keeps_scale_offset_and_statistics(small_batch):
    x, y = small_batch[0][:8], small_batch[1][:8]
    for freeze_batchnorm in (True, False):
        keras.utils.set_random_seed(0)
        model = build_finetuner(str(SAVED / "digits_cnn_hub"), num_classes=5)
        model.freeze("all", freeze_batchnorm=freeze_batchnorm)
        model.compile_stage(1e-2)
        model.run_eagerly = True
        before = {w.name: np.array(w) for w in model.backbone.weights}
        model.train_on_batch(x, y)
        moved = {w.name for w in model.backbone.weights
                 if not np.array_equal(np.array(w), before[w.name])}
        kernels = {"conv1__kernel", "conv2__kernel", "conv3__kernel"}
        affine = {f"bn{i}__{p}" for i in (1, 2, 3) for p in ("gamma", "beta")}
        if freeze_batchnorm:  # as a frozen keras BatchNormalization: inference mode, fixed
            assert moved == kernels
        else:  # training mode: scale and offset learn, the moving statistics follow the batch
            assert kernels | affine <= moved and any("moving_mean" in n for n in moved)

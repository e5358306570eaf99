"""Search control: objectives on compiled metrics, budgets, trials.csv, HParams."""

import csv
import os

import keras
import keras_tuner as kt
import numpy as np
import pytest
import tensorflow as tf
from conftest import SAVED
from sklearn.metrics import f1_score
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tftransfer import build_finetuner
from tftransfer.search import control


@pytest.mark.parametrize("value, expected", [
    ("val_accuracy", {"name": "val_accuracy", "direction": "max"}),
    ("val_loss", {"name": "val_loss", "direction": "min"}),
    ({"name": "val_auc", "direction": "max"}, {"name": "val_auc", "direction": "max"}),
    ({"name": "val_macro_f1"}, {"name": "val_macro_f1", "direction": "max"}),
    ({"name": "precision_at_recall", "direction": "min"},
     {"name": "precision_at_recall", "direction": "min"}),
])
def test_objectives_parse(value, expected):
    assert control.parse_objective(value) == expected


@pytest.mark.parametrize("value, message", [
    ("val_mystery", "one of ['val_loss', 'loss', 'val_accuracy'"),
    ({"name": "val_auc", "direction": "up"}, "a direction in ['max', 'min']"),
    ({"name": "val_auc", "goal": "max"}, "unknown keys ['goal']"),
])
def test_bad_objectives_say_what_is_allowed(value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        control.parse_objective(value)


def test_auc_and_macro_f1_compile_on_integer_labels(digits_target):
    x, y = digits_target
    x, y = x[:200], y[:200]
    metrics = control.metrics_for(control.parse_objective("val_auc"))
    metrics.append(control.metrics_for(control.parse_objective("val_macro_f1"))[-1])
    model = build_finetuner(SAVED / "digits_cnn.keras", num_classes=5, learning_rate=1e-2,
                            metrics=metrics)
    history = model.fit(x[:150], y[:150], validation_data=(x[150:], y[150:]), epochs=2,
                        batch_size=25, verbose=0).history
    assert {"val_auc", "val_macro_f1", "val_accuracy"} <= set(history)
    assert 0.5 < history["val_auc"][-1] <= 1
    predicted = model.predict(x[150:], verbose=0).argmax(-1)
    expected = f1_score(y[150:], predicted, average="macro", labels=range(5), zero_division=0)
    assert model.evaluate(x[150:], y[150:], batch_size=50, verbose=0,
                          return_dict=True)["macro_f1"] == pytest.approx(expected, abs=1e-5)


def _row(i, score, status="COMPLETED"):
    return {"trial_id": str(i), "status": status, "score": score, "seconds": 1.0,
            "values": {"lr": 0.1 * i}, "reason": ""}


@pytest.mark.parametrize("scores, stop_after, expected", [
    ([0.5, 0.6, 0.6, 0.55], 2, "2 trials without improvement"),
    ([0.5, 0.6, 0.6, 0.7], 2, None),
    ([0.5, None, None], 2, "2 trials without improvement"),  # failed trials count
    ([None, None, None], 2, None),  # nothing to improve on yet
])
def test_stop_after_counts_trials_since_the_best(scores, stop_after, expected):
    rows = [_row(i, s, "COMPLETED" if s is not None else "FAILED") for i, s in enumerate(scores)]
    reason = control.stop_reason(rows, "max", stop_after=stop_after)
    assert (reason is None) if expected is None else expected in reason


class _Oracle(kt.oracles.RandomSearchOracle):
    """KerasTuner's random search with a `stop()` (what the search's oracles have)."""

    stopped = False

    def stop(self):
        self.stopped = True

    def create_trial(self, tuner_id):
        if self.stopped:
            return kt.engine.trial.Trial(self.hyperparameters.copy(),
                                         status=kt.engine.trial.TrialStatus.STOPPED)
        return super().create_trial(tuner_id)


class _Model(kt.HyperModel):
    tensorboard_dir = None

    def build(self, hp):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(
            hp.Int("units", 1, 8), activation="relu"), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(hp.Float("lr", 1e-3, 1e-1, sampling="log")),
                      loss="mse")
        return model

    def fit(self, hp, model, *args, callbacks=None, **kwargs):
        callbacks = list(callbacks or []) + [keras.callbacks.TensorBoard(self.tensorboard_dir)]
        return model.fit(*args, callbacks=callbacks, **kwargs)


class _Tuner(kt.Tuner):
    """Calls the hooks the way `tftransfer.search.tuners.SearchTuner` does."""

    def __init__(self, hooks, **kwargs):
        super().__init__(**kwargs)
        self.hooks, self.seconds, self.lines = hooks, {}, []

    def out(self, line):
        self.lines.append(line)

    def on_trial_begin(self, trial):
        super().on_trial_begin(trial)
        for hook in self.hooks:
            hook.on_trial_begin(self, trial)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        self.seconds[trial.trial_id] = 1.0
        for hook in self.hooks:
            hook.on_trial_end(self, trial)


def test_max_time_stops_within_one_trial_and_hparams_read_back(tmp_path):
    directory = str(tmp_path / "search")
    os.makedirs(directory)
    control.start_clock(directory, now=1000.0)
    ended = []  # a clock that advances 100 s per finished trial: no real timing
    clock = lambda: 1000.0 + 100.0 * len(ended)  # noqa: E731
    objective = control.parse_objective("val_loss")
    hook = control.SearchControl(directory, objective, max_time=250, clock=clock)
    counter = type("Counter", (), {"on_trial_begin": lambda *a: None,
                                   "on_trial_end": lambda self, t, trial: ended.append(1)})()
    tuner = _Tuner([counter, hook], oracle=_Oracle(kt.Objective("val_loss", "min"),
                                                   max_trials=10, seed=1),
                   hypermodel=_Model(), directory=str(tmp_path), project_name="search")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)), rng.normal(size=(32, 1))
    tuner.search(x, y, validation_data=(x, y), epochs=2, verbose=0)
    # elapsed 100, 200 (< 250): go on; 300 after the third trial: stop.
    assert len(tuner.oracle.trials) == 3
    assert any("run.max_time reached" in line for line in tuner.lines)
    with open(os.path.join(directory, control.TRIALS_CSV)) as f:
        rows = list(csv.DictReader(f))
    assert [r["trial_id"] for r in rows] == sorted(tuner.oracle.trials)
    assert set(rows[0]) == {"trial_id", "status", "objective", "seconds", "lr", "units"}
    sessions = {}
    for trial_id in tuner.oracle.trials:
        events = event_accumulator.EventAccumulator(
            os.path.join(directory, "tensorboard", trial_id),
            size_guidance={event_accumulator.TENSORS: 0})
        events.Reload()
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        values = {k: v.number_value for k, v in start.hparams.items()}
        scalar = events.Tensors("val_loss")[0]
        sessions[trial_id] = (values, float(tf.make_ndarray(scalar.tensor_proto)))
        trial = tuner.oracle.trials[trial_id]
        assert values["units"] == trial.hyperparameters.get("units")
        assert sessions[trial_id][1] == pytest.approx(trial.score, rel=1e-6)
        assert os.listdir(os.path.join(directory, "tensorboard", trial_id, "train"))
    top = event_accumulator.EventAccumulator(os.path.join(directory, "tensorboard"))
    top.Reload()
    assert "_hparams_/experiment" in top.PluginTagToContent("hparams")

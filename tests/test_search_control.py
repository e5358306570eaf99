"""Search control: objectives on compiled metrics, budgets, trials.csv, HParams."""

import csv
import os

import pytest
import tensorflow as tf
from conftest import SAVED
from sklearn.metrics import f1_score
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tftransfer import build_finetuner
from tftransfer.search import control, run, validate


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


def _tiny(tmp_path, **run):
    return {
        "data": {"source": "digits", "per_class": 5, "validation_split": 0.2},
        "search_space": {"backbone": str(SAVED / "digits_cnn.keras"),
                         "learning_rate": {"choice": [0.003, 0.01, 0.03]},
                         "dropout": {"min": 0.0, "max": 0.5},
                         "batch_size": 16, "head_epochs": 1, "fine_tune_epochs": 0},
        "tuner": {"kind": "random", "max_trials": 8, "seed": 1,
                  "objective": {"name": "val_auc", "direction": "max"}},
        "run": {"directory": str(tmp_path / "search"), "isolate_trials": False, **run},
    }


def test_max_time_stops_within_one_trial_exports_and_logs_hparams(tmp_path, monkeypatch):
    calls = iter(range(100))  # a clock that advances 100 s per reading: no real timing
    monkeypatch.setattr(control, "_now", lambda: 1000.0 + 100.0 * next(calls))
    lines = []
    result = run(validate(_tiny(tmp_path, max_time=150)), out=lines.append)
    # Read at the start (0), then after each trial: 100 (< 150) goes on; 200 stops.
    directory = tmp_path / "search"
    assert len(result["rows"]) == 2
    assert any("run.max_time reached" in line for line in lines)
    assert result["export"] and os.path.isdir(result["export"])
    assert result["best"]["score"] == max(r["score"] for r in result["rows"])
    with open(directory / control.TRIALS_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [r["trial_id"] for r in rows] == [r["trial_id"] for r in result["rows"]]
    assert set(rows[0]) == {"trial_id", "status", "objective", "seconds", "learning_rate",
                            "dropout"}
    assert (directory / "report.html").stat().st_size > 1000
    for row in result["rows"]:
        logdir = directory / "tensorboard" / row["trial_id"]
        events = event_accumulator.EventAccumulator(
            str(logdir), size_guidance={event_accumulator.TENSORS: 0})
        events.Reload()
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        assert start.hparams["learning_rate"].number_value == \
            pytest.approx(row["values"]["learning_rate"])
        score = float(tf.make_ndarray(events.Tensors("val_auc")[0].tensor_proto))
        assert score == pytest.approx(row["score"], rel=1e-6)
        assert os.listdir(logdir / "train")  # the trial's own training scalars
    top = event_accumulator.EventAccumulator(str(directory / "tensorboard"))
    top.Reload()
    assert "_hparams_/experiment" in top.PluginTagToContent("hparams")

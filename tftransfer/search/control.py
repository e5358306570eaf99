"""Search control: objectives on any compiled metric, time and patience budgets,
`trials.csv` and TensorBoard (scalars per trial, HParams dashboard).

`parse_objective` normalises the config's `tuner.objective` (a name, or
`{name: val_auc, direction: max}`); `metrics_for` gives the metric a model
must compile for it (AUC, macro F1 via `keras.metrics.F1Score`, precision
at 80% recall, on integer labels). `SearchControl` is a per-trial hook of the
search's tuner (`on_trial_begin(tuner, trial)` / `on_trial_end(tuner,
trial)`): it points the trial's TensorBoard scalars at
`<directory>/tensorboard/<trial_id>`, writes the trial's HParams summary
(hyperparameters and objective) there, rewrites `trials.csv` (atomically)
and stops the search, through the oracle's `stop()`, once `run.max_time`
seconds have passed since the run began (`start_clock`) or `run.stop_after`
trials in a row brought no improvement. Running trials finish; the search
then reports and exports the best as usual.

Example:

>>> parse_objective({"name": "val_auc", "direction": "max"})
{'name': 'val_auc', 'direction': 'max'}
"""

import csv
import io
import json
import math
import os
import time

from tftransfer._lock import atomic_write_text

TRIALS_CSV = "trials.csv"
TENSORBOARD_DIR = "tensorboard"
CLOCK_FILE = "run_clock.json"
PRECISION_RECALL = 0.8  # the recall `precision_at_recall` is read at
_BUILT_IN = ("loss", "accuracy")
_EXTRA = ("auc", "macro_f1", "precision_at_recall")
METRIC_NAMES = _BUILT_IN + _EXTRA
DIRECTIONS = ("max", "min")


# ---------------------------------------------------------------- objective


def parse_objective(value):
    """`tuner.objective` -> `{"name", "direction"}`.

    Args:
        value: A metric name (`"val_accuracy"`, `"val_auc"`, `"loss"`...;
            the direction is `min` for losses, else `max`) or a dict
            `{name: ..., direction: max|min}`.

    Raises:
        ValueError: An unknown metric or direction (the message lists the
            allowed values).
    """
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"name", "direction"})
        if unknown or "name" not in value:
            raise ValueError(f"a metric name or {{name: <metric>, direction: max|min}}; "
                             f"unknown keys {unknown}" if unknown else "a mapping with a `name` key")
        name, direction = value["name"], value.get("direction")
    else:
        name, direction = value, None
    metric = name[4:] if isinstance(name, str) and name.startswith("val_") else name
    if metric not in METRIC_NAMES:
        allowed = [f"{p}{m}" for m in METRIC_NAMES for p in ("val_", "")]
        raise ValueError(f"one of {allowed}, or {{name: ..., direction: max|min}}")
    inferred = "min" if metric == "loss" else "max"
    if direction is None:
        direction = inferred
    if direction not in DIRECTIONS:
        raise ValueError(f"a direction in {list(DIRECTIONS)}")
    return {"name": name, "direction": direction}


def metrics_for(objective, task="classification"):
    """The metrics a model compiles for `objective`: `"auto"` (the task's own)
    when it is a loss or accuracy, else accuracy plus the objective's metric."""
    metric = objective["name"].removeprefix("val_")
    if metric in _BUILT_IN:
        return "auto"
    from tftransfer.search import _metrics

    return ["accuracy" if task == "classification" else "binary_accuracy",
            _metrics.make(metric, PRECISION_RECALL)]


# ---------------------------------------------------------------- budgets


def _now():
    """The clock of `run.max_time` (seconds since the epoch; tests replace it)."""
    return time.time()


def start_clock(directory, now=None):
    """Records when this run of the search began (`run.max_time` counts from it)."""
    now = _now() if now is None else now
    atomic_write_text(os.path.join(directory, CLOCK_FILE), json.dumps({"started": now}))


def _started(directory):
    try:
        with open(os.path.join(directory, CLOCK_FILE)) as f:
            return float(json.load(f)["started"])
    except (OSError, ValueError, KeyError):
        return None


def stop_reason(rows, direction, *, elapsed=None, max_time=None, stop_after=None):
    """Why the search should start no more trials, or None.

    Args:
        rows: Trial rows in trial order (`tftransfer.search.report.trial_row`).
        direction: `"max"` or `"min"`.
        elapsed: Seconds since the run began, or None.
        max_time: Optional seconds, `run.max_time`.
        stop_after: Optional integer, `run.stop_after`.
    """
    if max_time is not None and elapsed is not None and elapsed >= max_time:
        return f"run.max_time reached ({elapsed:.0f} s >= {max_time:g} s)"
    if stop_after is None:
        return None
    best, since = None, 0
    for row in rows:
        score = row["score"] if row["status"] == "COMPLETED" else None
        better = score is not None and (best is None or (
            score > best if direction == "max" else score < best))
        best, since = (score, 0) if better else (best, since + 1)
    if best is not None and since >= stop_after:
        return f"run.stop_after: {since} trials without improvement"
    return None


# ---------------------------------------------------------------- files


def trials_csv(rows):
    """The text of `trials.csv`: id, status, objective, seconds, each hyperparameter."""
    names = sorted({k for r in rows for k in r["values"] if not k.startswith("tuner/")})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["trial_id", "status", "objective", "seconds", *names])
    for r in rows:
        writer.writerow([r["trial_id"], r["status"], "" if r["score"] is None else r["score"],
                         "" if r["seconds"] is None else round(r["seconds"], 3),
                         *["" if r["values"].get(n) is None else r["values"][n] for n in names]])
    return out.getvalue()


def write_trials_csv(directory, rows):
    """Writes `directory/trials.csv` through a temporary file and a rename."""
    atomic_write_text(os.path.join(directory, TRIALS_CSV), trials_csv(rows))


def _hparam_value(value):
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, default=str)


def write_hparams(logdir, row, objective, names):
    """Writes a trial's HParams session: its hyperparameters and objective.

    `logdir/<trial_id>` gets `hp.hparams(...)` and the scalar `objective`
    (the trial's score); `logdir` itself the `hparams_config` listing every
    hyperparameter name and the objective, which the dashboard reads.
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    with tf.summary.create_file_writer(logdir).as_default():
        hp.hparams_config(hparams=[hp.HParam(n) for n in names],
                          metrics=[hp.Metric(objective, display_name=objective)])
    values = {k: _hparam_value(v) for k, v in row["values"].items() if not k.startswith("tuner/")}
    with tf.summary.create_file_writer(os.path.join(logdir, row["trial_id"])).as_default():
        hp.hparams(values, trial_id=row["trial_id"])
        if row["score"] is not None and math.isfinite(row["score"]):
            tf.summary.scalar(objective, row["score"], step=0)


# ---------------------------------------------------------------- the hook


class SearchControl:
    """Per-trial hook of a search tuner: TensorBoard, HParams, trials.csv, budgets.

    Args:
        directory: The search directory.
        objective: `parse_objective`'s dict.
        max_time: Optional seconds (`run.max_time`).
        stop_after: Optional integer (`run.stop_after`).
        clock: Optional callable returning the time (seconds since the
            epoch); defaults to this module's clock.
    """

    def __init__(self, directory, objective, *, max_time=None, stop_after=None,
                 clock=None):
        self.directory, self.objective = directory, objective
        self.max_time, self.stop_after, self.clock = max_time, stop_after, clock
        self.logdir = os.path.join(directory, TENSORBOARD_DIR)
        self.stopped = None

    @classmethod
    def of(cls, cfg):
        """The hook of a validated search config."""
        return cls(cfg["run"]["directory"], cfg["tuner"]["objective"],
                   max_time=cfg["run"]["max_time"], stop_after=cfg["run"]["stop_after"])

    def on_trial_begin(self, tuner, trial):
        """Sends the trial's training scalars to `tensorboard/<trial_id>`."""
        tuner.hypermodel.tensorboard_dir = os.path.join(self.logdir, trial.trial_id)

    def on_trial_end(self, tuner, trial):
        """Writes trials.csv and the trial's HParams; stops the search when due.

        A worker of a `--workers` cluster, whose oracle is the chief's
        (remote), does none of it: the chief writes trials.csv at the end.
        """
        from tftransfer.search import report

        if not hasattr(tuner.oracle, "trials"):
            return
        trials = sorted(tuner.oracle.trials.values(), key=lambda t: report.id_key(t.trial_id))
        rows = [report.trial_row(t, tuner.seconds.get(t.trial_id)) for t in trials
                if str(t.status) in ("COMPLETED", "FAILED", "INVALID")]
        write_trials_csv(self.directory, rows)
        row = next((r for r in rows if r["trial_id"] == trial.trial_id), None)
        if row is not None:
            names = sorted({k for r in rows for k in r["values"] if not k.startswith("tuner/")})
            write_hparams(self.logdir, row, self.objective["name"], names)
        self.check(tuner, rows)

    def check(self, tuner, rows):
        """Stops the oracle (no more trials) when a budget is spent."""
        started = _started(self.directory)
        elapsed = None if started is None else (self.clock or _now)() - started
        reason = stop_reason(rows, self.objective["direction"], elapsed=elapsed,
                             max_time=self.max_time, stop_after=self.stop_after)
        if reason and not self.stopped:
            self.stopped = reason
            tuner.oracle.stop()
            tuner.out(f"Search stopped: {reason}; running trials finish, the best is exported.")
        return reason

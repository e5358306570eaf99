"""The search's KerasTuner classes: one named oracle and tuner per kind.

Each tuner is built the way KerasTuner documents for custom tuning
(`keras_tuner.Tuner(oracle=..., hypermodel=...)`): `make_tuner` builds the
oracle of the config's `tuner.kind` and hands it to `SearchTuner` (or to
`HyperbandSearchTuner`, which adds Hyperband's epoch budget and its loading
of the promoted trial's weights).

Every oracle here writes its files crash-consistently (`_atomic`) and can be
told to `stop()` handing out trials: its next `create_trial` answers
`TrialStatus.STOPPED`, which ends `tuner.search()` the way KerasTuner ends
it when `max_trials` is reached. A trial worker ends its share of a search
that way (`_worker.py`), and so can any other hook that wants to stop.

Per-trial hooks: `SearchTuner(hooks=[...])` calls each hook's optional
`on_trial_begin(tuner, trial)` and `on_trial_end(tuner, trial)` after its
own work (timing, the trial's line). Post-search work (report, export) is
`runner.finish`.
"""

import json
import os
import time

import keras_tuner as kt

from tftransfer._lock import atomic_write_json
from tftransfer.search import _atomic, report
from tftransfer.search.hypermodel import FEATURES_DIR

TIMES_FILE = "seconds_per_trial.json"


# ------------------------------------------------------------------- oracles


class _Stoppable:
    """Oracle mixin: `stop()` makes every later `create_trial` answer STOPPED."""

    stopped = False

    def stop(self):
        """Hands out no more trials: the tuner's `search()` returns after this trial."""
        self.stopped = True

    def create_trial(self, tuner_id):
        if self.stopped:
            return kt.engine.trial.Trial(self.hyperparameters.copy(),
                                         status=kt.engine.trial.TrialStatus.STOPPED)
        return super().create_trial(tuner_id)


class RandomSearchOracle(_atomic.OracleFiles, _Stoppable, kt.oracles.RandomSearchOracle,
                         _atomic.AtomicState):
    """KerasTuner's random search oracle, stoppable, with crash-consistent files."""


class BayesianOptimizationOracle(_atomic.OracleFiles, _Stoppable,
                                 kt.oracles.BayesianOptimizationOracle, _atomic.AtomicState):
    """KerasTuner's Bayesian optimization oracle, stoppable, with crash-consistent files."""


class HyperbandOracle(_atomic.OracleFiles, _Stoppable, kt.oracles.HyperbandOracle,
                      _atomic.AtomicState):
    """KerasTuner's Hyperband oracle, stoppable, with crash-consistent files."""


class GridSearchOracle(_atomic.OracleFiles, _Stoppable, kt.oracles.GridSearchOracle,
                       _atomic.AtomicState):
    """KerasTuner's grid search oracle, stoppable, with crash-consistent files."""


_ORACLES = {"random": RandomSearchOracle, "bayesian": BayesianOptimizationOracle,
            "hyperband": HyperbandOracle, "grid": GridSearchOracle}


def kerastuner_seed(seed):
    """The seed given to KerasTuner for a config's `tuner.seed`.

    KerasTuner reads a seed of 0 as "no seed" and draws a random one, so the
    same config would search other values on each run (and the workers of a
    multi-worker search would disagree). Seed 0 is passed as 10007.
    """
    return seed if seed else 10007


def make_oracle(tuner_cfg):
    """The oracle of a validated `tuner` config section."""
    kwargs = dict(objective=kt.Objective(**tuner_cfg["objective"]),
                  seed=kerastuner_seed(tuner_cfg["seed"]),
                  max_consecutive_failed_trials=tuner_cfg["max_consecutive_failed_trials"])
    if tuner_cfg["kind"] == "hyperband":
        kwargs.update(max_epochs=tuner_cfg["max_epochs"], factor=tuner_cfg["factor"])
    else:
        kwargs["max_trials"] = tuner_cfg["max_trials"]
    return _ORACLES[tuner_cfg["kind"]](**kwargs)


# -------------------------------------------------------------------- tuners


class SearchTuner(_atomic.AtomicTuner):
    """The tuner of a search: a line per finished trial, its time, hooks.

    Args:
        oracle: One of this module's oracles.
        hypermodel: A `FineTuneHyperModel`. Its `feature_cache_dir`, when
            None, becomes `features/` in the tuner's `project_dir`.
        out: Callable printing one line.
        hooks: Objects with optional `on_trial_begin(tuner, trial)` and
            `on_trial_end(tuner, trial)` methods, called in order after the
            tuner's own work.
        **kwargs: `keras_tuner.Tuner`'s arguments (`directory`,
            `project_name`, `executions_per_trial`, ...).
    """

    def __init__(self, oracle, hypermodel, *, out=print, hooks=(), **kwargs):
        self.out, self.hooks = out, list(hooks)
        self.seconds, self._started, self._died = {}, {}, {}
        hypermodel.declare_only = True  # KerasTuner builds once to collect the space.
        try:
            # `kt.Tuner.__init__` by name: KerasTuner's Hyperband tuner class
            # (a base of `HyperbandSearchTuner`) builds its own oracle in its
            # `__init__`; ours is given.
            kt.Tuner.__init__(self, oracle=oracle, hypermodel=hypermodel, **kwargs)
        finally:
            hypermodel.declare_only = False
        if hypermodel.feature_cache_dir is None:
            hypermodel.feature_cache_dir = os.path.join(self.project_dir, FEATURES_DIR)
        self._times_path = os.path.join(self.project_dir, TIMES_FILE)
        if os.path.exists(self._times_path):
            with open(self._times_path) as f:
                self.seconds = json.load(f)

    def fail_on_retry(self, trial_id, reason, seconds):
        """Fails trial `trial_id` when KerasTuner retries it: its process died in it.

        Reloading a tuner sends the trials that were running to be retried
        first; this one then fails at once with `reason` (a
        `FailedTrialError`), so KerasTuner records it FAILED, prints its
        line and counts it towards `max_consecutive_failed_trials`.
        `seconds` (the time it ran before) counts towards its time.
        """
        self._died[trial_id] = (reason, seconds)

    def on_trial_begin(self, trial):
        died = self._died.get(trial.trial_id, (None, 0.0))
        self._started[trial.trial_id] = time.time() - died[1]
        super().on_trial_begin(trial)
        self._call_hooks("on_trial_begin", trial)

    def run_trial(self, trial, *args, **kwargs):
        if trial.trial_id in self._died:
            raise kt.errors.FailedTrialError(self._died.pop(trial.trial_id)[0])
        return super().run_trial(trial, *args, **kwargs)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        self.seconds[trial.trial_id] = time.time() - self._started.pop(trial.trial_id)
        atomic_write_json(self._times_path, self.seconds)
        row = report.trial_row(self.oracle.get_trial(trial.trial_id),
                               self.seconds[trial.trial_id])
        replicas = self.hypermodel.last_fit.get("replicas")
        self.out(report.trial_line(row) + (f" | replicas={replicas}" if replicas else ""))
        self.hypermodel.last_fit = {}
        self._call_hooks("on_trial_end", trial)

    def _call_hooks(self, name, trial):
        for hook in self.hooks:
            method = getattr(hook, name, None)
            if method is not None:
                method(self, trial)

    def more_trials_to_come(self):
        """Whether the oracle's `max_trials` leaves trials to run (always without one)."""
        limit = self.oracle.max_trials
        return limit is None or len(self.oracle.trials) < limit


class HyperbandSearchTuner(SearchTuner, kt.Hyperband):
    """`SearchTuner` with KerasTuner's Hyperband trial methods.

    From `kt.Hyperband` it takes `run_trial` (a trial's epoch budget and
    first epoch) and the loading of the promoted trial's best checkpoint
    before it trains on; its oracle is a `HyperbandOracle`.
    """


def make_tuner(cfg, hypermodel, directory, out=print, hooks=()):
    """Builds (or reloads) the tuner of a search, with its oracle.

    The strategy is not given to KerasTuner: `build_finetuner` enters its scope
    itself, after `clear_session` (which must not run inside a scope).

    Args:
        cfg: A validated search config.
        hypermodel: A `FineTuneHyperModel`.
        directory: The search directory (KerasTuner's project directory).
        out: Callable printing one line.
        hooks: Per-trial hooks (see `SearchTuner`).

    Returns:
        A `SearchTuner` (a `HyperbandSearchTuner` for `kind: hyperband`).
    """
    directory = os.path.abspath(directory)
    cls = HyperbandSearchTuner if cfg["tuner"]["kind"] == "hyperband" else SearchTuner
    return cls(make_oracle(cfg["tuner"]), hypermodel, out=out, hooks=hooks,
               executions_per_trial=cfg["tuner"]["executions_per_trial"],
               directory=os.path.dirname(directory), project_name=os.path.basename(directory))

"""Runs a validated search: tuner, trial lines, report, best model export.

The search directory (`run.directory`) is KerasTuner's project directory; it
also holds `config.yaml` (the validated config, so a rerun resumes only when
nothing changed), `seconds_per_trial.json`, `report.md`, `trials.png`,
`best_hyperparameters.yaml` and by default `export/<version>/`.
"""

import contextlib
import copy
import io
import json
import os
import shutil
import time
import warnings

import yaml

from tftransfer._lock import LOCK_FILE, atomic_write_json, atomic_write_text
from tftransfer.search import _guard, _quiet, report
from tftransfer.search import config as config_lib
from tftransfer.search._pool import WorkerError  # noqa: F401  (raised by run)

# TensorFlow, KerasTuner and the hypermodel are imported where they are used:
# the search process of `run.isolate_trials` leaves them to its trial workers.

CONFIG_FILE = "config.yaml"
BEST_FILE = "best_hyperparameters.yaml"
TIMES_FILE = "seconds_per_trial.json"
EXPORT_STATE = "export.json"
WORKERS_DIR = "workers"  # the other workers' searches, under multi_worker
# Keys that may change between runs of one search: raising max_trials extends it.
_RESUMABLE = (("tuner", "max_trials"), ("run", "directory"), ("run", "export_dir"),
              ("run", "isolate_trials"), ("run", "worker_max_trials"),
              ("run", "worker_max_rss_growth_mb"), ("run", "export_formats"))
_TUNERS = {"random": "RandomSearch", "bayesian": "BayesianOptimization",
           "hyperband": "Hyperband", "grid": "GridSearch"}


class DirectoryError(ValueError):
    """The search directory holds something this run must not touch."""


def _comparable(cfg):
    cfg = copy.deepcopy(cfg)
    for section, key in _RESUMABLE:
        cfg.get(section, {}).pop(key, None)
    return cfg


def check_directory(directory, cfg, overwrite):
    """Refuses a directory that holds another search, unless `overwrite`.

    Raises:
        DirectoryError: The stored `config.yaml` differs from `cfg`, or the
            directory holds other files.
    """
    if overwrite or not os.path.isdir(directory) or not _entries(directory):
        return
    stored = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(stored):
        raise DirectoryError(
            f"The search directory {directory!r} is not empty and holds no {CONFIG_FILE}. "
            "Pass --overwrite to clear it, or choose another --directory.")
    with open(stored) as f:
        old = yaml.safe_load(f) or {}
    changed = config_lib.differences(_comparable(old), _comparable(cfg))
    if changed:
        raise DirectoryError(
            f"The search directory {directory!r} holds a search with another config "
            f"(changed: {', '.join(changed)}). Rerun with --overwrite to delete it and start "
            "over, or choose another --directory.")
    data_change = _guard.fingerprint_change(directory, cfg["data"])
    if data_change:
        raise DirectoryError(
            f"The search directory {directory!r} holds a search on other data: {data_change}. "
            "Rerun with --overwrite to delete it and start over, or choose another --directory.")


def _entries(directory):
    """The directory's entries, without the other workers' folder and the lock."""
    return [n for n in os.listdir(directory) if n not in (WORKERS_DIR, LOCK_FILE)]


def make_strategy(name):
    """A `tf.distribute.Strategy` for a config name, or None for the default.

    `"mirrored"` mirrors over all GPUs, else over all logical CPUs
    (`tftransfer.distribute.get_strategy`).
    """
    if name == "none":
        return None
    import tensorflow as tf

    from tftransfer import distribute

    strategy = distribute.get_strategy(name)  # created once per process
    if name == "auto" and strategy is tf.distribute.get_strategy():
        return None  # "auto" found nothing to distribute over.
    return strategy


class _Reporting:
    """Tuner mixin: one line per finished trial, with its wall-clock time."""

    def _setup_reporting(self, out, times_path):
        self._out, self._times_path, self._started = out, times_path, {}
        self.seconds = {}
        if os.path.exists(times_path):
            with open(times_path) as f:
                self.seconds = json.load(f)

    def on_trial_begin(self, trial):
        self._started[trial.trial_id] = time.time()
        super().on_trial_begin(trial)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        self.seconds[trial.trial_id] = time.time() - self._started.pop(trial.trial_id)
        atomic_write_json(self._times_path, self.seconds)
        row = report.trial_row(self.oracle.get_trial(trial.trial_id),
                               self.seconds[trial.trial_id])
        replicas = self.hypermodel.last_fit.get("replicas")
        self._out(report.trial_line(row) + (f" | replicas={replicas}" if replicas else ""))
        self.hypermodel.last_fit = {}


def kerastuner_seed(seed):
    """The seed given to KerasTuner for a config's `tuner.seed`.

    KerasTuner reads a seed of 0 as "no seed" and draws a random one, so the
    same config would search other values on each run (and the workers of a
    multi-worker search would disagree). Seed 0 is passed as 10007.
    """
    return seed if seed else 10007


def make_tuner(cfg, hypermodel, directory, out=print, mixins=()):
    """Builds (or reloads) the KerasTuner tuner of a search.

    The strategy is not given to KerasTuner: `build_finetuner` enters its scope
    itself, after `clear_session` (which must not run inside a scope).
    `mixins` are more classes the tuner class derives from, before
    `_Reporting` (a trial worker's hooks).
    """
    import keras_tuner as kt

    t = cfg["tuner"]
    direction = "min" if t["objective"] == "val_loss" else "max"
    kwargs = dict(objective=kt.Objective(t["objective"], direction), seed=kerastuner_seed(t["seed"]),
                  max_consecutive_failed_trials=t["max_consecutive_failed_trials"],
                  executions_per_trial=t["executions_per_trial"],
                  directory=os.path.dirname(os.path.abspath(directory)),
                  project_name=os.path.basename(os.path.abspath(directory)))
    if t["kind"] == "hyperband":
        kwargs.update(max_epochs=t["max_epochs"], factor=t["factor"])
    else:
        kwargs["max_trials"] = t["max_trials"]
    from tftransfer.search._atomic import AtomicTuner

    base = getattr(kt, _TUNERS[t["kind"]])
    cls = type(base.__name__, (*mixins, _Reporting, base, AtomicTuner), {})
    hypermodel.declare_only = True  # KerasTuner builds once to collect the space.
    try:
        tuner = cls(hypermodel, **kwargs)
    finally:
        hypermodel.declare_only = False
    tuner._setup_reporting(out, os.path.join(directory, TIMES_FILE))
    return tuner


def _rows(tuner):
    trials = sorted(tuner.oracle.trials.values(), key=lambda t: report.id_key(t.trial_id))
    return [report.trial_row(t, tuner.seconds.get(t.trial_id)) for t in trials
            if str(t.status) in ("COMPLETED", "FAILED", "INVALID")]


def run(cfg, overwrite=False, out=print, trials_only=False, verbose=False):
    """Runs (or resumes) the search a validated config describes.

    With `run.isolate_trials` (the default) the trials run in trial workers
    (`tftransfer.search._pool`): processes that import TensorFlow once, run
    trials until recycled, and also write the report and the export; this
    process then never imports TensorFlow. Otherwise everything runs here.

    Args:
        cfg: A config from `tftransfer.search.config.validate`.
        overwrite: Delete the search directory first.
        out: Callable printing one line.
        trials_only: Run the missing trials only, in this process: no report,
            no export.
        verbose: Keep TensorFlow's native start-up lines.

    Returns:
        A dict: `directory`, `rows`, `best` (row or None), `export` (version
        directory or None), `tuner` (None when the trials ran in workers).

    Raises:
        DirectoryError: The directory holds another search (no `overwrite`).
        ConfigError: The data cannot be loaded, or a backbone does not take it.
        LockedError: Another process searches in the directory.
        WorkerError: Trial workers died before starting a trial, twice in a
            row, or before writing the report.

    The top process holds the search directory's lock for the whole run
    (`tftransfer._lock.DirectoryLock`); its trial workers run under it.
    """
    with _guard.search_lock(cfg, trials_only):
        return _run(cfg, overwrite, out, trials_only, verbose)


def _run(cfg, overwrite, out, trials_only, verbose):
    role = os.environ.get("KERASTUNER_TUNER_ID")  # set in a chief/worker cluster
    if (cfg["run"]["isolate_trials"] and not trials_only and role is None
            and cfg["run"]["strategy"] != "multi_worker"):
        return _run_pooled(cfg, overwrite, out, verbose)
    if role is None and cfg["run"]["strategy"] != "multi_worker":
        check_directory(cfg["run"]["directory"], cfg, overwrite)  # before TensorFlow loads
    _quiet.import_tensorflow(verbose)
    strategy, other_worker = None, False
    if cfg["run"]["strategy"] == "multi_worker":  # before any other op runs (TF_CONFIG)
        strategy = make_strategy("multi_worker")
        cfg, other_worker = _for_this_worker(cfg, strategy)
    directory = cfg["run"]["directory"]
    trials_only = trials_only or (role is not None and role != "chief")
    if role is None:
        check_directory(directory, cfg, overwrite)
    data = load_data(cfg)
    if role is None and not trials_only and (overwrite or not _resumes(directory)):
        _guard.check_backbones(cfg)  # a search being resumed was checked when it began
    if role is None:
        prepare_directory(cfg, overwrite, trials_only)
    hypermodel, tuner = build_tuner(cfg, data, out, strategy)
    with warnings.catch_warnings():  # Checkpoints hold optimizer variables too.
        warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
        search(tuner, out)
        if trials_only or other_worker:
            rows = _rows(tuner) if role is None else []  # a worker's oracle is remote
            return {"directory": directory, "rows": rows, "best": None,
                    "export": None, "tuner": tuner, "worker": True}
        return finish(cfg, tuner, hypermodel, data, directory, out)


def _run_pooled(cfg, overwrite, out, verbose):
    """`run` with the trials, report and export in trial workers."""
    from tftransfer.search import _pool

    directory = cfg["run"]["directory"]
    with _pool.TrialPool(cfg, out, verbose) as pool:  # a worker starts importing now
        check_directory(directory, cfg, overwrite)
        pool.wait_ready()  # the data loaded (or a ConfigError): nothing written before
        if overwrite or not _resumes(directory):
            pool.check_backbones()  # in the worker: a ConfigError, nothing written
        prepare_directory(cfg, overwrite)
        pool.search()
        return {**pool.finish(), "tuner": None}


def _resumes(directory):
    return os.path.exists(os.path.join(directory, CONFIG_FILE))


def build_tuner(cfg, data, out, strategy=None, mixins=()):
    """The hypermodel and the (reloaded) tuner of a search, in this process.

    Returns:
        `(FineTuneHyperModel, tuner)`.
    """
    from tftransfer.search.hypermodel import FineTuneHyperModel

    strategy = strategy or make_strategy(cfg["run"]["strategy"])
    hypermodel = FineTuneHyperModel(cfg["search_space"], data, strategy,
                                    cfg["run"]["strategy"], seed=cfg["tuner"]["seed"],
                                    dtype_policy=cfg["run"]["dtype_policy"],
                                    jit_compile=cfg["run"]["jit_compile"])
    with contextlib.redirect_stdout(io.StringIO()):  # KerasTuner's "Reloading Tuner from"
        tuner = make_tuner(cfg, hypermodel, cfg["run"]["directory"], out, mixins)
    return hypermodel, tuner


def _for_this_worker(cfg, strategy):
    """The config one worker of a multi-worker cluster runs.

    Every worker runs the same search in step (same seed, same trials), each
    trial training on all of them. Trials run in this process: the strategy
    holds this worker's cluster port. The chief keeps the search directory;
    the other workers search in `<directory>/workers/<task>-<index>` and
    write no report and no export.

    Returns:
        `(config, True when this is not the chief)`.
    """
    from tftransfer import distribute

    if not distribute.in_multi_worker_mode(strategy):
        return cfg, False
    cfg = copy.deepcopy(cfg)
    cfg["run"]["isolate_trials"] = False
    kind, index, chief = distribute.worker_task()
    if not chief:
        cfg["run"]["directory"] = os.path.join(cfg["run"]["directory"], WORKERS_DIR,
                                               f"{kind}-{index}")
    return cfg, not chief


def load_data(cfg):
    """The search's data (`sources.load`), a ConfigError when it does not load."""
    from tftransfer.search import sources

    try:
        return sources.load(cfg["data"])
    except (ValueError, OSError) as e:
        raise config_lib.ConfigError("data", "data that loads", str(e)) from e


def prepare_directory(cfg, overwrite=False, trials_only=False):
    """Checks the search directory, clears it with `overwrite`, writes the config.

    Raises:
        DirectoryError: It holds another search and `overwrite` is False.
    """
    directory = cfg["run"]["directory"]
    check_directory(directory, cfg, overwrite)
    if overwrite and os.path.isdir(directory):
        for name in _entries(directory):  # the other workers clear their own folders
            path = os.path.join(directory, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(directory, exist_ok=True)
    if not trials_only:
        _guard.remove_leftovers(directory)
        atomic_write_text(os.path.join(directory, CONFIG_FILE), config_lib.dump(cfg))
        _guard.write_fingerprint(directory, cfg["data"])


def search(tuner, out):
    """Runs the tuner's missing trials; KerasTuner's failure limit ends it quietly."""
    try:
        tuner.search(verbose=0)
    except RuntimeError as e:  # KerasTuner's max_consecutive_failed_trials.
        if "consecutive failures" not in str(e):
            raise
        out(f"Search stopped: {str(e).splitlines()[0]} (tuner.max_consecutive_failed_trials)")


def finish(cfg, tuner, hypermodel, data, directory, out):
    """Writes the report, the ranked table, the best hyperparameters and the export."""
    from tftransfer import distribute

    objective = cfg["tuner"]["objective"]
    direction = tuner.oracle.objective.direction
    rows = _rows(tuner)
    ranked = report.ranked(rows, direction)
    best = ranked[0] if ranked and ranked[0]["score"] is not None else None
    report.write_markdown(os.path.join(directory, "report.md"), rows, objective, direction, best)
    report.write_plot(os.path.join(directory, "trials.png"), rows, objective, direction)
    out(report.table(rows, objective, direction))
    result = {"directory": directory, "rows": rows, "best": best, "export": None,
              "tuner": tuner}
    if best is None:
        out("No trial completed: nothing to export.")
        return result
    trial = tuner.oracle.get_trial(best["trial_id"])
    write_best(os.path.join(directory, BEST_FILE), hypermodel, trial, objective)
    export_dir = cfg["run"]["export_dir"] or os.path.join(directory, "export")
    if distribute.in_multi_worker_mode(hypermodel.strategy):
        hypermodel.strategy = None  # only the chief exports: no collectives there
    result["export"] = export_best(tuner, trial, data, export_dir, directory, out,
                                   formats=cfg["run"].get("export_formats", ["serving"]))
    return result


def write_best(path, hypermodel, trial, objective):
    """Writes the best trial's `build_finetuner` and `fine_tune` arguments."""
    build, fit = hypermodel.settings(trial.hyperparameters)
    atomic_write_text(path, yaml.safe_dump({"trial_id": trial.trial_id, "objective": objective,
                                            "score": float(trial.score), "build_finetuner": build,
                                            "fine_tune": fit}, sort_keys=False))


def export_best(tuner, trial, data, export_dir, directory, out, formats=("serving",)):
    """Exports the best trial's model in `formats` (once per best trial): TF Serving,
    and the verified .tflite / .onnx forms of `tftransfer.export.formats`."""
    from tftransfer.export.formats import export_formats

    state_path = os.path.join(directory, EXPORT_STATE)
    if os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
        same_dir = os.path.abspath(os.path.dirname(state.get("path", ""))) == \
            os.path.abspath(export_dir)
        if state.get("trial_id") == trial.trial_id and same_dir and os.path.isdir(state["path"]):
            out(f"Best trial {trial.trial_id} unchanged; its export is {state['path']}")
            return state["path"]
    model = tuner.load_model(trial)
    paths = export_formats(model, export_dir, formats, representative_data=data,
                           validation_data=data, class_names=data.class_names, overwrite=True,
                           metadata={"trial_id": trial.trial_id, "score": float(trial.score)})
    path = paths.get("serving") or next(iter(paths.values()))
    atomic_write_json(state_path, {"trial_id": trial.trial_id, "path": path})
    out(f"Best trial {trial.trial_id} ({trial.score:.4f}) exported to {path}")
    return path

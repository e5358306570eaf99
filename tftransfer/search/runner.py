"""Runs a validated search: tuner, trial lines, report, best model export.

`run` computes the `SearchMode` once and hands the search to one function
per mode (pooled trial workers, in-process, multi-worker, a `--workers`
cluster and its chief and workers); each reads top to bottom. The tuner and
oracle classes are in `tftransfer.search.tuners`; `finish` writes what a
finished search leaves (report, best hyperparameters, export).

The search directory (`run.directory`) is KerasTuner's project directory; it
also holds `config.yaml` (the validated config, so a rerun resumes only when
nothing changed), `seconds_per_trial.json`, `report.md`, `trials.png`,
`best_hyperparameters.yaml` and by default `export/<version>/`.
"""

import contextlib
import copy
import enum
import io
import json
import os
import shutil
import sys
import warnings

import yaml

from tftransfer._lock import LOCK_FILE, atomic_write_json, atomic_write_text
from tftransfer.search import _guard, _quiet, control, report
from tftransfer.search import config as config_lib
from tftransfer.search._pool import WorkerError  # noqa: F401  (raised by run)

# TensorFlow, KerasTuner and the hypermodel are imported where they are used:
# the search process of `run.isolate_trials` leaves them to its trial workers.

CONFIG_FILE = "config.yaml"
BEST_FILE = "best_hyperparameters.yaml"
EXPORT_STATE = "export.json"
WORKERS_DIR = "workers"  # the other workers' searches, under multi_worker
# Keys that may change between runs of one search: raising max_trials extends it.
_RESUMABLE = (("tuner", "max_trials"), ("run", "directory"), ("run", "export_dir"),
              ("run", "isolate_trials"), ("run", "worker_max_trials"),
              ("run", "worker_max_rss_growth_mb"), ("run", "export_formats"),
              ("run", "max_time"), ("run", "stop_after"))
CLUSTER_ROLE = "KERASTUNER_TUNER_ID"  # set by `--workers` in the chief and workers it launches


class DirectoryError(ValueError):
    """The search directory holds something this run must not touch."""


def _comparable(cfg):
    cfg = copy.deepcopy(cfg)
    for section, key in _RESUMABLE:
        cfg.get(section, {}).pop(key, None)
    return cfg


def check_directory(directory, cfg, overwrite):
    """Whether the run resumes the search in `directory`; refuses another search.

    Returns:
        True when `directory` holds this search (same config and data) and
        `overwrite` is False; False when the run starts afresh.

    Raises:
        DirectoryError: Without `overwrite`, the stored `config.yaml` differs
            from `cfg`, the data changed, or the directory holds other files.
    """
    if overwrite or not os.path.isdir(directory) or not _entries(directory):
        return False
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
    return True


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


def _rows(tuner):
    trials = sorted(tuner.oracle.trials.values(), key=lambda t: report.id_key(t.trial_id))
    return [report.trial_row(t, tuner.seconds.get(t.trial_id)) for t in trials
            if str(t.status) in ("COMPLETED", "FAILED", "INVALID")]


# --------------------------------------------------------------------- modes


class SearchMode(enum.Enum):
    """How a search runs; `search_mode` picks one, `run` dispatches on it."""

    POOLED = "pooled"  # run.isolate_trials (default): trials in trial workers
    IN_PROCESS = "in_process"  # run.isolate_trials: false
    MULTI_WORKER = "multi_worker"  # run.strategy: multi_worker, every trial on all workers
    CLUSTER = "cluster"  # --workers N: launches a KerasTuner chief and N workers
    CLUSTER_CHIEF = "cluster_chief"  # the chief CLUSTER launched: serves the oracle
    CLUSTER_WORKER = "cluster_worker"  # a worker CLUSTER launched: runs trials


def search_mode(cfg, workers=None):
    """The `SearchMode` of a validated config in this process.

    Args:
        cfg: A validated search config.
        workers: `--workers`: the number of KerasTuner workers to launch, or None.
    """
    role = os.environ.get(CLUSTER_ROLE)
    if role is not None:
        return SearchMode.CLUSTER_CHIEF if role == "chief" else SearchMode.CLUSTER_WORKER
    if workers:
        return SearchMode.CLUSTER
    if cfg["run"]["strategy"] == "multi_worker":
        return SearchMode.MULTI_WORKER
    return SearchMode.POOLED if cfg["run"]["isolate_trials"] else SearchMode.IN_PROCESS


def run(cfg, overwrite=False, out=print, verbose=False, workers=None):
    """Runs (or resumes) the search a validated config describes.

    With `run.isolate_trials` (the default) the trials run in trial workers
    (`tftransfer.search._pool`): processes that import TensorFlow once, run
    trials until replaced, and also write the report and the export; this
    process then never imports TensorFlow. Otherwise everything runs here;
    `workers` launches a KerasTuner chief and that many workers instead.

    Args:
        cfg: A config from `tftransfer.search.config.validate`.
        overwrite: Delete the search directory first.
        out: Callable printing one line.
        verbose: Keep TensorFlow's native start-up lines.
        workers: Optional integer: run the search as a KerasTuner chief and
            this many workers on this host (`--workers`).

    Returns:
        A dict: `directory`, `rows`, `best` (row or None), `export` (version
        directory or None), `tuner` (None when the trials ran in workers);
        `worker: True` in a process that writes no report, and `exit_code`
        (of the chief and workers) with `workers`.

    Raises:
        DirectoryError: The directory holds another search (no `overwrite`).
        ConfigError: The data cannot be loaded, or a backbone does not take it.
        LockedError: Another process searches in the directory.
        WorkerError: Trial workers died before starting a trial, twice in a
            row, or before writing the report.

    The top process holds the search directory's lock for the whole run
    (`tftransfer._lock.DirectoryLock`); its trial workers, and the chief and
    workers it launches, run under it.
    """
    mode = search_mode(cfg, workers)
    if mode is SearchMode.CLUSTER_CHIEF:
        return _search_as_cluster_chief(cfg, out, verbose)
    if mode is SearchMode.CLUSTER_WORKER:
        return _search_as_cluster_worker(cfg, out, verbose)
    if mode is SearchMode.MULTI_WORKER:
        cfg = _for_this_worker(cfg, verbose)
    directory = cfg["run"]["directory"]
    with _guard.search_lock(directory):
        resuming = check_directory(directory, cfg, overwrite)
        if mode is SearchMode.CLUSTER:
            return _launch_cluster(cfg, resuming, overwrite, verbose, workers)
        search_here = {SearchMode.POOLED: _search_pooled,
                       SearchMode.IN_PROCESS: _search_in_process,
                       SearchMode.MULTI_WORKER: _search_multi_worker}[mode]
        return search_here(cfg, resuming, overwrite, out, verbose)


def _search_pooled(cfg, resuming, overwrite, out, verbose):
    """Trials, report and export in trial workers; no TensorFlow here."""
    from tftransfer.search import _pool

    with _pool.TrialPool(cfg, out, verbose) as pool:  # a worker starts importing now
        pool.wait_ready()  # the data loaded (or a ConfigError): nothing written before
        if not resuming:
            pool.check_backbones()  # in the worker: a ConfigError, nothing written
        prepare_directory(cfg, overwrite)
        pool.search()
        return {**pool.finish(), "tuner": None}


def _search_in_process(cfg, resuming, overwrite, out, verbose):
    """Trials, report and export in this process."""
    _quiet.import_tensorflow(verbose)
    data = load_data(cfg)
    if not resuming:
        _guard.check_backbones(cfg)
    prepare_directory(cfg, overwrite)
    hypermodel, tuner = build_tuner(cfg, data, out)
    search(tuner, out)
    return finish(cfg, tuner, hypermodel, data, out)


def _search_multi_worker(cfg, resuming, overwrite, out, verbose):
    """Every trial trains on all workers in step; the chief reports and exports.

    The strategy comes first: no other op may run before it (TF_CONFIG).
    """
    strategy = make_strategy("multi_worker")
    data = load_data(cfg)
    if not resuming:
        _guard.check_backbones(cfg)
    prepare_directory(cfg, overwrite)
    hypermodel, tuner = build_tuner(cfg, data, out, strategy)
    search(tuner, out)
    from tftransfer.distribute import worker_task

    if not worker_task()[2]:  # not the chief: its state only, in its own folder
        return _worker_result(cfg, rows=_rows(tuner), tuner=tuner)
    return finish(cfg, tuner, hypermodel, data, out)


def _launch_cluster(cfg, resuming, overwrite, verbose, workers):
    """Launches a KerasTuner chief and `workers` workers on the prepared directory.

    They run `python -m tftransfer.search` on the directory's `config.yaml`
    (the validated config, overrides applied), under this process's lock.
    """
    with _quiet.native_startup(verbose):
        from tftransfer.distribute import launch_tuning_cluster

    if not resuming:
        _guard.check_backbones(cfg)
    prepare_directory(cfg, overwrite)
    command = [sys.executable, "-m", "tftransfer.search", "--config",
               os.path.join(cfg["run"]["directory"], CONFIG_FILE)]
    code = launch_tuning_cluster(command + (["--verbose"] if verbose else []), workers)
    return {**_worker_result(cfg), "worker": False, "exit_code": code}


def _search_as_cluster_chief(cfg, out, verbose):
    """Serves the oracle until the workers are done, then reports and exports."""
    _quiet.import_tensorflow(verbose)
    data = load_data(cfg)
    hypermodel, tuner = build_tuner(cfg, data, out)
    search(tuner, out)  # KerasTuner's chief: blocks while the workers search
    return finish(cfg, tuner, hypermodel, data, out)


def _search_as_cluster_worker(cfg, out, verbose):
    """Runs the trials the chief's oracle hands out."""
    _quiet.import_tensorflow(verbose)
    data = load_data(cfg)
    _, tuner = build_tuner(cfg, data, out)
    search(tuner, out)
    return _worker_result(cfg, tuner=tuner)  # its oracle is remote: no rows


def _worker_result(cfg, rows=(), tuner=None):
    return {"directory": cfg["run"]["directory"], "rows": list(rows), "best": None,
            "export": None, "tuner": tuner, "worker": True}


def build_tuner(cfg, data, out, strategy=None, hooks=()):
    """The hypermodel and the (reloaded) tuner of a search, in this process.

    Args:
        cfg: A validated search config.
        data: The search's data (`load_data`).
        out: Callable printing one line.
        strategy: A `tf.distribute.Strategy`; by default `run.strategy`'s.
        hooks: Per-trial hooks (`tftransfer.search.tuners.SearchTuner`).

    Returns:
        `(FineTuneHyperModel, SearchTuner)`.
    """
    from tftransfer.search.hypermodel import FineTuneHyperModel
    from tftransfer.search.tuners import make_tuner

    strategy = strategy or make_strategy(cfg["run"]["strategy"])
    hypermodel = FineTuneHyperModel(cfg["search_space"], data, strategy,
                                    cfg["run"]["strategy"], seed=cfg["tuner"]["seed"],
                                    dtype_policy=cfg["run"]["dtype_policy"],
                                    jit_compile=cfg["run"]["jit_compile"],
                                    objective=cfg["tuner"]["objective"])
    hooks = [*trial_hooks(cfg), *hooks]
    with contextlib.redirect_stdout(io.StringIO()):  # KerasTuner's "Reloading Tuner from"
        tuner = make_tuner(cfg, hypermodel, cfg["run"]["directory"], out, hooks)
    return hypermodel, tuner


def trial_hooks(cfg):
    """The per-trial hooks of a search with `cfg`, in whatever mode and process it runs.

    Each is an object with optional `on_trial_begin(tuner, trial)` and
    `on_trial_end(tuner, trial)` (`tftransfer.search.tuners.SearchTuner`); a
    hook may end the search with `tuner.oracle.stop()`. The trial line and
    `seconds_per_trial.json` are the tuner's own; `control.SearchControl` logs
    TensorBoard, HParams and trials.csv and enforces `run.max_time` / `run.stop_after`.
    """
    return [control.SearchControl.of(cfg)]


def _for_this_worker(cfg, verbose):
    """The config one worker of a multi-worker cluster runs.

    Every worker runs the same search in step (same seed, same trials), each
    trial training on all of them. Trials run in this process: the strategy
    holds this worker's cluster port. The chief keeps the search directory;
    the other workers search in `<directory>/workers/<task>-<index>` and
    write no report and no export.
    """
    _quiet.import_tensorflow(verbose)
    from tftransfer.distribute import worker_task  # reads TF_CONFIG; runs no op

    kind, index, chief = worker_task()
    cfg = copy.deepcopy(cfg)
    cfg["run"]["isolate_trials"] = False
    if not chief:
        cfg["run"]["directory"] = os.path.join(cfg["run"]["directory"], WORKERS_DIR,
                                               f"{kind}-{index}")
    return cfg


def load_data(cfg):
    """The search's data (`sources.load`), a ConfigError when it does not load."""
    from tftransfer.search import sources

    try:
        return sources.load(cfg["data"])
    except (ValueError, OSError) as e:
        raise config_lib.data_error(cfg["data"], e) from e


def prepare_directory(cfg, overwrite=False):
    """Clears the search directory with `overwrite`, then writes the config.

    Call it after `check_directory`, once the data and backbones are checked.
    """
    directory = cfg["run"]["directory"]
    if overwrite and os.path.isdir(directory):
        for name in _entries(directory):  # the other workers clear their own folders
            path = os.path.join(directory, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(directory, exist_ok=True)
    _guard.remove_leftovers(directory)
    atomic_write_text(os.path.join(directory, CONFIG_FILE), config_lib.dump(cfg))
    _guard.write_fingerprint(directory, cfg["data"])
    control.start_clock(directory)  # run.max_time counts from here


@contextlib.contextmanager
def _checkpoint_warnings_ignored():
    """KerasTuner's checkpoints hold optimizer variables too: Keras warns on loading them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
        yield


def search(tuner, out):
    """Runs the tuner's missing trials; KerasTuner's failure limit ends it quietly."""
    try:
        with _checkpoint_warnings_ignored():
            tuner.search(verbose=0)
    except RuntimeError as e:  # KerasTuner's max_consecutive_failed_trials.
        if "consecutive failures" not in str(e):
            raise
        out(f"Search stopped: {str(e).splitlines()[0]} (tuner.max_consecutive_failed_trials)")


def finish(cfg, tuner, hypermodel, data, out):
    """Writes the report, the ranked table, the best hyperparameters and the export.

    Returns:
        `run`'s result dict.
    """
    from tftransfer import distribute

    directory = cfg["run"]["directory"]
    objective = cfg["tuner"]["objective"]["name"]
    direction = tuner.oracle.objective.direction
    rows = _rows(tuner)
    ranked = report.ranked(rows, direction)
    best = ranked[0] if ranked and ranked[0]["score"] is not None else None
    report.write_markdown(os.path.join(directory, "report.md"), rows, objective, direction, best)
    report.write_plot(os.path.join(directory, "trials.png"), rows, objective, direction)
    from tftransfer import report_html

    report_html.write_search_report(os.path.join(directory, "report.html"), rows, objective,
                                    direction, best)
    control.write_trials_csv(directory, rows)
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
    with _checkpoint_warnings_ignored():
        model = tuner.load_model(trial)
    paths = export_formats(model, export_dir, formats, representative_data=data,
                           validation_data=data, class_names=data.class_names, overwrite=True,
                           metadata={"trial_id": trial.trial_id, "score": float(trial.score)})
    path = paths.get("serving") or next(iter(paths.values()))
    atomic_write_json(state_path, {"trial_id": trial.trial_id, "path": path})
    out(f"Best trial {trial.trial_id} ({trial.score:.4f}) exported to {path}")
    return path

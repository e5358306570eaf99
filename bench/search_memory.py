"""Resident memory of a long search: does RSS grow trial after trial?

Runs a 20-trial random search (bundled digits backbone, 5 images per class,
1+1 epochs, a throw-away directory) and samples the resident set size
(psutil) after every trial, in the process that ran it.

By default, as in the search's default (`run.isolate_trials: true`), the
trials run in trial workers (processes that import TensorFlow once and are
replaced after `run.worker_max_trials` trials, default 10, or
`--worker-max-trials`); the sample is the RSS of the worker that ran the
trial, read when its trial line arrives (the largest child of this process:
a spare worker started for the next one is smaller). `--in-process` runs
every trial in this process, to show what the workers save.

Growth is measured within one process, from the end of its first trial
(warm-up: TensorFlow, data and first traces) to the end of its last: a span
across a worker replacement would subtract a fresh worker's RSS from an old
one's and hide the growth. The headline is the largest growth of one worker
(of this process with `--in-process`), over the trials it ran (printed).

    python bench/search_memory.py [--trials 20] [--in-process] [--worker-max-trials K]
        [--keep DIR]

Last line: `rss_growth_mb: <n>`.
"""

import argparse
import os
import pathlib
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import psutil  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tftransfer.search import runner, validate  # noqa: E402


def _config(directory, trials, isolate, worker_max_trials):
    return validate({
        "data": {"source": "digits", "per_class": 5},
        "search_space": {"backbone": str(ROOT / "saved_models" / "digits_cnn.keras"),
                         "learning_rate": {"min": 1e-3, "max": 1e-2, "sampling": "log"},
                         "dropout": {"min": 0.0, "max": 0.5},
                         "hidden_units": {"choice": [[], [32]]},
                         "batch_size": 16, "head_epochs": 1, "fine_tune_epochs": 1},
        "tuner": {"kind": "random", "max_trials": trials, "seed": 0},
        "run": {"directory": str(directory), "isolate_trials": isolate,
                "worker_max_trials": worker_max_trials},
    })


def main(argv=None):
    """Runs the search, prints RSS per trial and the growth; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--in-process", dest="isolate", action="store_false",
                   help="Run every trial in this process (default: trial workers).")
    p.add_argument("--worker-max-trials", type=int, default=10,
                   help="Trials per worker before a fresh one takes over (run.worker_max_trials).")
    p.add_argument("--keep", help="Search directory to keep (default: a temporary one).")
    args = p.parse_args(argv)
    directory = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="search_memory-")) / "search"
    process, samples = psutil.Process(), []

    def out(line):
        if not (line.startswith("trial ") and " | " in line):
            return
        own = process.memory_info().rss / 2**20
        if args.isolate:
            workers = _worker_rss(process)
            if not workers:
                return  # the worker ended before its line was read
            pid, rss = max(workers, key=lambda w: w[1])
            samples.append((pid, rss))
            print(f"{line.split(' | ')[0]}: worker {pid} rss {rss:.0f} MB, "
                  f"this process {own:.0f} MB", flush=True)
        else:
            samples.append((process.pid, own))
            print(f"{line.split(' | ')[0]}: rss {own:.0f} MB", flush=True)

    try:
        cfg = _config(directory, args.trials, args.isolate, args.worker_max_trials)
        runner.run(cfg, overwrite=True, out=out)
    finally:
        if not args.keep:
            shutil.rmtree(directory.parent, ignore_errors=True)
    growths = _growth_per_process(samples)
    for pid, (trials, first, last) in growths.items():
        print(f"process {pid}: {trials} trials, {first:.0f} MB after its first, "
              f"{last:.0f} MB after its last: {last - first:+.1f} MB")
    pid, (trials, first, last) = max(growths.items(), key=lambda g: g[1][2] - g[1][1])
    print(f"largest growth of one process: {pid}, over its {trials} trials "
          f"(peak of all samples {max(rss for _, rss in samples):.0f} MB)")
    print(f"rss_growth_mb: {last - first:.1f}")
    return 0


def _growth_per_process(samples):
    """`{pid: (trials, RSS after its first trial, RSS after its last)}` from `(pid, MB)` samples."""
    out = {}
    for pid, rss in samples:
        trials, first, _ = out.get(pid, (0, rss, rss))
        out[pid] = (trials + 1, first, rss)
    return out


def _worker_rss(process):
    """`[(pid, RSS in MB)]` of this process's children (the trial workers)."""
    found = []
    for child in process.children():
        try:
            found.append((child.pid, child.memory_info().rss / 2**20))
        except psutil.Error:
            pass
    return found


if __name__ == "__main__":
    sys.exit(main())

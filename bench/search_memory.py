"""Resident memory of a long search: does RSS grow trial after trial?

Runs a 20-trial random search (bundled digits backbone, 5 images per class,
1+1 epochs, a throw-away directory) and samples the resident set size
(psutil) after every trial. Growth is measured from the end of the first
trial (warm-up: TensorFlow, data and first traces) to the end of the last.

By default, as in the search's default (`run.isolate_trials: true`), each
trial runs in its own process; the number measured is then the peak RSS of
the largest trial process so far (`getrusage(RUSAGE_CHILDREN)`), and this
process's own RSS is shown too. The first figure is taken once the first trial
process has ended: before that, `RUSAGE_CHILDREN` holds only short processes
forked by this one (at import time), which report this process's size.
`--in-process` runs every trial in this process, to show what isolation saves.

    python bench/search_memory.py [--trials 20] [--in-process] [--keep DIR]

Last line: `rss_growth_mb: <n>`.
"""

import argparse
import os
import pathlib
import resource
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import psutil  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tftransfer.search import runner, validate  # noqa: E402


def _config(directory, trials, isolate):
    return validate({
        "data": {"source": "digits", "per_class": 5},
        "search_space": {"backbone": str(ROOT / "saved_models" / "digits_cnn.keras"),
                         "learning_rate": {"min": 1e-3, "max": 1e-2, "sampling": "log"},
                         "dropout": {"min": 0.0, "max": 0.5},
                         "hidden_units": {"choice": [[], [32]]},
                         "batch_size": 16, "head_epochs": 1, "fine_tune_epochs": 1},
        "tuner": {"kind": "random", "max_trials": trials, "seed": 0},
        "run": {"directory": str(directory), "isolate_trials": isolate},
    })


def main(argv=None):
    """Runs the search, prints RSS per trial and the growth; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--in-process", dest="isolate", action="store_false",
                   help="Run every trial in this process (default: one process per trial).")
    p.add_argument("--keep", help="Search directory to keep (default: a temporary one).")
    args = p.parse_args(argv)
    directory = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="search_memory-")) / "search"
    process, samples, seen = psutil.Process(), [], [0]

    def out(line):
        own = process.memory_info().rss / 2**20
        if args.isolate and line.startswith("trial ") and " | " in line:
            # Peak of the trial processes that have exited (this one is still ending).
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10
            seen[0] += 1
            if seen[0] > 1:  # from the second line on, trial processes have ended
                samples.append(peak)
            print(f"{line.split(' | ')[0]}: peak of ended trial processes {peak:.0f} MB, "
                  f"this process {own:.0f} MB", flush=True)
        elif not args.isolate and line.startswith("trial "):
            samples.append(own)
            print(f"{line.split(' | ')[0]}: rss {samples[-1]:.0f} MB", flush=True)

    try:
        runner.run(_config(directory, args.trials, args.isolate), overwrite=True, out=out)
        if args.isolate:  # every trial process has exited now
            samples.append(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10)
    finally:
        if not args.keep:
            shutil.rmtree(directory.parent, ignore_errors=True)
    growth = samples[-1] - samples[0] if len(samples) > 1 else 0.0
    print(f"trials: {len(samples)}  first: {samples[0]:.0f} MB  last: {samples[-1]:.0f} MB  "
          f"peak: {max(samples):.0f} MB")
    print(f"rss_growth_mb: {growth:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

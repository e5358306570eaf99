"""Wall time for Hyperband vs RandomSearch to reach the same validation accuracy.

Both searches run the quickstart task (bundled digits backbone, digits 5-9
few-shot) with the same search space, in this process, one after the other;
each trial's completion time and score is recorded from the search's per-trial
lines. The time to target is when the best-so-far score first reaches
`--target`. Last line: `hyperband_time_ratio: <hyperband/random>` (target at
most 0.5); a search that never reaches the target counts as its full time and
the ratio is marked with `>=` or `<=`. A table shows the ratio at several
targets (`+`: not reached, full time counted).

    python bench/search_efficiency.py [--target 0.85] [--random-trials 12]
"""

import argparse
import os
import pathlib
import re
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tftransfer.search import load_config, run  # noqa: E402

_SCORE = re.compile(r"^trial (\S+) \| COMPLETED \| score ([0-9.]+)")


def search(kind, directory, args):
    """Runs one search; returns [(seconds since start, score)] per completed trial."""
    overrides = {"tuner.kind": kind, "run.directory": str(directory),
                 "run.isolate_trials": False, "tuner.seed": args.seed,
                 "tuner.max_trials": args.random_trials}
    if kind == "hyperband":
        overrides.update({"tuner.max_epochs": args.max_epochs, "tuner.factor": 3})
    cfg = load_config(str(ROOT / "tuner_configs" / "quickstart.yaml"), overrides)
    cfg["search_space"]["backbone"] = str(ROOT / "saved_models" / "digits_cnn.keras")
    points, start = [], time.perf_counter()

    def out(line):
        match = _SCORE.match(line)
        if match:
            points.append((time.perf_counter() - start, float(match.group(2))))
            print(f"  {kind:<9} {points[-1][0]:7.1f}s  {line}", flush=True)

    run(cfg, overwrite=True, out=out)
    return points, time.perf_counter() - start


def time_to(points, total, target):
    best = 0.0
    for seconds, score in points:
        best = max(best, score)
        if best >= target:
            return seconds, True
    return total, False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--random-trials", type=int, default=12)
    parser.add_argument("--max-epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("random", "hyperband"):
            points, total = search(kind, pathlib.Path(tmp) / kind, args)
            results[kind] = (*time_to(points, total, args.target), len(points), total,
                             max((s for _, s in points), default=0.0), points)
    print(f"\n{'tuner':<10}{'trials':>7}{'best':>7}{'total s':>9}{'to target s':>13}  reached")
    for kind, (seconds, reached, count, total, best, _) in results.items():
        print(f"{kind:<10}{count:>7}{best:>7.3f}{total:>9.1f}{seconds:>13.1f}  {reached}")
    print(f"\n{'target':<8}{'random s':>10}{'hyperband s':>13}{'ratio':>8}")
    for target in (0.75, 0.8, 0.85, 0.875):
        r_t, r_hit = time_to(results["random"][5], results["random"][3], target)
        h_t, h_hit = time_to(results["hyperband"][5], results["hyperband"][3], target)
        print(f"{target:<8}{r_t:>9.1f}{'' if r_hit else '+'}{h_t:>12.1f}"
              f"{'' if h_hit else '+'}{h_t / r_t:>8.2f}")
    (h, h_ok), (r, r_ok) = results["hyperband"][:2], results["random"][:2]
    mark = "" if h_ok and r_ok else (">=" if r_ok else "<=" if h_ok else "~")
    print(f"target val_accuracy {args.target}")
    print(f"hyperband_time_ratio: {mark}{h / r:.2f}")


if __name__ == "__main__":
    main()

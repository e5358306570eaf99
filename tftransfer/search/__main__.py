"""Command line: `python -m tftransfer.search --config FILE [overrides]`.

Exit codes: 0 success, 1 no trial completed (or trial workers kept dying),
2 bad arguments, config or search directory (nothing is written then),
130 interrupted with Ctrl-C (the same command resumes).
"""

import argparse
import os
import sys

from tftransfer.search import config as config_lib  # TensorFlow is imported when needed


def _epochs(text):
    """`N` (both stages) or `HEAD,FINE_TUNE`, as a pair of integers >= 0."""
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected N or HEAD,FINE_TUNE (integers >= 0), received {text!r}")
    return (values * 2)[:2]


def _image_size(text):
    """`N` (square) or `HEIGHT,WIDTH`, as a list of integers >= 8."""
    try:
        values = [int(p) for p in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or any(v < 8 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected N or HEIGHT,WIDTH (integers >= 8), received {text!r}")
    return (values * 2)[:2]


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, received {text!r}")
    return value


def parser():
    """The argument parser of `python -m tftransfer.search`."""
    p = argparse.ArgumentParser(
        prog="python -m tftransfer.search",
        description="Hyperparameter search over tftransfer fine-tuning (KerasTuner).",
        epilog="Exit codes: 0 done, 1 no trial completed, 2 bad arguments, config, data or "
               "search directory (nothing written). Rerunning the same command resumes. "
               "Config reference: `help(tftransfer.search)`; examples in tuner_configs/.")
    p.add_argument("--config", required=True, help="YAML search config (see tuner_configs/).")
    p.add_argument("--data", help="Override data.source: digits, a folder or tfds:<name>.")
    p.add_argument("--image-size", type=_image_size,
                   help="Override data.image_size: N (square) or HEIGHT,WIDTH.")
    p.add_argument("--per-class", type=_positive,
                   help="Override data.per_class (digits only): training images per class.")
    p.add_argument("--backbone", help="Override search_space.backbone (comma list = choice).")
    p.add_argument("--tuner", choices=config_lib.TUNERS, help="Override tuner.kind.")
    p.add_argument("--max-trials", type=_positive, help="Override tuner.max_trials.")
    p.add_argument("--epochs", type=_epochs,
                   help="Fix head_epochs and fine_tune_epochs: N (both) or HEAD,FINE_TUNE.")
    p.add_argument("--directory", help="Override run.directory (the search directory).")
    p.add_argument("--export-dir", help="Override run.export_dir (default <directory>/export).")
    p.add_argument("--strategy", choices=config_lib.STRATEGIES, help="Override run.strategy.")
    p.add_argument("--overwrite", action="store_true",
                   help="Delete the search directory first instead of resuming.")
    p.add_argument("--workers", type=_positive,
                   help="Run a KerasTuner chief and this many workers on this host "
                        "(one GPU per worker when there are GPUs).")
    p.add_argument("--verbose", action="store_true",
                   help="Keep TensorFlow's native start-up lines (CUDA probing, CPU features).")
    return p


def overrides(args):
    """The `{"section.key": value}` overrides the flags ask for."""
    out = {"data.source": args.data, "tuner.kind": args.tuner,
           "tuner.max_trials": args.max_trials, "run.directory": args.directory,
           "run.export_dir": args.export_dir, "run.strategy": args.strategy}
    if args.backbone:
        names = [b.strip() for b in args.backbone.split(",") if b.strip()]
        out["search_space.backbone"] = names[0] if len(names) == 1 else {"choice": names}
    if args.epochs:
        out["search_space.head_epochs"], out["search_space.fine_tune_epochs"] = args.epochs
    out = {k: v for k, v in out.items() if v is not None}
    if args.data and args.data != "digits":  # Digits-only keys do not apply.
        out.update({"data.classes": None, "data.per_class": None})
    out.update(_data_overrides(args))
    return out


def _data_overrides(args):
    """`--image-size` and `--per-class` (after the reset above: a folder with
    `--per-class` is then refused by the config check)."""
    pairs = {"data.image_size": args.image_size, "data.per_class": args.per_class}
    return {k: v for k, v in pairs.items() if v is not None}


def main(argv=None):
    """Runs the search; returns the exit code.

    Args:
        argv: Arguments without the program name; defaults to `sys.argv[1:]`.

    Returns:
        0 on success, 1 when no trial completed, 2 on bad arguments, config,
        data or search directory, 130 on Ctrl-C (one line, no traceback).
    """
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else 2
    if not args.verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return _main(args, argv)
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are kept in the search directory; run the "
              "same command again to resume the search.", file=sys.stderr)
        return 130


def _main(args, argv):
    """`main` after parsing: the search, its config and directory errors as exit codes."""
    from tftransfer._lock import LockedError
    from tftransfer.search import runner  # imports no TensorFlow

    try:
        cfg = config_lib.load_config(args.config, overrides(args))
        if args.workers and cfg["run"]["strategy"] == "multi_worker":
            raise config_lib.ConfigError(
                "run.strategy", "a one-machine strategy with --workers (each KerasTuner worker "
                "trains its own trials; multi_worker trains each trial on all machines, started "
                "with TF_CONFIG)", "multi_worker")
        result = runner.run(cfg, overwrite=args.overwrite, verbose=args.verbose,
                            workers=args.workers)
    except (config_lib.ConfigError, runner.DirectoryError, LockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except runner.WorkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "exit_code" in result:  # --workers: the chief's and workers' code
        return result["exit_code"]
    return 0 if result.get("worker") or result["best"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())

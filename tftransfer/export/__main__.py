"""`python -m tftransfer.export verify DIR [--compare MODEL.keras]` and
`python -m tftransfer.export tflite MODEL OUT [--quantize int8 --data DIR] [--format onnx]`.

Exit codes: 0 the export is ready (published), 1 problems found (not published), 2 usage.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tftransfer.export import _deploy_cli  # noqa: E402
from tftransfer.export.verify import VerifyError, verify_export  # noqa: E402


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m tftransfer.export",
        description="Tools for SavedModels written by export_for_serving.")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser(
        "verify", help="load an export, run its signatures, check its files")
    verify.add_argument("dir", help="version directory, or base directory "
                        "(its highest version is checked)")
    verify.add_argument("--compare", metavar="MODEL.keras",
                        help="Keras model that serving_default must match")
    verify.add_argument("--model-name", help="model name in the curl command")
    _deploy_cli.add_command(commands)
    return parser


def main(argv=None):
    """Command line entry point; returns 0 (good), 1 (problems), 2 (usage)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "tflite":
            return _deploy_cli.run(args)
        for path in (args.dir, args.compare):
            if path is not None and not os.path.exists(path):
                parser.error(f"no such file or directory: {path}")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        problems = verify_export(args.dir, compare=args.compare,
                                 model_name=args.model_name)
    except VerifyError as err:
        problems = [str(err)]
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if not problems:
        print("OK: the export is ready for TF Serving")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

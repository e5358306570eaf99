"""`python -m tftransfer.export tflite MODEL OUT --quantize ... [--data DIR] [--format onnx]`.

Converts MODEL (a `.keras` file or a serving export directory) to a verified
`.tflite` (or, with `--format onnx`, `.onnx`) at OUT, with `labels.txt` and
`<name>.report.json` beside it; prints the report. `--data DIR` (class
subfolders) gives the int8 calibration images (its seeded 80%) and the
verification images (the other 20%).
"""

import json
import sys

QUANTIZATIONS = ("none", "dynamic", "float16", "int8")


def add_command(commands):
    """Adds the `tflite` subcommand to the `python -m tftransfer.export` parser."""
    p = commands.add_parser(
        "tflite", help="convert to a verified .tflite (LiteRT) or .onnx with labels inside")
    p.add_argument("model", help="a .keras file or a serving export directory")
    p.add_argument("out", help="the .tflite (or .onnx) file to write")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                   help="post-training quantization (default none: float32)")
    p.add_argument("--data", metavar="DIR",
                   help="folder of class subfolders: calibration (80%%) and validation (20%%)")
    p.add_argument("--validation", metavar="DIR", help="folder of validation images instead")
    p.add_argument("--io", choices=("float", "int8", "uint8"), default="float",
                   help="input/output tensor type of an int8 model (default float)")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="least top-1 agreement with MODEL to publish (default 0.9)")
    p.add_argument("--format", choices=("tflite", "onnx"), default="tflite")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    return p


def run(args):
    """Runs the `tflite` subcommand; returns 0 (published), 1 (refused) or 2 (usage)."""
    from tftransfer.export import VerificationError, to_onnx, to_tflite

    validation = args.validation or args.data
    try:
        if args.format == "onnx":
            if args.quantize != "none" or args.io != "float":
                raise ValueError("--format onnx converts float32 only; drop --quantize/--io. "
                                 f"Received: --quantize={args.quantize} --io={args.io}")
            report = to_onnx(args.model, args.out, validation_data=validation,
                             min_agreement=args.min_agreement, overwrite=args.overwrite)
        else:
            report = to_tflite(args.model, args.out, quantization=args.quantize,
                               representative_data=args.data, validation_data=validation,
                               io_type=args.io, min_agreement=args.min_agreement,
                               overwrite=args.overwrite)
    except VerificationError as err:
        print(json.dumps(err.report, indent=2))
        print(f"FAIL: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    print(f"OK: published {report['path']}")
    return 0

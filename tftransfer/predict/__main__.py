"""`python -m tftransfer.predict MODEL IMAGE_OR_FOLDER... [--top-k K] [--csv FILE]`.

Prints a table (path, label, score, the other top-k labels); `--csv` also
writes it to a file, which must not exist yet (unless `--overwrite`).
Exit codes: 0 done, 2 bad arguments, model or images.
"""

import argparse
import csv
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m tftransfer.predict",
        description="Predict labels for image files or folders with a tftransfer model.",
        epilog="Exit codes: 0 done, 2 bad arguments, model or images.")
    p.add_argument("model", help="a .keras or .tflite file, or a serving export directory")
    p.add_argument("images", nargs="*",
                   help="image files and/or folders (searched recursively); for a text model, "
                        ".txt files and/or folders of them")
    p.add_argument("--text", action="append", metavar="SENTENCE",
                   help="a sentence for a text model (repeatable)")
    p.add_argument("--top-k", type=int, default=1, help="labels per image (default 1)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--tta", action="store_true",
                   help="average the scores over flips and corner crops (test-time augmentation)")
    p.add_argument("--csv", metavar="FILE", help="also write the results to this CSV file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
    return p


def _rows(results, top_k):
    header = ["path", "label", "score"] + (["top_k"] if top_k > 1 else [])
    rows = []
    for r in results:
        row = [r.get("path") or _short(r.get("text", "")),
               "" if r["label"] is None else r["label"], f"{r['score']:.4f}"]
        if top_k > 1:
            row.append("; ".join(f"{label} {score:.4f}" for label, score in r["top_k"]))
        rows.append(row)
    return header, rows


def _short(text, width=40):
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _text_files(items):
    """Whether the positional items are .txt files (or folders of only .txt files)."""
    return bool(items) and all(str(i).lower().endswith(".txt") for i in items)


def _table(header, rows):
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main(argv=None):
    """Runs the command; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else 2
    if not args.images and not args.text:
        print("error: give images, .txt files or --text SENTENCE", file=sys.stderr)
        return 2
    problem = args.csv and _csv_problem(args.csv, args.overwrite)
    if problem:
        print(f"error: --csv {args.csv!r}: {problem}", file=sys.stderr)
        return 2
    import warnings

    from tftransfer.predict import _text, predict

    try:
        with warnings.catch_warnings():  # the skipped files are reported below
            warnings.simplefilter("ignore")
            inputs = args.images
            if args.text or _text_files(args.images):
                inputs = _text.cli_items(args.text, args.images)
            results = predict(args.model, inputs, top_k=args.top_k,
                              batch_size=args.batch_size, tta=args.tta)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    header, rows = _rows(results, args.top_k)
    print(_table(header, rows))
    if results.skipped:
        print(f"Skipped {len(results.skipped)} file(s) that could not be read as images:",
              *results.skipped, sep="\n  ", file=sys.stderr)
    return _write_csv(args.csv, [header] + rows) if args.csv else 0


def _csv_problem(path, overwrite):
    """Why `path` cannot take the CSV file, or None (checked before predicting)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "is a directory; name a file in it"
    if os.path.exists(path) and not overwrite:
        return "exists; pass --overwrite to replace it"
    if not os.path.isdir(folder):
        return f"its folder {folder!r} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path)
                                                    and not os.access(path, os.W_OK)):
        return "is not writable here"
    return None


def _write_csv(path, rows):
    """Writes `rows` through a temporary file; exit code 0, or 2 (no file left)."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        print(f"error: --csv {path!r}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

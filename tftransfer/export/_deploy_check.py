"""Verification before publishing a converted model, and the atomic publish.

`compare` runs the reference (Keras / SavedModel) and the converted model on
the same images and returns the figures of `report.json`; `enforce` refuses a
model whose top-1 agreement with the reference is below `min_agreement`;
`publish` writes files under temporary names and renames them into place.

Why 0.9 is the default threshold: on the digits task the float, float16,
dynamic-range and int8 conversions agree with the Keras model on 100%, 100%,
98.5% and 97.5% of the images (docs/deploy.md), so 0.9 leaves room for a
harder task's close calls; a broken conversion (an int8 model calibrated on
the wrong pixels predicts one class) agrees on about the share of its one
class (20% on five balanced classes). And since agreement bounds the accuracy
loss (accuracy drop <= 1 - agreement), a published model is never more than 10
points worse than the reference.
"""

import os
import tempfile
import time

import numpy as np

MIN_AGREEMENT = 0.9
REGRESSION_TOLERANCE = 0.05  # share of the reference values' spread


class VerificationError(ValueError):
    """A converted model disagrees with its reference; it was not published.

    Attributes:
        report: The figures measured (the would-be `report.json`).
    """

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


def compare(reference, candidate, x, y, task, *, batch_size=32, latency_images=50):
    """Figures of `candidate` against `reference` on images `x` (labels `y` or None)."""
    want = _scores(reference, x, batch_size)
    got = _scores(candidate, x, batch_size)
    report = {"images": int(len(x)), "labelled": y is not None,
              "top1_agreement": _agreement(want, got, task),
              "max_abs_diff": float(np.max(np.abs(want - got))),
              "distinct_predictions": int(len(np.unique(_decisions(got, task), axis=0)))}
    if y is not None and task == "classification":
        report["reference_accuracy"] = float(np.mean(want.argmax(-1) == y))
        report["accuracy"] = float(np.mean(got.argmax(-1) == y))
        report["accuracy_drop_pts"] = round(
            100 * (report["reference_accuracy"] - report["accuracy"]), 4)
    sample = x[:latency_images]
    report["latency_ms_per_image"] = latency_ms(candidate, sample)
    report["reference_latency_ms_per_image"] = latency_ms(reference, sample)
    return report


def latency_ms(call, images, *, warmup=3):
    """Median milliseconds of `call` on one image (batch 1)."""
    for image in images[:warmup]:
        call(image[None])
    times = []
    for image in images:
        start = time.perf_counter()
        call(image[None])
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 4)


def _scores(call, x, batch_size):
    return np.concatenate([np.asarray(call(x[i:i + batch_size]), np.float32)
                           for i in range(0, len(x), batch_size)])


def _decisions(scores, task):
    if task == "classification":
        return scores.argmax(-1)
    if task == "multi_label":
        return scores >= 0.5
    return np.round(scores, 2)


def _agreement(want, got, task):
    """Share of images where both models decide the same (regression: within 5%
    of the reference values' spread)."""
    if task == "regression":
        tolerance = REGRESSION_TOLERANCE * (float(np.std(want)) or 1.0)
        same = np.all(np.abs(want - got) <= tolerance, axis=-1)
    else:
        same = _decisions(want, task) == _decisions(got, task)
        same = same.reshape(len(same), -1).all(-1)
    return round(float(np.mean(same)), 6)


def enforce(report, min_agreement, what):
    """Raises `VerificationError` when `report['top1_agreement'] < min_agreement`."""
    agreement = report["top1_agreement"]
    report["min_agreement"] = min_agreement
    report["passed"] = agreement >= min_agreement
    if report["passed"]:
        return
    raise VerificationError(
        f"Not published: the {what} agrees with the reference model on "
        f"{100 * agreement:.1f}% of {report['images']} images "
        f"(top1_agreement={agreement:.4f} < min_agreement={min_agreement}); it predicts "
        f"{report['distinct_predictions']} distinct answer(s). With int8, check that the "
        "representative data are training images with raw 0-255 pixels (like the model's "
        "input), or use quantization='dynamic'. Pass `min_agreement` to change the threshold.",
        report)


def check_min_agreement(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError("`min_agreement` must be a number in [0, 1]. "
                         f"Received: min_agreement={value!r}")
    return float(value)


# ------------------------------------------------------------------ publish


def refuse_existing(paths, overwrite):
    """Raises FileExistsError before any work when a target exists (and differs)."""
    if overwrite:
        return
    for path, content in paths.items():
        if os.path.exists(path) and not _same(path, content):
            raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite on "
                                  "the command line) to replace it, or another path.")


def publish(files, overwrite):
    """Writes `{path: bytes}` in order, each to a temporary name then renamed.

    Without `overwrite`, a file that appeared meanwhile is kept (FileExistsError):
    `os.link` never replaces. Files are readable by other users (0644 minus umask).
    """
    refuse_existing(files, overwrite)
    for path, content in files.items():
        if not overwrite and os.path.exists(path) and _same(path, content):
            continue
        tmp = _write_temporary(path, content)
        try:
            if overwrite:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _write_temporary(path, content):
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o644 & ~umask)
    return tmp


def _same(path, content):
    try:
        with open(path, "rb") as f:
            return f.read() == content
    except OSError:
        return False

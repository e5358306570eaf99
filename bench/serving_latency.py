"""Latency of an exported `serving_default` vs calling the Keras model.

Builds a small MobileNetV2 classifier (random weights, 96x96 RGB, 0-255
input with the Rescaling inside), exports it with `export_for_serving`,
reloads it with `tf.saved_model.load` and times batch-1 and batch-32
inference of both, alternating the two in one loop (after a warmup) and
reporting medians.

Reference: `model.predict_on_batch(x)`, which runs a compiled graph on
one batch like the export does: the like-for-like comparison, and the
headline. `model(x, training=False)`, the direct eager call (what Keras
recommends for small batches in a Python loop), is timed too, for
information only: it pays per-op Python overhead that a graph does not, so
a ratio against it flatters the export.

The last line is `serving_latency_ratio: <export/predict_on_batch at batch 1>`
(1.0 = as fast as Keras's own compiled call; lower is faster).

Usage: python bench/serving_latency.py [--repeats 30] [--warmup 5]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from tftransfer.export import export_for_serving  # noqa: E402

SHAPE = (96, 96, 3)
BATCHES = (1, 32)


def build_classifier(num_classes=10):
    """MobileNetV2 (weights=None) + softmax head, taking 0-255 pixels."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    backbone = keras.applications.MobileNetV2(
        weights=None, input_shape=SHAPE, include_top=False, pooling="avg")
    outputs = keras.layers.Dense(num_classes, activation="softmax")(backbone(x))
    return keras.Model(inputs, outputs)


def _timed(fn, x):
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def measure(candidates, x, repeats, warmup):
    """Median seconds of each candidate on `x`, alternating their order."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn(x)
    times = {name: [] for name in candidates}
    names = list(candidates)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(_timed(candidates[name], x))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    model = build_classifier()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_for_serving(model, os.path.join(tmp, "bench"))
        serving = tf.saved_model.load(path).signatures["serving_default"]
        candidates = {
            "export": lambda x: serving(images=x)["probabilities"].numpy(),
            "keras": lambda x: model(x, training=False).numpy(),
            "predict_on_batch": model.predict_on_batch,
        }
        rng = np.random.default_rng(0)
        rows = {}
        for batch in BATCHES:
            x = tf.constant(rng.uniform(0, 255, (batch, *SHAPE)), tf.float32)
            rows[batch] = measure(candidates, x, args.repeats, args.warmup)
    print(f"{'batch':>5} {'export ms':>10} {'keras ms':>9} "
          f"{'predict_on_batch ms':>20} {'export/keras':>13} "
          f"{'export/predict_on_batch':>24}")
    for batch, t in rows.items():
        print(f"{batch:>5} {t['export'] * 1e3:>10.2f} {t['keras'] * 1e3:>9.2f} "
              f"{t['predict_on_batch'] * 1e3:>20.2f} "
              f"{t['export'] / t['keras']:>13.3f} "
              f"{t['export'] / t['predict_on_batch']:>24.3f}")
    print(f"serving_latency_ratio: {rows[1]['export'] / rows[1]['predict_on_batch']:.3f}")


if __name__ == "__main__":
    main()

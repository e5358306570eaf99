"""Benchmark: images/s delivered by ``tftransfer.data.from_directory`` vs
images/s a MobileNetV2 classifier consumes in ``train_on_batch``.

Writes ~1,000 128x128 RGB PNGs (sklearn digits upsampled, tinted, with noise so
they do not compress unrealistically well) to a temp folder, then measures in
one run:

* the listing + decode-validation pass ``from_directory`` does up front,
* full uncached passes after warm-up (the honest number: every epoch without
  a cache, and the first epoch with one),
* the first (cache-filling) and later passes with ``cache=True``,
* an uncached pass with ``augment="default"``,
* ``train_on_batch`` throughput of ``MobileNetV2(weights=None)`` on a fixed
  batch of the same size.

Usage:
    python bench/input_pipeline.py [--images 1000] [--size 128] [--batch-size 32]

The last line is ``input_pipeline_ratio: <uncached delivered / consumed>``.
"""

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from tftransfer import data as tfd  # noqa: E402


def write_pngs(root, n, size, seed=0):
    """Writes ``n`` size x size RGB PNGs into ``root/digit_<k>/``."""
    rng = np.random.default_rng(seed)
    digits = load_digits()
    for i in range(n):
        k = i % len(digits.images)
        gray = Image.fromarray((digits.images[k] * 255 / 16).astype(np.uint8))
        gray = np.asarray(gray.resize((size, size), Image.BILINEAR), np.float32)
        tint = rng.uniform(0.5, 1.0, 3)
        rgb = gray[..., None] * tint + rng.normal(0, 12, (size, size, 3))
        folder = os.path.join(root, f"digit_{digits.target[k]}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(
            os.path.join(folder, f"{i:05d}.png"))


def timed_passes(dataset, passes=3, warmup_batches=2):
    """Median images/s over full passes, after ``warmup_batches`` batches of a
    partial pass (tracing, thread pools, autotuning). Cores are shared, so the
    median of a few passes is steadier than one."""
    for _ in dataset.take(warmup_batches):
        pass
    rates = []
    for _ in range(passes):
        start, count = time.perf_counter(), 0
        for images, _ in dataset:
            count += int(images.shape[0])
        rates.append(count / (time.perf_counter() - start))
    return float(np.median(rates)), count * passes


def build_classifier(size, num_classes):
    """MobileNetV2 (random init) with preprocessing as a layer, as the
    toolkit's finetuner builds it: raw 0-255 pixels in."""
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    backbone = keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=(size, size, 3), pooling="avg")
    outputs = keras.layers.Dense(num_classes, activation="softmax")(backbone(x))
    model = keras.Model(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


def consumed_per_second(model, batch, steps, warmup=3):
    images, labels = batch
    for _ in range(warmup):
        model.train_on_batch(images, labels)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(images, labels)
    return steps * int(images.shape[0]) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="timed train steps")
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="tftransfer_bench_")
    try:
        start = time.perf_counter()
        write_pngs(root, args.images, args.size)
        print(f"wrote {args.images} PNGs {args.size}x{args.size} to {root} "
              f"in {time.perf_counter() - start:.1f}s; tf {tf.__version__}, "
              f"keras {keras.__version__}, {os.cpu_count()} CPU(s)")
        model = build_classifier(args.size, 10)
        common = dict(model=model, batch_size=args.batch_size, validation_split=0)

        start = time.perf_counter()
        uncached = tfd.from_directory(root, cache=False, **common)
        listing = args.images / (time.perf_counter() - start)
        rows = [("listing + validation decode pass (once)", listing, args.images)]
        rows.append(("uncached pass (every epoch, cache=False)", *timed_passes(uncached.train)))
        cached = tfd.from_directory(root, cache=True, **common)
        # no warm-up here: the post-cache shuffle buffer would fill the cache
        rows.append(("cached, first pass (fills the cache)", *timed_passes(cached.train, 1, 0)))
        rows.append(("cached, later passes (cache=True)", *timed_passes(cached.train, 3, 0)))
        augmented = tfd.from_directory(root, cache=False, augment="default", **common)
        rows.append(("uncached + augment='default'", *timed_passes(augmented.train, 2)))

        batch = next(iter(uncached.train))
        consumed = consumed_per_second(model, batch, args.steps)
        rows.append(("MobileNetV2 train_on_batch (consumed)", consumed,
                     args.steps * args.batch_size))

        print(f"\n{'stage':<44}{'images/s':>10}{'images':>8}{'x consumed':>12}")
        for name, rate, count in rows:
            print(f"{name:<44}{rate:>10.0f}{count:>8}{rate / consumed:>12.1f}")
        print(f"\ninput_pipeline_ratio_cached: {rows[3][1] / consumed:.1f}")
        print(f"input_pipeline_ratio: {rows[1][1] / consumed:.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

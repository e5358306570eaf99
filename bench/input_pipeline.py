"""Benchmark: training images/s fed by ``tftransfer.data.from_directory`` vs
fed from memory, the decoding and the training sharing the same cores.

Writes ~1,000 128x128 RGB PNGs (sklearn digits upsampled, tinted, with noise so
they do not compress unrealistically well) to a temp folder, then times
``model.fit`` of a ``MobileNetV2(weights=None)`` classifier end to end, per
epoch within one ``fit`` call, after a warm-up epoch:

* fed by ``from_directory(cache=False)``: every image decoded while the model
  trains (every epoch without a cache, and the first epoch with one),
* fed by ``from_directory(cache=True)`` after the cache has filled,
* fed by one in-memory batch repeated (no input work at all): the ceiling.

For information it also times the data alone (passes without training) and
the listing + decode-validation pass ``from_directory`` does up front. Those
rates are not comparable with training: measured alone, decoding gets both
cores, which it shares with training in a real run.

Usage:
    python bench/input_pipeline.py [--images 1000] [--size 128] [--batch-size 32]

The last line is ``input_pipeline_ratio: <uncached fit images/s / in-memory fit
images/s>`` (1.0: reading and decoding cost training nothing).
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


class _EpochTimes(keras.callbacks.Callback):
    """Wall seconds of each epoch of one ``fit`` call."""

    def __init__(self):
        super().__init__()
        self.seconds, self._start = [], None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def fit_per_second(model, dataset, images, epochs=2):
    """Median images/s of the epochs of one ``model.fit`` after a warm-up epoch.

    ``images`` is the number of images in one pass. The first epoch (tracing,
    thread pools, shuffle buffers) is run but not counted.
    """
    timer = _EpochTimes()
    model.fit(dataset, epochs=epochs + 1, verbose=0, callbacks=[timer])
    rates = [images / seconds for seconds in timer.seconds[1:]]
    return float(np.median(rates)), images * epochs


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
        cached = tfd.from_directory(root, cache=True, **common)
        timed_passes(cached.train, 1, 0)  # fills the cache
        batch = next(iter(uncached.train))
        steps = -(-args.images // args.batch_size)
        in_memory = tf.data.Dataset.from_tensors(batch).repeat(steps)

        fits = [("fit, fed from disk (cache=False)", uncached.train, args.images),
                ("fit, fed from the filled cache (cache=True)", cached.train, args.images),
                ("fit, fed one in-memory batch (ceiling)", in_memory,
                 steps * int(batch[0].shape[0]))]
        rows = [(name, *fit_per_second(model, data, count)) for name, data, count in fits]
        ceiling = rows[2][1]
        print(f"\n{'end to end (decode + train on the same cores)':<48}{'images/s':>10}"
              f"{'images':>8}{'x ceiling':>11}")
        for name, rate, count in rows:
            print(f"{name:<48}{rate:>10.0f}{count:>8}{rate / ceiling:>11.2f}")

        alone = [("listing + validation decode pass (once)", listing, args.images),
                 ("uncached pass", *timed_passes(uncached.train)),
                 ("cached pass", *timed_passes(cached.train, 3, 0))]
        print(f"\n{'data alone (for information: all cores, no training)':<56}{'images/s':>10}")
        for name, rate, _ in alone:
            print(f"{name:<56}{rate:>10.0f}")
        print(f"\ninput_pipeline_ratio_cached: {rows[1][1] / ceiling:.2f}")
        print(f"input_pipeline_ratio: {rows[0][1] / ceiling:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

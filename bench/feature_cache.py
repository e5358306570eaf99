"""Speed-up of the frozen-feature cache in stage 1 of `fine_tune`.

Ten head epochs on a frozen MobileNetV2 (weights=None, 128 px, 512 images),
cached (the one feature pass included) vs recomputing the backbone every
epoch, timed alternately in one run. The last line prints
`feature_cache_speedup: <uncached/cached>` (limit on 2 cores is about 8x: one
feature pass plus ten cheap head epochs; target at least 7x).

    python bench/feature_cache.py [--images 512] [--epochs 10] [--rounds 2]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tftransfer import build_finetuner, fine_tune  # noqa: E402

SIZE = 128


def run(cache, x, y, epochs):
    keras.utils.set_random_seed(0)
    model = build_finetuner("mobilenet_v2", 10, weights=None, input_shape=(SIZE, SIZE, 3))
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    start = time.perf_counter()
    fine_tune(model, data, head_epochs=epochs, fine_tune_epochs=0, cache_features=cache,
              early_stopping=None, verbose=0)
    seconds = time.perf_counter() - start
    keras.backend.clear_session()
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.images, SIZE, SIZE, 3)).astype("float32")
    y = rng.integers(0, 10, args.images)
    run(True, x[:64], y[:64], 1)  # warm up TensorFlow and the loaders
    times = {"uncached": [], "cached": []}
    for i in range(args.rounds):
        for name in (("uncached", "cached") if i % 2 == 0 else ("cached", "uncached")):
            times[name].append(run(name == "cached", x, y, args.epochs))
            print(f"round {i + 1} {name:<9} {times[name][-1]:7.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{'stage 1':<10}{'median s':>10}{'s/epoch':>10}")
    for name, seconds in med.items():
        print(f"{name:<10}{seconds:>10.2f}{seconds / args.epochs:>10.2f}")
    print(f"feature_cache_speedup: {med['uncached'] / med['cached']:.2f}")


if __name__ == "__main__":
    main()

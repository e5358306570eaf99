"""Overhead of `build_finetuner` over hand-written Keras for one fine-tune step.

The same MobileNetV2 (weights=None, 128 px, all layers but BatchNormalization
trainable, BN in inference mode) is built twice: by `build_finetuner` and by
hand following the Keras transfer-learning guide. Their `train_on_batch` steps
are timed alternately in one run (so machine noise hits both alike); the last
line prints `overhead_ratio: <ours/hand>` (target: at most 1.03).

    python bench/overhead.py [--rounds 15] [--steps 3] [--batch 32]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tftransfer import build_finetuner  # noqa: E402

SIZE, CLASSES = 128, 10


def hand_written():
    """The Keras guide's recipe, written out by hand."""
    base = keras.applications.MobileNetV2(include_top=False, weights=None,
                                          input_shape=(SIZE, SIZE, 3))
    for layer in base.layers:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = base(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def ours():
    return build_finetuner("mobilenet_v2", CLASSES, weights=None, input_shape=(SIZE, SIZE, 3),
                           trainable="all", learning_rate=1e-3)


def time_steps(model, x, y, steps):
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return (time.perf_counter() - start) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.batch, SIZE, SIZE, 3)).astype("float32")
    y = rng.integers(0, CLASSES, args.batch)
    models = {"hand": hand_written(), "ours": ours()}
    counts = {k: len(m.trainable_weights) for k, m in models.items()}
    assert counts["hand"] == counts["ours"], counts
    for model in models.values():  # compile the train function, warm caches
        time_steps(model, x, y, 2)
    times = {name: [] for name in models}
    for i in range(args.rounds):
        order = list(models) if i % 2 == 0 else list(reversed(models))
        for name in order:
            times[name].append(time_steps(models[name], x, y, args.steps))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{'model':<8}{'median s/step':>15}{'min s/step':>13}   trainable weights")
    for name in models:
        print(f"{name:<8}{med[name]:>15.4f}{min(times[name]):>13.4f}   {counts[name]}")
    ratios = [o / h for o, h in zip(times["ours"], times["hand"])]
    print(f"per-round ratio: median {statistics.median(ratios):.3f}, "
          f"min {min(ratios):.3f}, max {max(ratios):.3f}")
    print(f"overhead_ratio: {med['ours'] / med['hand']:.3f}")


if __name__ == "__main__":
    main()

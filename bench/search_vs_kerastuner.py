"""The quickstart search: `python -m tftransfer.search` vs hand-written KerasTuner.

The hand-written side is what a user writes from the KerasTuner guide
("Getting started", a `kt.HyperModel` with its own `fit`) and the Keras
transfer-learning guide (frozen base called with `training=False`, train the
head, unfreeze, recompile at a lower rate, train on): the same data as
`tuner_configs/quickstart.yaml` (digits 5-9 through `tftransfer.datasets`,
the same validation split and 50 training images per class), the same search
space, 8 + 4 epochs, batch 32, `RandomSearch` with the same seed and trial
count, the best epoch's `val_accuracy` as the score, all in one process.

Each side runs as a whole process (Python start, imports, data, search,
and for tftransfer its report and serving export), alternately, `--rounds`
times. Prints both wall times and best scores per round, the medians, and
as the last line `search_vs_kerastuner_ratio: <tftransfer wall / hand-written
wall>`, the median over rounds of each round's ratio (a round's two runs are
back to back, so they share the machine's load; target at most 0.8 with
tftransfer's best score at least the hand-written best - 0.02).

    python bench/search_vs_kerastuner.py [--rounds 2] [--keep DIR]
"""

import argparse
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tuner_configs" / "quickstart.yaml"
_OURS_BEST = re.compile(r"^Best trial \S+ \(([0-9.]+)\)", re.M)
_THEIRS_BEST = re.compile(r"^best val_accuracy: ([0-9.]+)", re.M)


# ------------------------------------------------------------- hand-written


def hand_written(directory):
    """The hand-written search (run in its own process by `main`)."""
    import keras
    import keras_tuner as kt
    import numpy as np

    from tftransfer.datasets import few_shot_split, load_digits_images

    x, y = load_digits_images(classes=(5, 6, 7, 8, 9), image_size=32, channels=3)
    order = np.random.default_rng(0).permutation(len(y))  # quickstart's split, seed 0
    n_val = int(round(len(y) * 0.2))
    x_train, y_train, _, _ = few_shot_split(x[order[n_val:]], y[order[n_val:]], 50, seed=0)
    x_val, y_val = x[order[:n_val]], y[order[:n_val]]
    backbone_path = str(ROOT / "saved_models" / "digits_cnn.keras")

    class FineTune(kt.HyperModel):
        def build(self, hp):
            trainable = hp.Choice("trainable", ["none", "top:1", "top:2", "all"])
            lr = hp.Float("learning_rate", 0.001, 0.03, sampling="log")
            kind = hp.Choice("regularizer_kind", ["none", "l2"])
            strength = hp.Float("regularizer_strength", 1e-5, 1e-3, sampling="log")
            dropout = hp.Float("dropout", 0.0, 0.5, step=0.1)
            hidden = hp.Choice("hidden_units", ["none", "64"])
            hp.Choice("label_smoothing", [0.0, 0.1])
            base = keras.models.load_model(backbone_path)
            base.trainable = False
            inputs = keras.Input((32, 32, 3))
            h = base(inputs, training=False)  # BatchNorm stays in inference mode
            h = keras.layers.Dropout(dropout)(h)
            reg = keras.regularizers.L2(strength) if kind == "l2" else None
            if hidden == "64":
                h = keras.layers.Dense(64, activation="relu", kernel_regularizer=reg)(h)
            outputs = keras.layers.Dense(5, activation="softmax", kernel_regularizer=reg)(h)
            model = keras.Model(inputs, outputs)
            model.base, model.unfreeze, model.lr = base, trainable, lr
            return model

        def fit(self, hp, model, *args, callbacks=None, **kwargs):
            loss = keras.losses.CategoricalCrossentropy(
                label_smoothing=hp.get("label_smoothing"))
            train, val = (x_train, np.eye(5)[y_train]), (x_val, np.eye(5)[y_val])
            model.compile(keras.optimizers.Adam(model.lr), loss, metrics=["accuracy"])
            first = model.fit(*train, validation_data=val, epochs=8, batch_size=32,
                              callbacks=callbacks, verbose=0)
            _unfreeze(model.base, model.unfreeze)
            model.compile(keras.optimizers.Adam(model.lr * 0.1), loss, metrics=["accuracy"])
            second = model.fit(*train, validation_data=val, epochs=12, initial_epoch=8,
                               batch_size=32, callbacks=callbacks, verbose=0)
            return max(first.history["val_accuracy"] + second.history["val_accuracy"])

    def _unfreeze(base, policy):
        if policy == "none":
            return
        base.trainable = True
        weighted = [layer for layer in base.layers
                    if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)]
        keep = weighted if policy == "all" else weighted[-int(policy.split(":")[1]):]
        for layer in base.layers:
            layer.trainable = layer in keep

    tuner = kt.RandomSearch(FineTune(), objective="val_accuracy", max_trials=6, seed=10007,
                            directory=directory, project_name="hand_written", overwrite=True)
    tuner.search()
    best = tuner.oracle.get_best_trials(1)[0]
    print(f"best val_accuracy: {best.score:.4f}")


# -------------------------------------------------------------------- bench


def _timed(command, env, pattern):
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds, float(pattern.findall(proc.stdout)[-1])


def main(argv=None):
    """Times both searches alternately; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--keep", help="Folder for both searches (default: a temporary one).")
    p.add_argument("--hand-written", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hand_written:
        hand_written(args.hand_written)
        return 0
    work = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="search_vs_kt-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    sides = {
        "tftransfer": ([sys.executable, "-m", "tftransfer.search", "--config", str(CONFIG),
                        "--overwrite", "--directory", str(work / "tftransfer")], _OURS_BEST),
        "hand-written": ([sys.executable, __file__, "--hand-written", str(work / "kt")],
                         _THEIRS_BEST),
    }
    results = {name: [] for name in sides}
    try:
        for r in range(args.rounds):
            names = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for name in names:
                seconds, best = _timed(sides[name][0], env, sides[name][1])
                results[name].append((seconds, best))
                print(f"round {r + 1}  {name:<12} {seconds:6.1f} s  best {best:.4f}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    wall = {n: statistics.median(s for s, _ in v) for n, v in results.items()}
    best = {n: max(b for _, b in v) for n, v in results.items()}
    for name in sides:
        print(f"{name:<12} median wall {wall[name]:6.1f} s  best val_accuracy {best[name]:.4f}")
    # Each round's pair runs back to back, so its ratio sees the same machine load.
    ratios = [ours[0] / theirs[0] for ours, theirs in zip(results["tftransfer"],
                                                         results["hand-written"])]
    print("per-round ratios: " + ", ".join(f"{r:.3f}" for r in ratios))
    print(f"search_vs_kerastuner_ratio: {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

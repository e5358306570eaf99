"""Does stage 2 (the unfrozen backbone) gain, and without collapsing?

For each task, backbone format and seed, `fine_tune` runs twice from the same
seed: with today's stage-2 settings (those before issue 25: `lr_factor=0.1`,
one rate for every layer, no warmup, no weight average, a hub SavedModel
called in training mode) and with the new defaults. "stage 1 only"
is the model the new-default run holds when its stage 1 ends (what
`fine_tune_epochs=0` gives). The settings are the quickstart's
(`examples/quickstart.py`): Adam at 1e-2 for the head, dropout 0.2,
`head_epochs=20`, `fine_tune_epochs=10`, `unfreeze="all"`, batch size 10,
early stopping and `keep_best_stage` as `fine_tune`'s defaults.

Tasks (the backbones in `saved_models/` were pretrained on digits 0-4):

* `digits`: the quickstart task, digits 5-9 with 10 labelled images per class
  (validation 30 per class, test the other ~600).
* `inverted`: the same digits in negative (255 - x: white background, dark
  strokes). Nothing like it was seen in pretraining, so the first
  convolution and the frozen BatchNorm statistics meet inputs of the wrong
  sign: the frozen features are poor and the backbone has to adapt, which
  is what stage 2 is for, and where a collapse costs most. 20 labels per
  class and 50 validation images per class: with 10 and 30, stage 1's own
  validation accuracy swings by up to 19 points between its last epochs
  (0.70, 0.56, 0.59, 0.75 at seed 3) while its validation loss falls
  smoothly, so a drop "below stage 1's end" would measure that noise.

Per row: mean test accuracy ± standard deviation over seeds, its gain over
stage 1 only (points), and the deepest drop of stage-2 validation accuracy
below the validation accuracy stage 2 starts from (max over seeds, points).
The last line is `stage2_gain: X`, the new defaults minus stage 1 only in
mean test accuracy points, the smallest over the tasks.

    python bench/two_stage.py                  # ~60 runs: every format on digits, keras on inverted
    python bench/two_stage.py --seeds 2 --formats keras --tasks digits   # a smoke run
"""

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402

from tftransfer import build_finetuner, fine_tune  # noqa: E402
from tftransfer.datasets import few_shot_split, load_digits_images  # noqa: E402

# name: (path under saved_models/, build_finetuner arguments, has a training switch)
FORMATS = {
    "keras": ("digits_cnn.keras", {}, False),
    "h5": ("digits_cnn.h5", {}, False),
    "tfkeras": ("digits_cnn_tfkeras", {}, False),
    "tfkeras.h5": ("digits_cnn_tfkeras.h5", {}, False),
    "tf20": ("digits_cnn_tf20", {}, False),
    "hub": ("digits_cnn_hub", {}, True),
    "export": ("digits_cnn_export", {}, False),
    "tf1": ("digits_cnn_tf1", {"signature": "image_feature_vector",
                               "output_key": "feature_vector"}, False),
}
# The two ways a backbone trains: Keras layers (.keras; .h5, tf.keras SavedModels and
# HDF5 are rebuilt as the same Keras 3 graph) and a HubLayer on a SavedModel (hub; export
# and tf1 have no training switch). All eight unfreeze (a format that does not load or has
# nothing to train is skipped with the reason printed). By default digits runs every format
# and inverted the Keras one; today's settings run on the two kinds (keras, hub) only.
DEFAULT_FORMATS = tuple(FORMATS)
TASKS = {"digits": tuple(FORMATS), "inverted": ("keras",)}
TODAY_FORMATS = ("keras", "hub")
BUILD = dict(num_classes=5, dropout=0.2, learning_rate=1e-2)
FIT = dict(head_epochs=20, fine_tune_epochs=10, unfreeze="all", batch_size=10, verbose=0)


def today(has_training_switch):
    """`fine_tune`'s stage-2 settings before issue 25."""
    return dict(lr_factor=0.1, fine_tune_warmup=0.0, layerwise_lr_decay=None,
                fine_tune_ema=None, freeze_batchnorm=not has_training_switch)


def task_data(task, seed, per_class):
    """`(train, validation, test)` arrays of a task for one seed's split."""
    x, y = load_digits_images(classes=(5, 6, 7, 8, 9))
    per_val = 30
    if task == "inverted":
        x, per_class, per_val = 255.0 - x, 2 * per_class, 50
    x_train, y_train, x_rest, y_rest = few_shot_split(x, y, per_class=per_class, seed=seed)
    x_val, y_val, x_test, y_test = few_shot_split(x_rest, y_rest, per_class=per_val,
                                                  seed=seed + 1000)
    return (x_train, y_train), (x_val, y_val), (x_test, y_test)


class _Stage1End(keras.callbacks.Callback):
    """Evaluates the whole model when stage 1's `fit` ends (stage 1's end)."""

    def __init__(self, finetuner, validation, test):
        super().__init__()
        self.finetuner, self.validation, self.test = finetuner, validation, test
        self.result = None

    def on_train_end(self, logs=None):
        if self.result is None:
            self.result = (_accuracy(self.finetuner, self.validation),
                           _accuracy(self.finetuner, self.test))


def _accuracy(model, data):
    return float(model.evaluate(*data, verbose=0, batch_size=512, return_dict=True)["accuracy"])


def run(fmt, data, seed, settings):
    """One `fine_tune`; returns stage-1 end (val, test), the stage-2 val curve, test, time."""
    path, build, _ = FORMATS[fmt]
    train, validation, test = data
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    model = build_finetuner(str(ROOT / "saved_models" / path), **BUILD, **build)
    probe = _Stage1End(model, validation, test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = fine_tune(model, train, validation, callbacks=[probe], **FIT, **settings)
    first, end = history.stages["fine_tune"]
    curve = history.history["val_accuracy"][first - history.epoch[0]:end - history.epoch[0]]
    return probe.result, curve, _accuracy(model, test), time.perf_counter() - start


def unfreezable(fmt):
    """None when the format loads and has backbone weights to train, else why not."""
    path, build, _ = FORMATS[fmt]
    try:
        model = build_finetuner(str(ROOT / "saved_models" / path), **BUILD, **build)
    except Exception as error:  # noqa: BLE001 (any failure excludes the format)
        return f"does not load: {type(error).__name__}: {str(error)[:200]}"
    model.freeze("all")
    return None if model.backbone.trainable_weights else "no trainable backbone weights"


def bench(tasks, formats, seeds, per_class, today_formats=TODAY_FORMATS):
    """Rows `{task, format, config: [(test, drop, seconds) per seed]}`."""
    results = {}
    excluded = {}
    for task in tasks:
        for fmt in [f for f in formats if f in TASKS.get(task, formats) or task not in TASKS]:
            if fmt not in excluded:
                excluded[fmt] = unfreezable(fmt)
            if excluded[fmt]:
                print(f"# {fmt} excluded: {excluded[fmt]}", flush=True)
                continue
            configs = (("today", today(FORMATS[fmt][2])),) if fmt in today_formats else ()
            for seed in seeds:
                data = task_data(task, seed, per_class)
                for config, settings in configs + (("new", {}),):
                    (val1, test1), curve, test, seconds = run(fmt, data, seed, settings)
                    drop = 100 * (val1 - min(curve)) if curve else 0.0
                    key = (task, fmt)
                    results.setdefault(key, {}).setdefault(config, []).append(
                        (test, drop, seconds))
                    if config == "new":
                        results[key].setdefault("stage 1 only", []).append((test1, 0.0, 0.0))
                    print(f"# {task:8s} {fmt:10s} seed {seed} {config:5s} stage-1 end val "
                          f"{val1:.3f} test {test1:.3f} | stage-2 val min {min(curve or [0]):.3f}"
                          f" end {(curve or [0])[-1]:.3f} | test {test:.3f} ({seconds:.0f} s)",
                          flush=True)
    return results


def table(results):
    """The Markdown table and `{task: [gain per format]}` of the new defaults."""
    lines = ["| task | backbone | stage 2 | test accuracy | gain (points) | deepest drop "
             "(points) |", "| --- | --- | --- | --- | --- | --- |"]
    gains = {}
    for (task, fmt), configs in results.items():
        base = statistics.mean(t for t, _, _ in configs["stage 1 only"])
        for config in [c for c in ("stage 1 only", "today", "new") if c in configs]:
            tests = [t for t, _, _ in configs[config]]
            mean = statistics.mean(tests)
            spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
            drop = max(d for _, d, _ in configs[config])
            gain = 100 * (mean - base)
            lines.append(f"| {task} | {fmt} | {config} | {mean:.3f} ± {spread:.3f} | "
                         f"{gain:+.1f} | {'-' if config == 'stage 1 only' else f'{drop:.1f}'} |")
            if config == "new":
                gains.setdefault(task, []).append((gain, drop))
    return "\n".join(lines), gains


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                        help=f"comma-separated, from {', '.join(FORMATS)}, or 'all'")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--today", default=",".join(TODAY_FORMATS),
                        help="formats that also run today's settings, or 'all'")
    args = parser.parse_args(argv)
    formats = list(FORMATS) if args.formats in ("all", ",".join(DEFAULT_FORMATS)) \
        else args.formats.split(",")
    tasks = args.tasks.split(",")
    if formats != list(DEFAULT_FORMATS):
        TASKS.clear()  # the formats asked for, on every task
    today_formats = list(FORMATS) if args.today == "all" else args.today.split(",")
    os.environ.setdefault("TFTRANSFER_CACHE_DIR", tempfile.mkdtemp())
    start = time.perf_counter()
    results = bench(tasks, formats, list(range(args.seeds)), args.per_class, today_formats)
    text, gains = table(results)
    print(text)
    for task, rows in gains.items():
        print(f"{task}: new defaults gain {statistics.mean(g for g, _ in rows):+.1f} points "
              f"over stage 1 only, deepest stage-2 drop {max(d for _, d in rows):.1f} points")
    print(f"seeds: {args.seeds}; time: {time.perf_counter() - start:.0f} s")
    print(f"max_drop: {max(d for rows in gains.values() for _, d in rows):.1f}")
    print(f"stage2_gain: {min(statistics.mean(g for g, _ in rows) for rows in gains.values()):.1f}")


if __name__ == "__main__":
    main()

"""GAN transfer on digits: scratch vs full fine-tuning vs FreezeD, and generative augmentation.

Source: the class-conditional GAN in `saved_models/` pretrained on digits 0-4
(`python saved_models/build_gan.py`). Target: digits 5-9 from 60 images per
class (300). Three runs at the same step budget and settings:

* scratch:  new generator, discriminator on a randomly initialised digits_cnn;
* finetune: pretrained generator and discriminator, all convolutions train;
* freezed:  the same, discriminator backbone frozen below its top conv
  (`trainable="top:2"`: conv3 and bn3 train, FreezeD).

Quality is an FID analogue: the Fréchet distance between digits_cnn features
of 500 EMA-generator samples (100 per class) and the ~600 held-out real
images of digits 5-9. Then generative augmentation: with 10 labels per class,
a FreezeD GAN is fine-tuned on those 50 images only, and a digits_cnn
classifier is trained with and without its samples.

    python examples/gan_finetune.py [--steps 600] [--seeds 0,1] [--per-class 60]
                                    [--no-augmentation] [--no-write]

Writes the results table into docs/gan.md (the block for `--per-class`) and a
sample grid to docs/gan_samples.png (docs/gan_samples_<N>.png for other N).
"""

import argparse
import os
import pathlib
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tftransfer import build_finetuner, fine_tune, load_backbone  # noqa: E402
from tftransfer.datasets import few_shot_split, load_digits_images  # noqa: E402
from tftransfer.fid import fid_from_images  # noqa: E402
from tftransfer.gan import (  # noqa: E402
    GAN,
    augment_with_generator,
    build_generator,
    discriminator_from_backbone,
    load_discriminator,
    sample,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAVED = ROOT / "saved_models"
DIGITS_CNN = str(SAVED / "digits_cnn.keras")
TARGET = (5, 6, 7, 8, 9)
BATCH_SIZE = 32
LOSS, R1_GAMMA = "non_saturating", 1.0  # As the source GAN (saved_models/build_gan.py).
EVAL_EVERY = 100


def labels(per_class, num_classes=5):
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def make_gan(method):
    """The generator and discriminator a method starts from."""
    if method == "scratch":
        generator = build_generator((32, 32, 3), 64, num_classes=5, width=64)
        random_cnn = keras.models.clone_model(load_backbone(DIGITS_CNN))  # Fresh initial weights.
        discriminator = discriminator_from_backbone(random_cnn, trainable="all", num_classes=5)
    else:
        generator = keras.saving.load_model(SAVED / "digits_gan_generator.keras")
        discriminator = load_discriminator(str(SAVED / "digits_gan_discriminator.keras"),
                                           trainable="top:2" if method == "freezed" else "all")
    return GAN(generator, discriminator, seed=0)


class FIDCallback(keras.callbacks.Callback):
    """Records the FID analogue of the EMA generator every epoch."""

    def __init__(self, real, feature_model):
        super().__init__()
        self.real, self.feature_model, self.scores = real, feature_model, []

    def on_epoch_end(self, epoch, logs=None):
        fake = self.model.generate(labels=labels(100), seed=1)
        self.scores.append(fid_from_images(fake, self.real, self.feature_model))


def train(method, x, y, real, feature_model, steps, seed):
    """Fine-tunes (or trains) one GAN; returns `(gan, fid_curve, seconds)`."""
    keras.utils.set_random_seed(seed)
    gan = make_gan(method)
    gan.compile(loss=LOSS, r1_gamma=R1_GAMMA)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed).repeat()
    ds = ds.batch(BATCH_SIZE, drop_remainder=True)
    fid = FIDCallback(real, feature_model)
    start = time.time()
    gan.fit(ds, epochs=steps // EVAL_EVERY, steps_per_epoch=EVAL_EVERY, callbacks=[fid], verbose=0)
    return gan, fid.scores, time.time() - start


def trainable_count(gan):
    return int(sum(np.prod(w.shape) for w in gan.discriminator.trainable_weights))


def train_judge(x, y):
    """A digits 5-9 classifier (digits_cnn, fine-tuned) that checks generated labels."""
    keras.utils.set_random_seed(0)
    judge = build_finetuner(DIGITS_CNN, num_classes=5, learning_rate=1e-2)
    fine_tune(judge, (x, y), head_epochs=20, fine_tune_epochs=5, early_stopping=None, verbose=0)
    return judge


def label_accuracy(judge, images, y):
    """Share of `images` the judge classifies as their label `y`."""
    return float(np.mean(judge.predict(images, verbose=0).argmax(axis=-1) == y))


def compare(x_train, y_train, x_eval, feature_model, steps, seeds, judge):
    """Runs the three methods; returns table rows and the GANs of the first seed."""
    rows, gans = [], {}
    for method in ("scratch", "finetune", "freezed"):
        curves, accs, seconds = [], [], 0.0
        for seed in seeds:
            gan, curve, took = train(method, x_train, y_train, x_eval, feature_model, steps, seed)
            curves.append(curve)
            accs.append(label_accuracy(judge, gan.generate(labels=labels(100), seed=1), labels(100)))
            seconds += took
            gans.setdefault(method, gan)
            print(f"{method:9s} seed {seed}: FID every {EVAL_EVERY} steps "
                  + " ".join(f"{v:.2f}" for v in curve) + f"; label accuracy {accs[-1]:.3f}",
                  flush=True)
        curves = np.array(curves)
        rows.append((method, trainable_count(gans[method]), curves[:, len(curves[0]) // 2 - 1],
                     curves[:, -1], curves.min(axis=1), accs, seconds / len(seeds)))
    return rows, gans


def augmentation(x, y, x_eval, y_eval, feature_model, steps, seeds):
    """Classifier accuracy with 10 labels/class, with and without generated samples."""
    x_few, y_few, _, _ = few_shot_split(x, y, per_class=10, seed=0)
    gan, curve, _ = train("freezed", x_few, y_few, x_eval, feature_model, steps, 0)
    x_aug, y_aug = augment_with_generator(gan.ema_generator, x_few, y_few, per_class=50, seed=2)
    x_val, y_val, x_test, y_test = few_shot_split(x_eval, y_eval, per_class=30, seed=1)
    results = {}
    for name, data in (("10 real/class", (x_few, y_few)),
                       ("10 real + 50 generated/class", (x_aug, y_aug))):
        accs = []
        for seed in seeds:
            keras.utils.set_random_seed(seed)
            model = build_finetuner(DIGITS_CNN, num_classes=5, dropout=0.2, learning_rate=1e-2)
            fine_tune(model, data, (x_val, y_val), head_epochs=20, fine_tune_epochs=10,
                      unfreeze="all", batch_size=10, verbose=0)
            accs.append(model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"])
        results[name] = accs
        print(f"{name}: test accuracy {np.mean(accs):.3f} ({', '.join(f'{a:.3f}' for a in accs)})")
    return results, curve[-1], len(y_test)


def save_grid(rows, path):
    """Saves rows of (title, images in 0-255) as one PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size, pad = rows[0][1].shape[1], 2
    tiles = [np.concatenate([np.pad(im[:, :, 0], pad, constant_values=255) for im in images], 1)
             for _, images in rows]
    fig, ax = plt.subplots(figsize=(7, 0.55 * len(rows) + 0.2))
    ax.imshow(np.concatenate(tiles, 0), cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([(size + 2 * pad) * (r + 0.5) for r in range(len(rows))],
                  [title for title, _ in rows], fontsize=8)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def _spread(values):
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def results_markdown(rows, refs, steps, seeds, augment, per_class):
    lines = [f"Digits 5-9, {5 * per_class} training images, {steps} steps of batch {BATCH_SIZE}, "
             f"seeds {list(seeds)} (mean ± std). FID analogue = Fréchet distance of digits_cnn "
             "features, 500 EMA samples vs ~600 held-out real images; lower is better. "
             "Label accuracy = share of the 500 samples a digits 5-9 classifier (trained on "
             "the held-out images) assigns to the class they were generated for.", "",
             f"| method | D trainable params | FID @ {steps // 2} steps | FID @ {steps} steps "
             f"| best FID seen | label accuracy @ {steps} | s / run |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for method, params, mid, final, best, accs, secs in rows:
        lines.append(f"| {method} | {params:,} | {_spread(mid)} | {_spread(final)} | "
                     f"{_spread(best)} | {_spread(accs)} | {secs:.0f} |")
    floor, before, judge_acc = refs
    lines += ["", f"Reference points: FID of the real training images vs held-out real: "
              f"{floor:.2f}; of the pretrained generator before fine-tuning (it draws digits "
              f"0-4): {before:.2f}. Label accuracy of the classifier on the real training "
              f"images: {judge_acc:.3f}."]
    if augment:
        results, aug_fid, n_test = augment
        lines += ["", f"Generative augmentation (10 labelled images per class; FreezeD GAN "
                  f"fine-tuned on those 50 images only, final FID {aug_fid:.2f}; digits_cnn "
                  f"classifier via `fine_tune`, {n_test} test images):", "",
                  "| training set | test accuracy (mean ± std) | per seed |", "|---|---:|---|"]
        for name, accs in results.items():
            lines.append(f"| {name} | {np.mean(accs):.3f} ± {np.std(accs):.3f} | "
                         f"{', '.join(f'{a:.3f}' for a in accs)} |")
    return "\n".join(lines)


def write_results(text, tag, path=ROOT / "docs" / "gan.md"):
    """Replaces (or appends) the results block `tag` of docs/gan.md."""
    start, end = f"<!-- results:{tag}:start -->", f"<!-- results:{tag}:end -->"
    doc = path.read_text() if path.exists() else "# GAN fine-tuning\n"
    if start not in doc:
        doc += f"\n{start}\n{end}\n"
    block = f"{start}\n{text}\n{end}"
    path.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, doc,
                           flags=re.S))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--per-class", type=int, default=60, help="target images per class")
    parser.add_argument("--no-augmentation", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]

    x, y = load_digits_images(classes=TARGET)
    x_train, y_train, x_eval, y_eval = few_shot_split(x, y, per_class=60, seed=0)
    x_train, y_train, _, _ = few_shot_split(x_train, y_train, per_class=args.per_class, seed=0)
    feature_model = load_backbone(DIGITS_CNN)
    floor = fid_from_images(x_train, x_eval, feature_model)
    pretrained = keras.saving.load_model(SAVED / "digits_gan_generator.keras")
    before = fid_from_images(sample(pretrained, labels=labels(100), seed=1), x_eval, feature_model)
    judge = train_judge(x_eval, y_eval)
    refs = (floor, before, label_accuracy(judge, x_train, y_train))
    rows, gans = compare(x_train, y_train, x_eval, feature_model, args.steps, seeds, judge)
    augment = None if args.no_augmentation else augmentation(
        x_train, y_train, x_eval, y_eval, feature_model, args.steps, seeds + [seeds[-1] + 1])
    text = results_markdown(rows, refs, args.steps, seeds, augment, args.per_class)
    print("\n" + text)
    if not args.no_write:
        real = x_train[np.argsort(y_train, kind="stable")][::max(args.per_class // 2, 1)]
        grid = [("real digits 5-9", real[:10]),
                ("pretrained G (source 0-4), before", sample(pretrained, labels=labels(2), seed=3))]
        grid += [(f"{m} after {args.steps} steps", g.generate(labels=labels(2), seed=3))
                 for m, g in gans.items()]
        suffix = "" if args.per_class == 60 else f"_{args.per_class}"
        save_grid(grid, ROOT / "docs" / f"gan_samples{suffix}.png")
        write_results(text, f"{args.per_class}-per-class")
        print(f"wrote docs/gan.md (results block) and docs/gan_samples{suffix}.png")


if __name__ == "__main__":
    main()

"""Pretrains a small class-conditional GAN on digits 0-4, the source of GAN transfer.

Source task: scikit-learn digits, classes 0-4, 32x32x3 images in 0-255
(`tftransfer.datasets.load_digits_images`), the same data `digits_cnn` was
pretrained on. The discriminator is built on `digits_cnn.keras` with
`tftransfer.gan.discriminator_from_backbone` (all layers trainable, BN on
batch statistics); the generator is `tftransfer.gan.build_generator`. Written:

    digits_gan_generator.keras       the EMA generator ([latents, labels] -> images 0-255)
    digits_gan_discriminator.keras   the discriminator ([images, labels] -> logit)
    digits_gan.json                  settings, FID analogue, sizes, versions

The generator is checked to reload with identical outputs for the same latent
vectors before the files are moved into place.

Usage:
    python saved_models/build_gan.py [--overwrite] [--out-dir DIR] [--steps N]
"""

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if importlib.util.find_spec("tftransfer") is None:  # A checkout without installing the package.
    sys.path.insert(0, os.path.dirname(HERE))
from tftransfer.datasets import load_digits_images  # noqa: E402
from tftransfer.fid import fid_from_images  # noqa: E402
from tftransfer.gan import GAN, build_generator, discriminator_from_backbone, sample  # noqa: E402

SEED = 0
SOURCE_CLASSES = (0, 1, 2, 3, 4)
IMAGE_SHAPE = (32, 32, 3)
LATENT_DIM = 64
WIDTH = 64
STEPS = 2000
BATCH_SIZE = 32
LOSS = "non_saturating"
R1_GAMMA = 1.0
EMA_DECAY = 0.999
GENERATOR = "digits_gan_generator.keras"
DISCRIMINATOR = "digits_gan_discriminator.keras"
MANIFEST = "digits_gan.json"
MAX_BYTES = 2 * 1024 * 1024


def dataset(x, y, batch_size=BATCH_SIZE, seed=SEED):
    """Shuffled, repeated `(images, labels)` batches."""
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed)
    return ds.repeat().batch(batch_size, drop_remainder=True)


def balanced_labels(num_classes, per_class):
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def pretrain(steps=STEPS, backbone=os.path.join(HERE, "digits_cnn.keras")):
    """Trains the source GAN; returns `(gan, x, y)`."""
    keras.utils.set_random_seed(SEED)
    x, y = load_digits_images(classes=SOURCE_CLASSES, image_size=IMAGE_SHAPE[0])
    generator = build_generator(IMAGE_SHAPE, LATENT_DIM, num_classes=len(SOURCE_CLASSES),
                                width=WIDTH)
    discriminator = discriminator_from_backbone(backbone, trainable="all", freeze_batchnorm=False,
                                                num_classes=len(SOURCE_CLASSES))
    gan = GAN(generator, discriminator, ema_decay=EMA_DECAY, seed=SEED)
    gan.compile(loss=LOSS, r1_gamma=R1_GAMMA)
    epochs = 10
    gan.fit(dataset(x, y), epochs=epochs, steps_per_epoch=steps // epochs, verbose=2)
    return gan, x, y


def save_checked(gan, tmp_dir):
    """Saves both models and checks the generator reloads with identical outputs."""
    generator = gan.export_generator()
    generator.save(os.path.join(tmp_dir, GENERATOR))
    gan.discriminator.save(os.path.join(tmp_dir, DISCRIMINATOR))
    reloaded = keras.saving.load_model(os.path.join(tmp_dir, GENERATOR))
    z = np.random.default_rng(SEED).standard_normal((16, LATENT_DIM)).astype("float32")
    labels = np.arange(16, dtype=np.int32) % len(SOURCE_CLASSES)
    a, b = generator([z, labels], training=False), reloaded([z, labels], training=False)
    if not np.array_equal(np.asarray(a), np.asarray(b)):
        raise RuntimeError("The reloaded generator gives different images.")
    for name in (GENERATOR, DISCRIMINATOR):
        size = os.path.getsize(os.path.join(tmp_dir, name))
        if size > MAX_BYTES:
            raise RuntimeError(f"{name} is {size} bytes, over the 2 MB budget.")
    return generator


def source_fid(generator, x, y):
    """FID analogue (digits_cnn features) of 1,000 generated images vs the real source set."""
    fake = sample(generator, labels=balanced_labels(len(SOURCE_CLASSES), 200), seed=1)
    return fid_from_images(fake, x, os.path.join(HERE, "digits_cnn.keras"))


def manifest(tmp_dir, steps, fid, seconds, num_images):
    return {
        "source": f"scikit-learn digits {list(SOURCE_CLASSES)}, {num_images} images, 32x32x3, 0-255",
        "generator": {"file": GENERATOR, "inputs": ["latents [None, 64] float32", "labels [None] int32"],
                      "output": "images [None, 32, 32, 3] float32 in 0-255", "width": WIDTH,
                      "latent_dim": LATENT_DIM, "weights": "EMA"},
        "discriminator": {"file": DISCRIMINATOR, "backbone": "digits_cnn.keras (layer 'backbone')",
                          "head": "real_fake Dense(1) + projection <class_embedding(y), features>"},
        "training": {"steps": steps, "batch_size": BATCH_SIZE, "loss": LOSS, "r1_gamma": R1_GAMMA,
                     "ema_decay": EMA_DECAY, "optimizers": "Adam(2e-4, beta_1=0.5, beta_2=0.999)",
                     "seed": SEED, "seconds": round(seconds)},
        "fid_digits_cnn_vs_source": round(fid, 2),
        "sizes": {n: os.path.getsize(os.path.join(tmp_dir, n)) for n in (GENERATOR, DISCRIMINATOR)},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "rebuild": "python saved_models/build_gan.py --overwrite",
    }


def build(out_dir, steps):
    start = time.time()
    gan, x, y = pretrain(steps)
    with tempfile.TemporaryDirectory() as tmp_dir:
        generator = save_checked(gan, tmp_dir)
        fid = source_fid(generator, x, y)
        info = manifest(tmp_dir, steps, fid, time.time() - start, len(x))
        with open(os.path.join(tmp_dir, MANIFEST), "w") as f:
            json.dump(info, f, indent=2)
        os.makedirs(out_dir, exist_ok=True)
        for name in (GENERATOR, DISCRIMINATOR, MANIFEST):
            shutil.move(os.path.join(tmp_dir, name), os.path.join(out_dir, name))
    print(json.dumps(info, indent=2))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overwrite", action="store_true", help="replace existing artifacts")
    parser.add_argument("--out-dir", default=HERE, help="where to write (default: saved_models/)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"GAN steps (default {STEPS})")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    existing = [n for n in (GENERATOR, DISCRIMINATOR, MANIFEST)
                if os.path.exists(os.path.join(args.out_dir, n))]
    if existing and not args.overwrite:
        sys.exit(f"Refusing to overwrite {existing} in {args.out_dir}; pass --overwrite.")
    build(args.out_dir, args.steps)


if __name__ == "__main__":
    main()

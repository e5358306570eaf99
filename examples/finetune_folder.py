"""Fine-tune on a folder of images, end to end: folder -> two stages -> report -> export.

    python examples/finetune_folder.py IMAGES_DIR [--backbone mobilenet_v2] [--output runs/folder]

IMAGES_DIR holds one subfolder per class (jpg, png, bmp, gif). With no
IMAGES_DIR, the example writes scikit-learn's digits 5-9 as PNG files into
`runs/digits_folder/` and uses the bundled pretrained digits backbone, so it
runs offline. With `--backbone mobilenet_v2` (or `efficientnet_b0`, ...)
Keras downloads ImageNet weights once and caches them.
"""

import argparse
import os
import pathlib

import keras
import numpy as np

from tftransfer import (
    build_finetuner,
    evaluate_classifier,
    export_for_serving,
    fine_tune,
    format_report,
    load_backbone,
)
from tftransfer.data import from_directory

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_digits_folder(path):
    """Writes digits 5-9 as 32x32 PNGs, one folder per class."""
    import tensorflow as tf

    from tftransfer.datasets import load_digits_images

    x, y = load_digits_images(classes=(5, 6, 7, 8, 9))
    names = ["five", "six", "seven", "eight", "nine"]
    for i, (image, label) in enumerate(zip(x, y)):
        folder = pathlib.Path(path) / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        png = tf.io.encode_png(np.round(image).astype("uint8"))
        (folder / f"{i:04d}.png").write_bytes(png.numpy())
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="?", help="folder with one subfolder per class")
    parser.add_argument("--backbone", default=str(ROOT / "saved_models" / "digits_cnn.keras"))
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--fine-tune-epochs", type=int, default=5)
    parser.add_argument("--output", default="runs/folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished run in --output (refused otherwise)")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    images = args.images or str(ROOT / "runs" / "digits_folder")
    if not args.images and not os.path.isdir(images):
        write_digits_folder(images)

    backbone = load_backbone(args.backbone)  # its input size sizes the images
    data = from_directory(images, model=backbone, validation_split=0.5, batch_size=16)
    print(f"{data.num_classes} classes: {data.class_names}; counts {data.counts}; "
          f"skipped {len(data.skipped)} unreadable files")
    model = build_finetuner(backbone, num_classes=data.num_classes, dropout=0.2,
                            learning_rate=1e-2)
    fine_tune(model, data, head_epochs=args.head_epochs, fine_tune_epochs=args.fine_tune_epochs,
              unfreeze="top:2", output_dir=args.output, overwrite=args.overwrite,
              verbose=2)
    report = evaluate_classifier(model, data.validation, data.class_names)
    print(format_report(report))
    path = export_for_serving(model, os.path.join(args.output, "export"),
                              class_names=data.class_names)
    print(f"plots: {args.output}/curves.png, {args.output}/confusion_matrix.png")
    print(f"serving export: {path}  (check it: python -m tftransfer.export verify {path})")


if __name__ == "__main__":
    main()

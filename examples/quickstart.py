"""Fine-tune the bundled pretrained digits backbone on new classes, offline.

The backbone in `saved_models/` was pretrained on digits 0-4 (scikit-learn's
`load_digits`); here it learns digits 5-9 from 10 labelled images per class,
first with the backbone frozen, then unfrozen (`fine_tune`: a tenth of the
learning rate for the head, warmed up over the first epoch, and less for each
backbone layer further down), and is saved as `runs/quickstart/model.keras` and exported for
TF Serving under `runs/quickstart/export/`.

    python examples/quickstart.py [--backbone saved_models/digits_cnn_hub] [--overwrite]
"""

import argparse
import os
import pathlib

import keras

from tftransfer import (
    build_finetuner,
    describe_trainable,
    evaluate_classifier,
    export_for_serving,
    fine_tune,
    format_report,
)
from tftransfer.datasets import few_shot_split, load_digits_images

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default=str(ROOT / "saved_models" / "digits_cnn.keras"))
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--output", default="runs/quickstart")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished run in --output (refused otherwise)")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    x, y = load_digits_images(classes=(5, 6, 7, 8, 9))
    x_train, y_train, x_rest, y_rest = few_shot_split(x, y, per_class=args.per_class, seed=0)
    x_val, y_val, x_test, y_test = few_shot_split(x_rest, y_rest, per_class=30, seed=1)
    names = ["five", "six", "seven", "eight", "nine"]

    model = build_finetuner(args.backbone, num_classes=5, dropout=0.2, learning_rate=1e-2)
    describe_trainable(model)
    fine_tune(model, (x_train, y_train), (x_val, y_val), head_epochs=20, fine_tune_epochs=10,
              unfreeze="all", batch_size=10, output_dir=args.output,
              overwrite=args.overwrite, verbose=2)
    print(format_report(evaluate_classifier(model, (x_test, y_test), names)))
    model.save(os.path.join(args.output, "model.keras"))
    export = export_for_serving(model, os.path.join(args.output, "export"), class_names=names)
    print(f"plots: {args.output}/curves.png, {args.output}/confusion_matrix.png")
    print(f"saved: {args.output}/model.keras; serving export: {export}")


if __name__ == "__main__":
    main()

"""Fine-tune the bundled pretrained digits backbone on new classes, offline.

The backbone in `saved_models/` was pretrained on digits 0-4 (scikit-learn's
`load_digits`); here it learns digits 5-9 from 10 labelled images per class,
first with the backbone frozen, then with its top layer unfrozen, and is saved
as `runs/quickstart/model.keras`.

    python examples/quickstart.py [--backbone saved_models/digits_cnn_hub]
"""

import argparse
import os
import pathlib

import keras

from tftransfer import build_finetuner, describe_trainable
from tftransfer.datasets import few_shot_split, load_digits_images

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default=str(ROOT / "saved_models" / "digits_cnn.keras"))
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--output", default="runs/quickstart")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    x, y = load_digits_images(classes=(5, 6, 7, 8, 9))
    x_train, y_train, x_test, y_test = few_shot_split(x, y, per_class=args.per_class, seed=0)

    model = build_finetuner(args.backbone, num_classes=5, trainable="none",
                            dropout=0.2, learning_rate=1e-2)
    describe_trainable(model)
    model.fit(x_train, y_train, batch_size=10, epochs=args.epochs, verbose=2)
    _, frozen_acc = model.evaluate(x_test, y_test, verbose=0)[:2]

    tuned = build_finetuner(model.get_layer("backbone"), num_classes=5, trainable="top:1",
                            dropout=0.2, learning_rate=1e-3)
    tuned.get_layer("predictions").set_weights(model.get_layer("predictions").get_weights())
    tuned.fit(x_train, y_train, batch_size=10, epochs=args.epochs // 2, verbose=2)
    _, tuned_acc = tuned.evaluate(x_test, y_test, verbose=0)[:2]

    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "model.keras")
    tuned.save(path)
    print(f"\n{'stage':<22}{'held-out accuracy':>18}")
    print(f"{'head on frozen':<22}{frozen_acc:>18.3f}")
    print(f"{'top layer unfrozen':<22}{tuned_acc:>18.3f}")
    print(f"saved: {path}")


if __name__ == "__main__":
    main()

"""lr_find and predict(tta=...) measured on the bundled digits task (quickstart's split).

    PYTHONPATH=. python bench/lr_find_tta.py
"""

import time

import keras
import numpy as np

from tftransfer import build_finetuner, fine_tune, lr_find, predict
from tftransfer.datasets import few_shot_split, load_digits_images

BACKBONE = "saved_models/digits_cnn.keras"


def accuracy(model, x, y, tta=False):
    results = predict(model, x, tta=tta, verbose=0)
    return float(np.mean([int(r["label"]) == t for r, t in zip(results, y)]))


def trained(rate, train, val):
    keras.utils.set_random_seed(0)
    model = build_finetuner(BACKBONE, num_classes=5, dropout=0.2, learning_rate=rate)
    fine_tune(model, train, val, head_epochs=20, fine_tune_epochs=10, batch_size=10, verbose=0)
    return model


def main():
    x, y = load_digits_images(classes=(5, 6, 7, 8, 9))
    x_train, y_train, x_rest, y_rest = few_shot_split(x, y, per_class=10, seed=0)
    x_val, y_val, x_test, y_test = few_shot_split(x_rest, y_rest, per_class=30, seed=1)
    keras.utils.set_random_seed(0)
    model = build_finetuner(BACKBONE, num_classes=5, dropout=0.2)
    start = time.time()
    found = lr_find(model, (x_train, y_train), batch_size=10, plot="bench/lr_find.png")
    print(f"lr_find: suggestion {found['suggestion']:.3g} after {len(found['losses'])} steps "
          f"in {time.time() - start:.1f} s")
    for name, rate in (("lr_find", found["suggestion"]), ("default", 1e-3),
                       ("quickstart", 1e-2)):
        model = trained(rate, (x_train, y_train), (x_val, y_val))
        row = [accuracy(model, x_test, y_test, tta) for tta in (False, True, ["crops"])]
        print(f"{name:>10} lr={rate:.3g}: test accuracy {row[0]:.3f} | tta=True {row[1]:.3f} | "
              f"tta=['crops'] {row[2]:.3f}  (n={len(y_test)})")


if __name__ == "__main__":
    main()

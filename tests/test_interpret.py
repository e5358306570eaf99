"""Error analysis: top losses find mislabelled files, Grad-CAM finds the evidence."""

import keras
import numpy as np
import pytest
from conftest import SAVED
from PIL import Image

from tftransfer import FineTuner, build_finetuner, fine_tune, interpret
from tftransfer.interpret import gradcam

NAMES = ["five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def noisy_folder(digits_target, tmp_path_factory):
    """30 digits per class as PNG files; the first of classes 0-3 sits in the next
    class's folder (mislabelled)."""
    x, y = digits_target
    keep = np.concatenate([np.flatnonzero(y == c)[:30] for c in range(5)])
    x, y, true = x[keep], y[keep].copy(), y[keep]
    root = tmp_path_factory.mktemp("noisy")
    wrong = set()
    for c in range(4):
        i = int(np.flatnonzero(true == c)[0])
        y[i] = c + 1
        wrong.add(str(root / NAMES[c + 1] / f"{i:03d}.png"))
    for name in NAMES:
        (root / name).mkdir()
    for i, (image, label) in enumerate(zip(x, y)):
        Image.fromarray(image.astype("uint8")).save(root / NAMES[label] / f"{i:03d}.png")
    return root, (x, y), wrong


def test_top_losses_rank_the_mislabelled_files_first(noisy_folder):
    root, (x, y), wrong = noisy_folder
    model = build_finetuner(SAVED / "digits_cnn.keras", class_names=NAMES, learning_rate=1e-2)
    fine_tune(model, (x, y), None, head_epochs=12, fine_tune_epochs=0, batch_size=16,
              early_stopping=None, verbose=0)
    result = interpret(model, root)
    top = result.top_losses(len(wrong))
    assert len({row["path"] for row in top} & wrong) >= 3
    first = top[0]
    assert first["label"] != first["predicted"] and first["loss"] > 1
    assert set(first) == {"index", "path", "label", "predicted", "score", "true_score", "loss"}
    assert result.class_names == NAMES
    assert sum(count for *_, count in result.most_confused()) == \
        int((result.labels != result.predicted).sum())
    maps = result.gradcam([first["index"]])
    assert maps["method"] == "gradcam" and maps["layer"] == "relu3"
    assert maps["heatmaps"].shape == (1, 32, 32)


def _quadrant_images(n, rng):
    """Class 1: a bright 7x7 square somewhere in the top-left quadrant; class 0: none."""
    x = rng.uniform(0, 40, size=(n, 32, 32, 3)).astype("float32")
    y = np.arange(n) % 2
    for i in np.flatnonzero(y == 1):
        r, c = rng.integers(0, 9, size=2)
        x[i, r:r + 7, c:c + 7] = 255
    return x, y


def test_gradcam_peaks_where_the_class_evidence_is():
    rng = np.random.default_rng(0)
    x, y = _quadrant_images(256, rng)
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Rescaling(1 / 255.0)(inputs)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(h)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_b")(h)
    backbone = keras.Model(inputs, h)
    model = FineTuner(backbone, 2, pooling="max")
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    test, labels = _quadrant_images(8, rng)
    assert (model.predict(test, verbose=0).argmax(-1) == labels).all()
    result = gradcam(model, test[labels == 1], class_index=1)
    assert result["method"] == "gradcam" and result["layer"] == "conv_b"
    maps = result["heatmaps"]
    assert maps.shape == (4, 32, 32) and maps.max() == pytest.approx(1.0)
    quadrants = np.stack([maps[:, :16, :16], maps[:, :16, 16:], maps[:, 16:, :16],
                          maps[:, 16:, 16:]], 1).mean(axis=(2, 3))
    assert (quadrants.argmax(axis=1) == 0).all()
    peaks = np.array([np.unravel_index(m.argmax(), m.shape) for m in maps])
    assert (peaks < 16).all()


def test_opaque_hub_backbone_falls_back_to_input_saliency(small_batch):
    model = build_finetuner(f"hub:{SAVED / 'digits_cnn_hub'}", num_classes=5)
    result = gradcam(model, small_batch[0][:2])
    assert result["method"] == "saliency" and result["layer"] is None
    assert result["heatmaps"].shape == (2, 32, 32)
    with pytest.raises(ValueError, match="`layer`"):
        gradcam(model, small_batch[0][:2], layer="conv1")

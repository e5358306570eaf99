"""predict(..., tta=...): scores averaged over flips and corner crops."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import SAVED

from tftransfer import build_finetuner, predict


@pytest.fixture(scope="module")
def model():
    return build_finetuner(SAVED / "digits_cnn.keras", num_classes=5)


def _scores(results):
    return np.array([r["score"] for r in results])


def test_flip_tta_makes_scores_mirror_invariant(model, small_batch):
    x = small_batch[0][:6]
    plain, mirrored = predict(model, x, top_k=5), predict(model, x[:, :, ::-1], top_k=5)
    assert not np.allclose(_scores(plain), _scores(mirrored))
    a = predict(model, x, top_k=5, tta=["flip"])
    b = predict(model, x[:, :, ::-1], top_k=5, tta=["flip"])
    for left, right in zip(a, b):
        assert dict(left["top_k"]) == pytest.approx(dict(right["top_k"]), abs=1e-6)


def test_tta_averages_six_views(model, small_batch):
    x = small_batch[0][:4]
    views = [x, x[:, :, ::-1]]
    for top, left in ((0, 0), (0, 3), (3, 0), (3, 3)):  # 29x29 corners of 32x32
        views.append(tf.image.resize(x[:, top:top + 29, left:left + 29], (32, 32)).numpy())
    expected = np.mean([model.predict(v, verbose=0) for v in views], axis=0)
    got = predict(model, x, top_k=5, tta=True)
    for row, probabilities in zip(got, expected):
        names = model.class_names or [str(i) for i in range(5)]
        assert dict(row["top_k"]) == pytest.approx(dict(zip(names, probabilities)), abs=1e-5)


def test_unknown_view_is_refused(model, small_batch):
    with pytest.raises(ValueError, match=r"allowed values: \['flip', 'crops'\]. Received: tta="):
        predict(model, small_batch[0][:1], tta=["rotate"])

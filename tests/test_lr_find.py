"""lr_find: a sweep that suggests a rate and leaves the model exactly as it was."""

import numpy as np
import pytest
from conftest import SAVED

from tftransfer import build_finetuner, lr_find
from tftransfer.lr_find import valley


def _state(model):
    return [np.array(v) for v in list(model.variables) + list(model.optimizer.variables)]


def test_lr_find_restores_every_variable_bit_for_bit(digits_target, tmp_path):
    x, y = digits_target
    model = build_finetuner(SAVED / "digits_cnn.keras", num_classes=5, dropout=0.2,
                            trainable="all")
    model.fit(x[:64], y[:64], epochs=1, batch_size=16, verbose=0)  # optimizer state not zero
    before = _state(model)
    found = lr_find(model, (x[:160], y[:160]), num_steps=40, plot=tmp_path / "lr.png")
    after = _state(model)
    assert len(before) == len(after) and any(b.any() for b in before[-3:])
    for b, a in zip(before, after):
        assert b.dtype == a.dtype and np.array_equal(b, a)
    assert 1e-7 <= found["suggestion"] <= 10
    assert len(found["losses"]) == len(found["learning_rates"]) > 10
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"


def test_valley_is_in_the_longest_fall():
    rates = list(np.logspace(-6, 0, 100))
    losses = [2.0] * 30 + list(np.linspace(2.0, 0.5, 50)) + list(np.linspace(0.5, 9, 20))
    suggestion = valley(rates, losses)
    assert rates[30] < suggestion < rates[79]


def test_bad_arguments_name_themselves(small_batch):
    model = build_finetuner(SAVED / "digits_cnn.keras", num_classes=5)
    with pytest.raises(ValueError, match="`end_lr` must be a float > start_lr"):
        lr_find(model, small_batch, start_lr=1e-2, end_lr=1e-3)
    with pytest.raises(ValueError, match="Received: num_steps=3"):
        lr_find(model, small_batch, num_steps=3)

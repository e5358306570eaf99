"""What makes Hyperband pay off: resumed schedules, features shared between trials."""

import os
import pathlib
import re

import keras
import numpy as np
import pytest
from conftest import SAVED, changed, weights_of

from tftransfer import _feature_cache, build_finetuner, fine_tune
from tftransfer.datasets import few_shot_split

DIGITS = str(SAVED / "digits_cnn.keras")


@pytest.fixture(scope="module")
def few_shot(digits_target):
    """10 training images per class of digits 5-9 and 50 validation images."""
    x, y = digits_target
    x_few, y_few, x_rest, y_rest = few_shot_split(x, y, per_class=10, seed=0)
    x_val, y_val, _, _ = few_shot_split(x_rest, y_rest, per_class=10, seed=1)
    return (x_few, y_few), (x_val, y_val)


class _Epochs(keras.callbacks.Callback):
    """Records `(epoch, name of the model trained)` for every epoch run."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append((epoch, self.model.name))


def _model():
    return build_finetuner(DIGITS, num_classes=5, learning_rate=1e-2)


# ------------------------------------------------------------ initial_epoch


def test_resumed_inside_stage_one_runs_the_rest_of_both_stages(few_shot):
    train, val = few_shot
    epochs = _Epochs()
    history = fine_tune(_model(), train, val, head_epochs=3, fine_tune_epochs=2, initial_epoch=1,
                        early_stopping=None, callbacks=[epochs], verbose=0)
    assert epochs.seen == [(1, "head_model"), (2, "head_model"), (3, "finetuner"), (4, "finetuner")]
    assert history.epoch == [1, 2, 3, 4]
    assert history.stages == {"head": (1, 3), "fine_tune": (3, 5)}
    assert len(history.history["val_accuracy"]) == 4


def test_resumed_inside_stage_two_skips_stage_one(few_shot, monkeypatch):
    train, val = few_shot

    def no_features(*args, **kwargs):
        raise AssertionError("stage 1 ran: the backbone computed features")

    monkeypatch.setattr(_feature_cache, "extract_all", no_features)
    model = _model()
    backbone, head = model.backbone, model.head.get_layer("predictions")
    before, head_before = weights_of(backbone), weights_of(head)
    epochs = _Epochs()
    history = fine_tune(model, train, val, head_epochs=2, fine_tune_epochs=3, initial_epoch=3,
                        unfreeze="top:1", early_stopping=None, callbacks=[epochs], verbose=0)
    assert epochs.seen == [(3, "finetuner"), (4, "finetuner")]  # stage 2 only
    assert history.stages == {"head": (3, 3), "fine_tune": (3, 5)}
    moved = {path.split("/")[-2] for path in changed(before, weights_of(backbone))}
    assert moved == {"conv3"}  # what stage 2 unfreezes, nothing else
    assert changed(head_before, weights_of(head))
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-2 * 0.03)  # stage-2 rate


@pytest.mark.parametrize("value", [-1, 5, 1.0, True, None])
def test_bad_initial_epoch(value, small_batch):
    message = ("`initial_epoch` must be an integer from 0 to head_epochs + fine_tune_epochs - 1 "
               f"(here 4). Received: initial_epoch={value!r}")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        fine_tune(_model(), small_batch, head_epochs=3, fine_tune_epochs=2, initial_epoch=value,
                  verbose=0)


# ------------------------------------------------------ shared feature cache


def _run_head(few_shot, **kwargs):
    keras.utils.set_random_seed(0)
    model = _model()
    history = fine_tune(model, *few_shot, head_epochs=3, fine_tune_epochs=0, early_stopping=None,
                        verbose=0, **kwargs)
    keras.backend.clear_session()
    return history.history, model


def _files(directory):
    return {str(p): p.stat().st_mtime_ns for p in pathlib.Path(directory).rglob("*") if p.is_file()}


def _counting_backbone_runs(monkeypatch):
    runs = []
    wrap = _feature_cache.for_any_batch

    def counted(extract, dataset):
        inner = wrap(extract, dataset)
        return lambda images: runs.append(len(images)) or inner(images)

    monkeypatch.setattr(_feature_cache, "for_any_batch", counted)
    return runs


def test_feature_cache_is_written_once_and_reused(few_shot, tmp_path, monkeypatch):
    runs = _counting_backbone_runs(monkeypatch)
    plain, _ = _run_head(few_shot)
    assert sum(runs) == 100  # 50 training and 50 validation images
    first, _ = _run_head(few_shot, feature_cache_dir=tmp_path)
    files = _files(tmp_path)
    assert len(files) == 2 and all(f.endswith(".npz") for f in files)  # train, validation
    assert len({os.path.dirname(f) for f in files}) == 1  # one backbone
    runs.clear()
    second, _ = _run_head(few_shot, feature_cache_dir=tmp_path)
    assert runs == []  # the backbone did not run
    assert _files(tmp_path) == files  # nothing written again
    for history in (first, second):
        assert history["val_accuracy"] == plain["val_accuracy"]
        np.testing.assert_allclose(history["val_loss"], plain["val_loss"], rtol=1e-6)


def test_changed_backbone_weights_get_their_own_features(few_shot, tmp_path):
    _run_head(few_shot, feature_cache_dir=tmp_path)
    keras.utils.set_random_seed(0)
    model = _model()
    conv = model.backbone.get_layer("conv1")
    conv.kernel.assign(conv.kernel * 1.5)  # as a stage 2 of an earlier trial would
    fine_tune(model, *few_shot, head_epochs=1, fine_tune_epochs=0, verbose=0,
              feature_cache_dir=tmp_path)
    assert len(os.listdir(tmp_path)) == 2  # two backbone keys, features not mixed up


# ------------------------------------------------------------------ search


@pytest.mark.slow
def test_hyperband_continues_promoted_trials_and_shares_features(tmp_path, monkeypatch):
    from tftransfer.search import hypermodel, run, validate

    calls, features = [], tmp_path / "search" / "features"

    def spy(model, *args, **kwargs):
        history = fine_tune(model, *args, **kwargs)
        calls.append((kwargs.get("initial_epoch", 0), history.epoch, _files(features)))
        return history

    monkeypatch.setattr(hypermodel, "fine_tune", spy)
    cfg = validate({
        "data": {"source": "digits", "per_class": 5, "validation_split": 0.2},
        "search_space": {"backbone": DIGITS, "dropout": {"min": 0.0, "max": 0.5},
                         "learning_rate": 0.01, "batch_size": 16, "head_epochs": 1,
                         "fine_tune_epochs": 1},
        "tuner": {"kind": "hyperband", "max_epochs": 2, "factor": 2, "seed": 1},
        "run": {"directory": str(tmp_path / "search"), "isolate_trials": False}})
    run(cfg, out=lambda line: None)  # loading the best model for its export fits nothing
    # Bracket 1: two 1-epoch trials, then the better one trained on for epoch 1
    # only (stage 2: no stage 1 again); bracket 0: two 2-epoch trials.
    assert sorted(c[:2] for c in calls) == [(0, [0]), (0, [0]), (0, [0, 1]), (0, [0, 1]),
                                            (1, [1])]
    written = calls[0][2]  # by the first trial: train and validation features
    assert len(written) == 2 and all(c[2] == written for c in calls)  # reused, not rewritten


def test_unreadable_feature_file_is_computed_again(few_shot, tmp_path):
    plain, _ = _run_head(few_shot, feature_cache_dir=tmp_path)
    broken = sorted(_files(tmp_path))[0]
    pathlib.Path(broken).write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable feature cache file .* computed again"):
        again, _ = _run_head(few_shot, feature_cache_dir=tmp_path)
    assert again["val_accuracy"] == plain["val_accuracy"]
    with np.load(broken) as shard:  # written again, whole
        assert shard["features"].shape[0] == shard["digests"].shape[0] == 50

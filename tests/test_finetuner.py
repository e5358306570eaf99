"""FineTuner: what it owns survives save/load; layer-wise rates reload; predict agrees
with the model and the export; NaN losses, locks and other data in an output_dir."""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SAVED, changed, weights_of
from PIL import Image
from test_formats import FORMATS, IDS

from tftransfer import FineTuner, build_finetuner, export_for_serving, fine_tune, predict
from tftransfer._lock import LockedError

DIGITS = str(SAVED / "digits_cnn.keras")
NAMES = ["five", "six", "seven", "eight", "nine"]
RECIPE = dict(weight_decay=1e-4, label_smoothing=0.1,
              learning_rate={"class_name": "cosine", "config": {"decay_steps": 50}})


@pytest.fixture(scope="module")
def split(digits_target):
    x, y = digits_target
    return (x[:120], y[:120]), (x[120:200], y[120:200]), x[200:216]


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_fine_tuned_model_reloads_with_everything(fmt, split, tmp_path):
    _, name, extra, _ = fmt
    train, val, x = split
    model = build_finetuner(str(SAVED / name), class_names=NAMES, **extra, **RECIPE)
    fine_tune(model, train, val, head_epochs=1, fine_tune_epochs=1, layerwise_lr_decay=0.8,
              batch_size=40, verbose=0, output_dir=tmp_path)
    reloaded = keras.models.load_model(tmp_path / "model.keras")  # default safe_mode
    assert isinstance(reloaded, FineTuner)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)
    assert reloaded.class_names == NAMES and reloaded.task == "classification"
    assert reloaded.source == model.source == str(SAVED / name)
    assert reloaded.recipe == json.loads(json.dumps(model.recipe))
    assert reloaded.recipe["weight_decay"] == 1e-4 and reloaded.recipe["label_smoothing"] == 0.1
    multipliers = reloaded.optimizer.get_config()["lr_multipliers"]
    assert multipliers == model.optimizer.get_config()["lr_multipliers"] != {}
    bound = reloaded.optimizer.multipliers_by_path  # Keras paths, and TF names of hub variables
    assert len(set(bound) & {v.path for v in reloaded.weights}) == len(multipliers)
    before_backbone, before_head = weights_of(reloaded.backbone), weights_of(reloaded.head)
    reloaded.fit(*train, batch_size=40, epochs=1, verbose=0)  # trains on
    assert changed(before_head, weights_of(reloaded.head))
    assert changed(before_backbone, weights_of(reloaded.backbone))


def test_config_round_trips_through_json():
    model = build_finetuner(DIGITS, class_names=NAMES, hidden_units=(8,), dropout=0.2,
                            regularizer="l2:1e-4", trainable="top:1", **RECIPE)
    config = json.loads(json.dumps(model.get_config()))
    again = FineTuner.from_config(config)
    assert isinstance(again, FineTuner)
    assert json.loads(json.dumps(again.get_config())) == config
    assert [type(layer).__name__ for layer in again.head.layers] == [
        "Dropout", "Dense", "Dropout", "Dense"]


def test_layerwise_rates_reload_and_train_at_the_same_rates(split, tmp_path):
    train, _, _ = split

    def model_with(decay):
        keras.utils.set_random_seed(0)
        model = build_finetuner(DIGITS, num_classes=5, optimizer="sgd", learning_rate=0.05)
        model.freeze("all")
        model.compile_stage(0.05, layerwise_lr_decay=decay)
        return model

    saved = model_with(0.1)
    saved.save(tmp_path / "m.keras")
    models = {"plain": model_with(None), "saved": saved,
              "reloaded": keras.models.load_model(tmp_path / "m.keras")}
    steps = {}
    for key, m in models.items():  # one SGD step on the same batch from the same weights
        before = weights_of(m.backbone)
        m.fit(*train, batch_size=120, epochs=1, verbose=0, shuffle=False)
        after = weights_of(m.backbone)
        steps[key] = {p: float(np.abs(after[p] - before[p]).max()) for p in before
                      if p.endswith("kernel")}
    assert steps["saved"] == pytest.approx(steps["reloaded"], rel=1e-4)
    for layer, factor in (("conv3", 0.1), ("conv2", 0.01), ("conv1", 0.001)):
        ratio = steps["saved"][f"{layer}/kernel"] / steps["plain"][f"{layer}/kernel"]
        assert ratio == pytest.approx(factor, rel=1e-3), layer


def test_stage_methods_compose_fine_tuning(split):
    train, _, _ = split
    model = build_finetuner(DIGITS, num_classes=5)
    assert model.freeze("top:1") == 1
    assert [layer.name for layer in model.backbone.layers if layer.trainable_weights] == ["conv3"]
    model.compile_stage(1e-3, layerwise_lr_decay=0.5)
    rates = model.optimizer.get_config()["lr_multipliers"]
    assert rates == {"conv3/kernel": 0.5}  # the digits convolutions have no bias
    assert model.optimizer.multipliers_by_path == {"conv3/kernel": 0.5}
    head = model.head_model()
    features = model.extract_features(train[0])
    before = weights_of(model.head)
    head.fit(features, train[1], epochs=1, verbose=0)
    assert changed(before, weights_of(model.head)) == set(before)  # the model's own head


def test_explicit_compile_leaves_the_recipe(split):
    train, val, _ = split
    model = build_finetuner(DIGITS, num_classes=5, learning_rate=1e-2)
    recipe = model.recipe
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    assert type(model.optimizer).__name__ == "SGD"  # fit trains with what was compiled
    assert model.recipe == recipe and model.base_learning_rate == pytest.approx(1e-2)
    fine_tune(model, train, val, head_epochs=1, fine_tune_epochs=1, verbose=0,
              keep_best_stage=False, lr_factor=0.1, fine_tune_warmup=0.0,
              layerwise_lr_decay=None)
    config = model.optimizer.get_config()  # stage 2 from the recipe: Adam at 1e-2 * 0.1
    assert type(model.optimizer).__name__ == "Adam"
    assert config["learning_rate"] == pytest.approx(1e-3)


def test_build_finetuner_optimizer_instance_gives_the_recipe_its_rate():
    model = build_finetuner(DIGITS, num_classes=5,
                            optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    assert model.base_learning_rate == pytest.approx(0.05)
    stage = model.stage_optimizer()
    assert type(stage).__name__ == "SGD" and stage.get_config()["momentum"] == 0.9


@pytest.mark.parametrize("recipe, argument, frozen", [
    (False, None, False), (True, None, True), (False, True, True), (True, False, False)])
def test_fine_tune_takes_the_recipes_freeze_batchnorm(split, recipe, argument, frozen):
    train, _, _ = split
    model = build_finetuner(DIGITS, num_classes=5, freeze_batchnorm=recipe)
    fine_tune(model, (train[0][:40], train[1][:40]), head_epochs=0, fine_tune_epochs=1,
              batch_size=40, freeze_batchnorm=argument, verbose=0)
    norms = [layer for layer in model.backbone.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(layer.trainable != frozen for layer in norms)


def test_fine_tune_takes_the_data_class_names(split, tmp_path):
    from tftransfer import data as tfdata

    train, _, _ = split
    data = tfdata.from_arrays(*train, class_names=NAMES, image_size=(32, 32), batch_size=40)
    model = build_finetuner(DIGITS, num_classes=5)
    fine_tune(model, data, head_epochs=1, fine_tune_epochs=0, verbose=0, output_dir=tmp_path)
    assert keras.models.load_model(tmp_path / "model.keras").class_names == NAMES


@pytest.fixture(scope="module")
def trained(split):
    train, val, _ = split
    model = build_finetuner(DIGITS, class_names=NAMES, learning_rate=1e-2)
    fine_tune(model, train, val, head_epochs=4, fine_tune_epochs=0, verbose=0)
    return model


@pytest.fixture(scope="module")
def image_files(digits_target, tmp_path_factory):
    x, _ = digits_target
    folder = tmp_path_factory.mktemp("images")
    for i in range(6):
        Image.fromarray(x[300 + i].astype("uint8")).save(folder / f"{i}.png")
        Image.fromarray(x[300 + i].astype("uint8")).save(folder / f"{i}.jpg", quality=90)
    return folder


def test_predict_on_files_matches_model_and_serving_bytes(trained, image_files, tmp_path):
    results = predict(trained, image_files, top_k=3)
    paths = [r["path"] for r in results]
    assert sorted(os.path.basename(p) for p in paths) == sorted(os.listdir(image_files))
    decoded = np.stack([tf.io.decode_image(tf.io.read_file(p), channels=3).numpy()
                        for p in paths]).astype("float32")  # 32x32 files: no resize
    expected = trained.predict(decoded, verbose=0)
    assert [r["label"] for r in results] == [NAMES[i] for i in expected.argmax(-1)]
    np.testing.assert_allclose([r["score"] for r in results], expected.max(-1), atol=1e-5)
    assert all(len(r["top_k"]) == 3 and r["top_k"][0] == (r["label"], r["score"]) for r in results)
    version = export_for_serving(trained, tmp_path / "export")
    loaded = tf.saved_model.load(version)
    served = loaded.signatures["serving_bytes"](
        image_bytes=tf.constant([open(p, "rb").read() for p in paths]))
    assert [b.decode() for b in served["labels"][:, 0].numpy()] == [r["label"] for r in results]
    from_export = predict(tmp_path / "export", paths)
    assert [r["label"] for r in from_export] == [r["label"] for r in results]
    np.testing.assert_allclose([r["score"] for r in from_export],
                               [r["score"] for r in results], atol=1e-5)
    from_bytes = predict(trained, [open(p, "rb").read() for p in paths])
    assert [r["label"] for r in from_bytes] == [r["label"] for r in results]


def test_export_reads_the_finetuner(trained, tmp_path):
    version = export_for_serving(trained, tmp_path / "export")
    meta = json.loads(open(os.path.join(version, "assets.extra", "tftransfer.json")).read())
    assert meta["class_names"] == NAMES and meta["task"] == "classification"
    assert meta["backbone"] == DIGITS and meta["preprocessing"] == trained.preprocessing.mode
    assert meta["hyperparameters"]["learning_rate"] == 1e-2


def test_predict_cli_prints_a_table_and_writes_csv(trained, image_files, tmp_path):
    trained.save(tmp_path / "m.keras")
    out = tmp_path / "out.csv"
    command = [sys.executable, "-m", "tftransfer.predict", str(tmp_path / "m.keras"),
               str(image_files), "--top-k", "2", "--csv", str(out)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].split() == ["path", "label", "score", "top_k"] and len(lines) == 2 + 12
    rows = out.read_text().strip().splitlines()
    assert len(rows) == 13 and rows[0] == "path,label,score,top_k"
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert len(out.read_text().strip().splitlines()) == 13  # untouched


def test_predict_skips_and_names_a_file_it_cannot_decode(trained, image_files, tmp_path):
    bad, good = tmp_path / "bad.png", str(image_files / "0.png")
    bad.write_bytes(b"not an image at all, only text")
    with pytest.warns(UserWarning, match=r"Skipped 1 file\(s\).*bad\.png"):
        results = predict(trained, [good, str(bad)])
    assert [r["path"] for r in results] == [good] and results.skipped == [str(bad)]
    junk = [open(good, "rb").read(), b"\xff\xd8\xff not a JPEG after all, only text"]
    with pytest.raises(ValueError, match=r"Cannot decode the image images\[1\]"):
        predict(trained, junk)  # bytes have no name to skip under
    with pytest.raises(ValueError, match=r"`top_k` must be an integer >= 1. Received: top_k=0"):
        predict(trained, str(image_files), top_k=0)


def test_unit_range_input_warns_once(trained, split):
    x = split[2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_finetuner(DIGITS, num_classes=5)
        model.predict(x / 255.0, verbose=0)
        model.predict(x / 255.0, verbose=0)
        model.predict(x, verbose=0)
    messages = [str(w.message) for w in caught if "[0, 1]" in str(w.message)]
    assert len(messages) == 1 and "takes raw pixels in [0, 255]" in messages[0]


def test_unit_range_check_reads_a_sample_of_raw_pixels(monkeypatch):
    model = build_finetuner(DIGITS, num_classes=5)
    raw = np.random.default_rng(0).uniform(0, 255, (300, 32, 32, 3)).astype("float32")
    read = []
    nanmax = np.nanmax
    monkeypatch.setattr(np, "nanmax", lambda a, *args, **kw: read.append(np.size(a)) or nanmax(
        a, *args, **kw))
    for _ in range(3):
        model.warn_if_unit_range(raw)
        model.warn_if_unit_range(tf.constant(raw))
    assert read and max(read) == 32 * 32 * 32 * 3  # the first 32 images of 300, each call
    dark_start = raw / 255.0
    dark_start[-1, 0, 0, 0] = 7.0  # 0-1 at first sight, raw pixels after all: no warning
    dark_start[0, 0, 0, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.warn_if_unit_range(dark_start)
    dark_start[-1, 0, 0, 0] = 1.0
    with pytest.warns(UserWarning, match=r"looks like images scaled to \[0, 1\] \(max 1\)"):
        model.warn_if_unit_range(dark_start)


def test_nan_loss_restores_weights_and_marks_the_run_failed(split, tmp_path):
    train, val, _ = split
    model = build_finetuner(DIGITS, num_classes=5, optimizer="sgd", learning_rate=1e-3)
    run = dict(head_epochs=1, fine_tune_epochs=2, fine_tune_learning_rate=1e35,
               early_stopping=None, verbose=0, output_dir=tmp_path)
    with pytest.raises(FloatingPointError, match="stage 2 .* marked failed"):
        fine_tune(model, train, val, **run)
    assert all(np.isfinite(np.asarray(w)).all() for w in model.weights)
    state = json.loads((tmp_path / "fine_tune_state.json").read_text())
    assert state["done"] is False and state["failed"]["stage"] == "stage2"
    assert not (tmp_path / "model.keras").exists()
    with pytest.raises(FloatingPointError):  # the same call retries (no "finished run" error)
        fine_tune(model, train, val, **run)
    with pytest.raises(ValueError, match=r"other data or settings \(changed: the training data"
                                         r"\).*overwrite=True"):
        fine_tune(model, (train[0][:60], train[1][:60]), val, **run)


def test_stage_two_that_never_beats_stage_one_is_undone(split):
    train, val, _ = split
    model = build_finetuner(DIGITS, num_classes=5, learning_rate=1e-2)
    with pytest.warns(UserWarning, match="keeps the stage-1 weights"):
        history = fine_tune(model, train, val, head_epochs=3, fine_tune_epochs=2,
                            fine_tune_learning_rate=3.0, early_stopping=None, verbose=0)
    assert history.restored_stage1
    val_loss = model.evaluate(*val, verbose=0)[0]
    assert val_loss == pytest.approx(min(history.history["val_loss"][:3]), rel=1e-3)


HOLD_LOCK = """
import sys
from tftransfer._lock import DirectoryLock
lock = DirectoryLock(sys.argv[1], what="fine_tune output_dir").acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def test_output_dir_in_use_by_another_process_is_refused(split, tmp_path):
    train, _, _ = split
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        model = build_finetuner(DIGITS, num_classes=5)
        with pytest.raises(LockedError, match=str(holder.pid)):
            fine_tune(model, train, head_epochs=1, fine_tune_epochs=0, verbose=0,
                      output_dir=tmp_path)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    fine_tune(model, train, head_epochs=1, fine_tune_epochs=0, verbose=0, output_dir=tmp_path)
    assert (tmp_path / "model.keras").exists()


def test_mixed_bfloat16_trains_and_serves_float32(split, tmp_path):
    train, val, x = split
    model = build_finetuner(DIGITS, num_classes=5, dtype_policy="mixed_bfloat16",
                            hidden_units=(16,))
    assert model.backbone.layers[1].compute_dtype == "bfloat16"
    assert model.head.layers[0].compute_dtype == "bfloat16"
    history = fine_tune(model, train, val, head_epochs=2, fine_tune_epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert model.predict(x, verbose=0).dtype == np.float32
    assert all(v.dtype == "float32" for v in model.weights)
    model.save(tmp_path / "m.keras")
    reloaded = keras.models.load_model(tmp_path / "m.keras")
    assert reloaded.backbone.layers[1].compute_dtype == "bfloat16"
    version = export_for_serving(model, tmp_path / "export")
    out = tf.saved_model.load(version).signatures["serving_default"](images=tf.constant(x))
    assert out["probabilities"].dtype == tf.float32
    np.testing.assert_allclose(out["probabilities"], model.predict(x, verbose=0), atol=1e-6)
    with pytest.raises(ValueError, match=r"`dtype_policy` must be None or one of float32, "
                                         r"mixed_float16, mixed_bfloat16. Received: "
                                         r"dtype_policy='half'"):
        build_finetuner(DIGITS, num_classes=5, dtype_policy="half")

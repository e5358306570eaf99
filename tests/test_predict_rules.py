"""predict's rules for models, destinations and arrays, and from_arrays's for arrays:
clear errors before any work, bad files skipped and named, 0-1 warnings on every form."""

import os
import shutil
import warnings

import numpy as np
import pytest
import tensorflow as tf
from conftest import SAVED
from PIL import Image

from tftransfer import build_finetuner, export_for_serving, predict
from tftransfer.data import from_arrays
from tftransfer.predict.__main__ import main

DIGITS = str(SAVED / "digits_cnn.keras")
NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """`(FineTuner, .keras path, export base dir, folder of 2 good + 1 bad files)`."""
    root = tmp_path_factory.mktemp("forms")
    model = build_finetuner(DIGITS, class_names=NAMES)
    model.save(root / "m.keras")
    export_for_serving(model, root / "export")
    folder = root / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "bad.jpg").write_text("not a photo")
    return model, root / "m.keras", root / "export", folder


def test_cli_checks_the_csv_destination_before_predicting(forms, tmp_path, capsys):
    _, keras_file, _, folder = forms
    for destination, message in [(tmp_path, "is a directory"),
                                 (tmp_path / "missing" / "out.csv", "does not exist")]:
        assert main([str(keras_file), str(folder), "--csv", str(destination)]) == 2
        assert message in capsys.readouterr().err
    assert main([str(keras_file), str(folder), "--csv", str(tmp_path / "out.csv")]) == 0
    out = capsys.readouterr()
    assert "Skipped 1 file(s)" in out.err and "bad.jpg" in out.err
    assert len((tmp_path / "out.csv").read_text().splitlines()) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]  # no .tmp left


def test_cli_leaves_no_temporary_file_when_writing_fails(forms, tmp_path, capsys, monkeypatch):
    _, keras_file, _, folder = forms

    def refuse(*_):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(os, "replace", refuse)  # the CLI's own rename (nothing else renames)
    assert main([str(keras_file), str(folder), "--csv", str(tmp_path / "out.csv")]) == 2
    assert "read-only" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_saved_models_that_are_not_exports_are_refused_by_path(forms, tmp_path):
    export = forms[2]
    with pytest.raises(ValueError, match=r"not a tftransfer serving export.*"
                       r"Received: model='.*digits_cnn_hub'"):
        predict(str(SAVED / "digits_cnn_hub"), np.zeros((1, 32, 32, 3)))
    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    labels = next(broken.glob("*/assets/labels.txt"))
    labels.write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"broken serving export.*3 in all \(2 line\(s\)\).*"
                       r"Received: model='.*broken'"):
        predict(str(broken), np.zeros((1, 32, 32, 3)))
    labels.unlink()
    with pytest.raises(ValueError, match=r"broken serving export.*\(missing\)"):
        predict(str(broken), np.zeros((1, 32, 32, 3)))


def test_keras_file_names(forms, tmp_path):
    upper = tmp_path / "M.KERAS"
    shutil.copy(forms[1], upper)
    assert len(predict(str(upper), np.zeros((2, 32, 32, 3)))) == 2
    text = tmp_path / "notes.keras"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"ends in .keras but is not a Keras file"):
        predict(str(text), np.zeros((1, 32, 32, 3)))


def _range_warnings(model, images):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict(model, images)
    return [str(w.message) for w in caught if "[0, 1]" in str(w.message)]


def test_unit_range_warning_on_every_form_worded_by_preprocessing(forms):
    model, keras_file, export, _ = forms
    unit = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3))
    for form in (model, str(keras_file), str(export)):
        messages = _range_warnings(form, unit)
        assert len(messages) == 1, form
        assert "preprocessing is 'none'" in messages[0] and "rescale:1/255,0" in messages[0]
    scaled = build_finetuner(DIGITS, num_classes=3, preprocessing="tf")
    messages = _range_warnings(scaled, unit)
    assert len(messages) == 1 and "mode 'tf'" in messages[0] and "rescale" not in messages[0]
    assert not _range_warnings(model, unit * 255)


@pytest.mark.parametrize("images, message", [
    (np.full((1, 32, 32, 3), np.nan), r"^`images` must be finite images \(no NaN or infinity\)\. "
     r"The first bad image is at index 0 \(it holds nan\)\. "
     r"Received: images=array\(shape=\(1, 32, 32, 3\), dtype=float64\)$"),
    (np.full((1, 32, 32, 3), 60000, np.uint16), r"^`images` must hold integer pixels in 0-255\. "
     r"They span 60000 to 60000; for 16-bit images pass `\(images // 257\)\.astype\('uint8'\)`\. "
     r"Received: images=array"),
    (np.ones((1, 32, 32, 3), bool), r"^`images` must hold numeric pixels .*bool masks are not "
     r"images.*Received: images=array\(shape=\(1, 32, 32, 3\), dtype=bool\)$"),
])
def test_predict_refuses_arrays_it_cannot_read(forms, images, message):
    with pytest.raises(ValueError, match=message):
        predict(forms[0], images)


def test_predict_takes_small_integers_and_gray_arrays(forms):
    model = forms[0]
    as_int = predict(model, np.full((1, 32, 32, 3), 200, np.int64))
    as_float = predict(model, np.full((1, 32, 32, 3), 200.0))
    assert as_int[0]["score"] == pytest.approx(as_float[0]["score"])
    gray = build_finetuner(str(SAVED / "digits_mlp_hw.keras"), num_classes=2)
    height, width = gray.input_shape[1:3]
    x = np.random.default_rng(0).uniform(0, 255, (3, height, width))
    assert len(predict(gray, x)) == 3 and len(predict(gray, x[0])) == 1
    assert [r["score"] for r in predict(gray, x)] == [r["score"] for r in predict(gray, x[..., None])]


def test_from_arrays_labels_and_shapes():
    x = np.random.default_rng(0).uniform(0, 255, (6, 8, 8, 3)).astype("float32")
    named = from_arrays(x, ["dog", "cat", "dog", "cat", "cat", "dog"], image_size=(8, 8),
                        validation_split=0)
    assert named.class_names == ["cat", "dog"] and named.counts == {"cat": 3, "dog": 3}
    given = from_arrays(x, ["dog"] * 6, class_names=["dog", "cat"], image_size=(8, 8),
                        validation_split=0)
    assert given.counts == {"dog": 6, "cat": 0}
    floats = from_arrays(x, np.array([0.0, 1.0, 0.0, 1.0, 1.0, 0.0]), image_size=(8, 8))
    assert floats.class_names == ["0", "1"]
    with pytest.raises(ValueError, match=r"`y`.*names in class_names=\['a', 'b'\]"):
        from_arrays(x, ["a"] * 5 + ["z"], class_names=["a", "b"], image_size=(8, 8))
    with pytest.raises(ValueError, match=r"`x`.*images of one size.*"
                       r"\(32, 32, 3\), \(50, 50, 3\)"):
        from_arrays([np.zeros((32, 32, 3)), np.zeros((50, 50, 3))], [0, 1], image_size=(8, 8))
    with pytest.raises(ValueError, match=r"`x` must be finite images.*index 0"):
        from_arrays(np.where(x > 250, np.nan, x), [0, 1] * 3, image_size=(8, 8))
    with pytest.raises(ValueError, match=r"bool masks"):
        from_arrays(x > 100, [0, 1] * 3, image_size=(8, 8))
    gray = from_arrays(np.zeros((4, 8, 8), np.uint8), [0, 1, 0, 1], image_size=(8, 8))
    assert gray.channels == 3 and next(iter(gray.train))[0].shape[1:] == (8, 8, 3)


def test_dict_input_saved_model_is_refused_naming_source(tmp_path):
    class Named(tf.Module):
        @tf.function(input_signature=[{"image": tf.TensorSpec([None, 8, 8, 3])}])
        def __call__(self, inputs):
            return tf.reduce_mean(inputs["image"], [1, 2])

    module = Named()
    tf.saved_model.save(module, str(tmp_path / "named"),
                        signatures={"serving_default": module.__call__})
    with pytest.raises(ValueError, match=r"`source` is a SavedModel whose function takes named "
                       r"inputs \['image'\].*Received: source='.*named'"):
        build_finetuner(str(tmp_path / "named"), num_classes=2)

"""Tests for tftransfer.data on real image folders written from sklearn digits."""

import os
import shutil
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.datasets import load_digits

from tftransfer import data as tfd

CLASSES = ["zero", "one", "two"]  # sorted: one, two, zero
SORTED = sorted(CLASSES)


def _digits(n_per_class, digits=(0, 1, 2)):
    """16x16 uint8 digit images, ``n_per_class`` of each digit."""
    d = load_digits()
    images, labels = [], []
    for label, digit in enumerate(digits):
        idx = np.flatnonzero(d.target == digit)[:n_per_class[label]]
        imgs = (d.images[idx] * (255.0 / 16.0)).round().astype(np.uint8)
        images.append(imgs.repeat(2, axis=1).repeat(2, axis=2))
        labels += [label] * len(idx)
    return np.concatenate(images), np.asarray(labels)


def _write_folder(root, n_per_class=(12, 12, 12), formats=("png",)):
    """Writes digits to ``root/<class>/`` cycling through ``formats``."""
    x, y = _digits(n_per_class)
    for i, (img, label) in enumerate(zip(x, y)):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        fmt = formats[i % len(formats)]
        mode_img = Image.fromarray(img) if fmt != "jpg" else Image.fromarray(img).convert("RGB")
        mode_img.save(folder / f"img_{i:03d}.{fmt}")
    return x, y


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """36 good images (PNG/JPEG/BMP/GIF, mixed case) + 4 broken + 1 ignored."""
    root = tmp_path_factory.mktemp("digits")
    _write_folder(root, formats=("png", "jpg", "bmp", "gif", "PNG"))
    good = (root / "zero" / "img_000.png").read_bytes()
    (root / "zero" / "truncated.png").write_bytes(good[: len(good) // 2])
    corrupt = bytearray(good)  # whole (IEND at its end), but its pixels' checksum wrong
    crc = corrupt.index(b"IEND") - 8
    corrupt[crc:crc + 4] = bytes(255 - b for b in corrupt[crc:crc + 4])
    (root / "zero" / "corrupt.png").write_bytes(bytes(corrupt))
    (root / "one" / "x.png").write_text("this is not an image")
    (root / "two" / "notes.jpeg").write_bytes(b"\x00\x01garbage")
    (root / "two" / "readme.txt").write_text("ignored: not an image extension")
    (root / ".ipynb_checkpoints").mkdir()
    return root


def _epoch(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def _load(folder, **kw):
    kw.setdefault("image_size", (16, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = tfd.from_directory(folder, **kw)
    return data, [w for w in caught if "could not be decoded" in str(w.message)]


def test_directory_skips_broken_files_and_reports_once(folder):
    data, warned = _load(folder, batch_size=8)
    # The listing reads only first and last bytes: text, garbage and a truncated
    # file are left out at once...
    assert sorted(os.path.basename(p) for p in data.skipped) == [
        "notes.jpeg", "truncated.png", "x.png"]
    assert len(warned) == 1 and "Skipped 3 file(s)" in str(warned[0].message)
    assert "Left out 1 file(s) without an image extension (.txt: 1)" in str(warned[0].message)
    assert data.class_names == SORTED and data.num_classes == 3
    # ... a damaged PNG when the first epoch reads it, without stopping it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x_train, y_train = _epoch(data.train)
        x_val, y_val = _epoch(data.validation)
    read = [w for w in caught if "could not be decoded" in str(w.message)]
    assert len(read) == 1 and "Skipped 1 file(s)" in str(read[0].message)
    assert "corrupt.png" in str(read[0].message)
    assert sorted(os.path.basename(p) for p in data.skipped) == [
        "corrupt.png", "notes.jpeg", "truncated.png", "x.png"]
    # Every readable file, and the split keeps its length: the damaged file's
    # place is taken by a second copy of a readable image of its split.
    assert len(y_train) + len(y_val) == 37
    assert len({a.tobytes() for a in np.concatenate([x_train, x_val])}) == 36
    assert int(data.train.cardinality()) * 8 >= len(y_train) > int(data.train.cardinality() - 1) * 8
    assert set(y_train) == set(y_val) == {0, 1, 2}
    assert sum(data.counts.values()) + len(y_val) == 36  # readable files of the train split
    assert x_train.shape[1:] == (16, 16, 3) and x_train.dtype == np.float32
    assert y_train.dtype == np.int32
    assert 0.0 <= x_train.min() and x_train.max() <= 255.0 and x_train.max() > 200
    assert data.augmented is False and data.class_weight is None
    with warnings.catch_warnings(record=True) as caught:  # reported once, not every epoch
        warnings.simplefilter("always")
        assert len(_epoch(data.train)[1]) == len(y_train)
    assert not [w for w in caught if "could not be decoded" in str(w.message)]


def test_labels_match_folders_and_pixels_are_raw(tmp_path):
    x, y = _write_folder(tmp_path, n_per_class=(4, 4, 4))
    data = tfd.from_directory(tmp_path, image_size=(16, 16), channels=1,
                              validation_split=0, shuffle=False, cache=False)
    assert data.validation is None
    images, labels = _epoch(data.train)
    # sorted class order: one (digit 1), two (digit 2), zero (digit 0)
    np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], 4))
    expected = np.concatenate([x[y == 1], x[y == 2], x[y == 0]])[..., None]
    np.testing.assert_allclose(images, expected.astype(np.float32), atol=1e-3)


def test_split_is_deterministic_disjoint_and_seeded(folder):
    def split(seed):
        d, _ = _load(folder, seed=seed, shuffle=False, validation_split=0.25)
        return _epoch(d.train)[0], _epoch(d.validation)[0]

    (tr1, va1), (tr2, va2), (_, va3) = split(1), split(1), split(2)
    np.testing.assert_array_equal(va1, va2)
    np.testing.assert_array_equal(tr1, tr2)
    # round(12 * 0.25) = 3 per class; 28 = 27 + a repeat in place of corrupt.png
    assert len(va1) == 9 and len(tr1) == 28
    train_set = {a.tobytes() for a in tr1}
    assert not train_set & {a.tobytes() for a in va1}
    assert {a.tobytes() for a in va1} != {a.tobytes() for a in va3}


@pytest.mark.parametrize("cache", [True, False])
def test_shuffle_changes_order_between_epochs_not_content(folder, cache):
    data, _ = _load(folder, batch_size=36, validation_split=0, cache=cache)
    (x1, _), (x2, _) = _epoch(data.train), _epoch(data.train)
    assert not np.array_equal(x1, x2)
    assert sorted(a.tobytes() for a in x1) == sorted(a.tobytes() for a in x2)


def test_split_rounds_per_class_and_keeps_one_training_example():
    x, _ = _digits((12, 12, 12))
    y = np.repeat([0, 1, 2], [1, 4, 7])
    data = tfd.from_arrays(x[:12], y, image_size=(8, 8), validation_split=0.5)
    assert data.counts == {"0": 1, "1": 2, "2": 3}  # held out: 0 (kept), 2, 4 (half up)
    assert len(_epoch(data.validation)[1]) == 6
    two = tfd.from_arrays(x[:2], [0, 0], image_size=(8, 8), validation_split=0.8)
    assert two.counts == {"0": 1}


def test_augmentation_train_only_and_in_range(folder):
    plain, _ = _load(folder, shuffle=False)
    aug, _ = _load(folder, shuffle=False, augment=["flip", "rotation", "contrast"])
    assert aug.augmented and not plain.augmented
    x_plain, x_aug = _epoch(plain.train)[0], _epoch(aug.train)[0]
    assert x_aug.shape == x_plain.shape and x_aug.dtype == np.float32
    assert not np.allclose(x_aug, x_plain)
    assert x_aug.min() >= 0.0 and x_aug.max() <= 255.0 and x_aug.max() > 100
    np.testing.assert_array_equal(_epoch(aug.validation)[0], _epoch(plain.validation)[0])


def test_augmentation_accepts_default_and_layers(folder):
    for augment in (True, "default", [keras.layers.RandomFlip("vertical")]):
        data, _ = _load(folder, augment=augment)
        assert data.augmented
        assert next(iter(data.train))[0].shape[1:] == (16, 16, 3)


def test_class_weight_balanced_and_dict(tmp_path):
    _write_folder(tmp_path, n_per_class=(30, 10, 5))
    data = tfd.from_directory(tmp_path, image_size=(8, 8), class_weight="balanced",
                              validation_split=0.2)
    counts = np.array([data.counts[c] for c in SORTED])  # one, two, zero
    np.testing.assert_array_equal(counts, [8, 4, 24])  # 10, 5, 30 minus 20%
    expected = counts.sum() / (3 * counts)
    assert data.class_weight == pytest.approx(dict(enumerate(expected)))
    assert data.class_weight[2] < data.class_weight[0] < data.class_weight[1]
    named = tfd.from_directory(tmp_path, image_size=(8, 8),
                               class_weight={"one": 1, "two": 2.5, "zero": 0.5})
    assert named.class_weight == {0: 1.0, 1: 2.5, 2: 0.5}


def test_keras_fit_consumes_pipeline(folder):
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.Flatten(), keras.layers.Dense(3, "softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    data, _ = _load(folder, model=model, image_size=None, batch_size=8,
                    class_weight="balanced", augment="default")
    assert int(data.train.cardinality()) == 4  # 30 train images, known to Keras
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(data.train, validation_data=data.validation, epochs=2,
                            class_weight=data.class_weight, verbose=0)
    assert len(history.history["val_loss"]) == 2
    assert not [w for w in caught if "ran out of data" in str(w.message)]


def test_fit_reports_unreadable_files_by_the_end_of_its_first_epoch(folder):
    """Keras takes the known number of steps and never asks past the last batch:
    the damaged file is still named when `fit`'s first epoch ends."""
    for cache in ("memory", False):
        data, _ = _load(folder, batch_size=8, cache=cache)
        model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten(),
                                  keras.layers.Dense(3, "softmax")])
        model.compile("sgd", "sparse_categorical_crossentropy")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(data.train, validation_data=data.validation, epochs=1, verbose=0)
        assert "corrupt.png" in {os.path.basename(p) for p in data.skipped}, cache
        assert [w for w in caught if "corrupt.png" in str(w.message)], cache
        assert not [w for w in caught if "ran out of data" in str(w.message)]


def test_memory_cache_serves_later_epochs_without_reading_files(tmp_path):
    """An abandoned pass, then a full one, fill the cache: once the files are
    deleted, epochs still give every image once, in a new order each time."""
    _write_folder(tmp_path, n_per_class=(10, 10, 10), formats=("png", "jpg"))
    data = tfd.from_directory(tmp_path, image_size=(16, 16), cache="memory", batch_size=4,
                              validation_split=0.2)
    assert data.cache == "memory" and data.cache_bytes == 30 * 16 * 16 * 3
    next(iter(data.train))  # a pass that stops after one batch
    first, labels = _epoch(data.train)
    validation = _epoch(data.validation)
    shutil.rmtree(tmp_path)
    for _ in range(2):
        again, again_labels = _epoch(data.train)
        assert again.dtype == first.dtype == np.float32  # stored as uint8, served as float32
        assert not np.array_equal(again, first)  # reshuffled
        assert sorted(zip(map(bytes, again), again_labels)) == sorted(
            zip(map(bytes, first), labels))
        np.testing.assert_array_equal(_epoch(data.validation)[0], validation[0])
    assert len(first) == 24 and len({a.tobytes() for a in first}) == 24


def test_from_dataset_memory_cache_keeps_every_image_and_reshuffles():
    """A stream of known length is cached in one array too: the second and third
    epochs give the first epoch's images, each once, in new orders."""
    x, y = _digits((10, 10, 10))
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    data = tfd.from_dataset(ds, validation=ds.take(6), image_size=(8, 8), channels=3,
                            class_names=CLASSES, batch_size=7, cache="memory")
    assert data.cache == "memory" and data.cache_bytes == 36 * 8 * 8 * 3
    first, labels = _epoch(data.train)
    assert len(first) == 30 and len({a.tobytes() for a in first}) == 30
    validation = _epoch(data.validation)[0]
    assert len(validation) == 6
    previous = first
    for _ in range(2):
        again, again_labels = _epoch(data.train)
        assert sorted(zip(map(bytes, again), again_labels)) == sorted(zip(map(bytes, first), labels))
        assert not np.array_equal(again, previous)  # a new order (seeded)
        previous = again
        np.testing.assert_array_equal(_epoch(data.validation)[0], validation)


def test_pipelines_run_one_call_per_core_with_the_autotuner_off(folder):
    """On 2 cores tf.data's autotuner left half a core idle for whole passes in
    about half of them (bench/data_scale.py): every loader's splits turn it off
    and decode on every core; a user's `with_options` turns it back on."""
    from tftransfer import _pipeline

    x, y = _digits((10, 10, 10))
    loaded = [_load(folder)[0], _load(folder, cache=False, augment="default")[0],
              tfd.from_arrays(x, y, image_size=(8, 8)),
              tfd.from_dataset(tf.data.Dataset.from_tensor_slices((x, y)), image_size=(8, 8),
                               validation=tf.data.Dataset.from_tensor_slices((x, y)),
                               class_names=CLASSES)]
    for data in loaded:
        for ds in (data.train, data.validation):
            assert ds.options().autotune.enabled is False
            assert ds.options().autotune.initial_parallelism == _pipeline.cores()
    options = tf.data.Options()
    options.autotune.enabled = True
    tuned = loaded[0].validation.with_options(options)
    assert tuned.options().autotune.enabled is True
    np.testing.assert_array_equal(_epoch(tuned)[0], _epoch(loaded[0].validation)[0])


def test_file_cache_and_model_input_size(folder, tmp_path):
    inputs = keras.Input((24, 20, 1))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    data, _ = _load(folder, model=model, image_size=None,
                    cache=str(tmp_path / "cache" / "digits"), shuffle=False)
    assert (data.image_size, data.channels) == ((24, 20), 1)
    first, second = _epoch(data.train)[0], _epoch(data.train)[0]
    assert first.shape[1:] == (24, 20, 1)
    np.testing.assert_array_equal(first, second)
    assert any(name.endswith(".index") for name in os.listdir(tmp_path / "cache"))


def test_from_arrays_grayscale_to_rgb_and_resize():
    x, y = _digits((10, 10, 10))
    data = tfd.from_arrays(x, y, image_size=(32, 32), channels=3, batch_size=7,
                           class_names=["a", "b", "c"], class_weight="balanced")
    images, labels = _epoch(data.train)
    assert images.shape == (24, 32, 32, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    assert len(_epoch(data.validation)[1]) == 6
    assert data.class_weight == {0: 1.0, 1: 1.0, 2: 1.0}
    assert data.counts == {"a": 8, "b": 8, "c": 8}
    floats = tfd.from_arrays(x[..., None].astype("float64"), y, image_size=(16, 16),
                             validation_split=0, shuffle=False)
    np.testing.assert_allclose(_epoch(floats.train)[0][..., 0], x, atol=1e-3)


def test_from_dataset_counts_and_names():
    x, y = _digits((6, 3, 3))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)  # batched input
    data = tfd.from_dataset(ds, image_size=(8, 8), class_weight="balanced",
                            validation=tf.data.Dataset.from_tensor_slices((x, y)))
    assert data.class_names == ["0", "1", "2"]
    assert data.counts == {"0": 6, "1": 3, "2": 3}
    assert data.class_weight == pytest.approx({0: 12 / 18, 1: 12 / 9, 2: 12 / 9})
    images, _ = _epoch(data.train)
    assert images.shape == (12, 8, 8, 3)
    assert _epoch(data.validation)[0].shape == (12, 8, 8, 3)


# ------------------------------------------------------------------ TFDS
def _tiny_builder_class():
    import tensorflow_datasets as tfds

    class TftransferTinyDigits(tfds.core.GeneratorBasedBuilder):
        """Three digit classes, 10 images each, generated offline."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(16, 16, 1)),
                    "label": tfds.features.ClassLabel(names=["d0", "d1", "d2"])}),
                supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            x, y = _digits((10, 10, 10))
            for i, (img, label) in enumerate(zip(x, y)):
                yield i, {"image": img[..., None], "label": int(label)}

    return TftransferTinyDigits


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    _tiny_builder_class()(data_dir=str(data_dir)).download_and_prepare()
    return data_dir


def test_from_tfds_prepared_offline(tfds_dir):
    data = tfd.from_tfds("tftransfer_tiny_digits", data_dir=str(tfds_dir),
                         image_size=(20, 20), batch_size=4, class_weight="balanced",
                         split=("train[:80%]", "train[80%:]"))
    assert data.class_names == ["d0", "d1", "d2"]
    images, labels = _epoch(data.train)
    assert images.shape == (24, 20, 20, 3) and labels.dtype == np.int32
    assert len(_epoch(data.validation)[1]) == 6
    assert sum(data.counts.values()) == 24 and set(data.class_weight) == {0, 1, 2}
    single = tfd.from_tfds("tftransfer_tiny_digits", data_dir=str(tfds_dir),
                           split="train", image_size=(16, 16), channels=1)
    assert single.validation is None and _epoch(single.train)[0].shape == (30, 16, 16, 1)


def test_from_tfds_download_prepares_missing_data(tfds_dir, tmp_path):
    data = tfd.from_tfds("tftransfer_tiny_digits", data_dir=str(tmp_path), download=True,
                         image_size=(8, 8), split="train[:50%]")  # generator: no network
    assert len(_epoch(data.train)[1]) == 15


def test_from_tfds_missing_data_says_how_to_prepare(tfds_dir, tmp_path):
    with pytest.raises(ValueError) as err:
        tfd.from_tfds("tftransfer_tiny_digits", data_dir=str(tmp_path), image_size=(8, 8))
    message = str(err.value)
    assert "not prepared" in message
    assert f"tfds build tftransfer_tiny_digits --data_dir={tmp_path}" in message
    assert "download=True" in message
    assert message.endswith(f"Received: name='tftransfer_tiny_digits', data_dir='{tmp_path}'")
    with pytest.raises(ValueError, match="not prepared in .* no builder is registered.*"
                       "tfds build"):
        tfd.from_tfds("no_such_dataset_xyz", data_dir=str(tmp_path), image_size=(8, 8))


# ----------------------------------------------------------- bad input
def test_directory_errors(tmp_path, folder):
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=f"`path` must be an existing directory "
                       f"with one subfolder per class. Received: path='{missing}'$"):
        tfd.from_directory(str(missing), image_size=(8, 8))
    with pytest.raises(ValueError, match="`path` must be a directory with one subfolder of images "
                       r"per class .*Received: path="):
        tfd.from_directory(tmp_path, image_size=(8, 8))  # empty
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bad.png").write_text("nope")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a" / "ok.png")
    with pytest.raises(ValueError, match=r"none in \['b'\] \(1 undecodable "
                       r"file\(s\) skipped overall\). Received: path="):
        with pytest.warns(UserWarning, match="Skipped 1 file"):
            tfd.from_directory(tmp_path, image_size=(8, 8))


@pytest.mark.parametrize("kwargs, message", [
    (dict(validation_split=1.0), "`validation_split` must be a float in "
     r"\[0, 1\). Received: validation_split=1.0$"),
    (dict(validation_split=-0.1), r"Received: validation_split=-0.1$"),
    (dict(batch_size=0), r"`batch_size` must be an int >= 1. Received: batch_size=0$"),
    (dict(image_size=None), r"Either `model` .* Received: model=None, image_size=None$"),
    (dict(image_size=(8,)), r"`image_size` must be .*Received: image_size=\(8,\)$"),
    (dict(augment=["flip", "blur"]), r"`augment` must be .*\['contrast', 'flip', "
     r"'rotation', 'translation', 'zoom'\].*unknown entry 'blur'\. "
     r"Received: augment=\['flip', 'blur'\]$"),
    (dict(augment=3), r"`augment` must be .*Received: augment=3$"),
    (dict(interpolation="cubic"), r"`interpolation` must be .*'bilinear'.*"
     r"Received: interpolation='cubic'$"),
    (dict(cache=3), r"`cache` must be .*Received: cache=3$"),
    (dict(class_weight="auto"), r"`class_weight` must be None, 'balanced'.*"
     r"Received: class_weight='auto'$"),
    (dict(class_weight={0: 1.0, 1: 1.0}), r"every class.*Received: class_weight=\{0: 1.0, "),
    (dict(class_weight={"one": 1, "two": 1, "zero": -1}), r"weight >= 0"),
])
def test_argument_errors(folder, kwargs, message):
    kwargs.setdefault("image_size", (8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=message):
            tfd.from_directory(folder, **kwargs)


def test_model_and_array_errors():
    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, inputs)
    with pytest.raises(ValueError, match=r"must be \(16, 16\) \(the model's input size\) "
                       r"or None. Received: image_size=\(8, 8\)$"):
        tfd.from_arrays(np.zeros((2, 4, 4), np.uint8), [0, 1], model=model, image_size=(8, 8))
    with pytest.raises(ValueError, match=r"matching the model's input channels \(3\). "
                       r"Received: channels=1$"):
        tfd.from_arrays(np.zeros((2, 4, 4), np.uint8), [0, 1], model=model, channels=1)
    with pytest.raises(ValueError, match=r"`model` must be .*Received: model="):
        tfd.from_arrays(np.zeros((2, 4, 4), np.uint8), [0, 1], model=keras.Sequential())
    with pytest.raises(ValueError, match=r"`y` must be .*Received: y=array\(shape=\(3,\)"):
        tfd.from_arrays(np.zeros((2, 4, 4), np.uint8), [0, 1, 1], image_size=(4, 4))
    with pytest.raises(ValueError, match=r"`x` must be .*Received: x=array\(shape=\(2, 4\)"):
        tfd.from_arrays(np.zeros((2, 4), np.uint8), [0, 1], image_size=(4, 4))
    with pytest.raises(ValueError, match=r"`channels` must be one of \[1, 3, 4\] "
                       r"for images with 3 channels. Received: channels=2$"):
        tfd.from_arrays(np.zeros((2, 4, 4, 3), np.uint8), [0, 1], image_size=(4, 4), channels=2)
    with pytest.warns(UserWarning, match=r"raw \[0, 255\] pixels are expected"):
        tfd.from_arrays(np.full((2, 4, 4), 0.5), [0, 1], image_size=(4, 4))


# ------------------------------------------------- scale: cache, formats, shared decode
def test_cache_auto_follows_the_budget(folder, monkeypatch):
    need = 37 * 16 * 16 * 3  # 36 readable + 1 repeat, as uint8
    small, _ = _load(folder, cache_budget=need - 1, shuffle=False)
    big, _ = _load(folder, cache_budget="1GB", shuffle=False)
    assert (small.cache, small.cache_bytes) == (None, need)
    assert (big.cache, big.cache_bytes) == ("memory", need)
    for _ in range(2):  # the uint8 cache gives exactly the decoded pixels
        np.testing.assert_array_equal(_epoch(big.train)[0], _epoch(small.train)[0])
    monkeypatch.setenv("TFTRANSFER_CACHE_BUDGET", str(need))
    assert _load(folder)[0].cache == "memory"
    monkeypatch.setenv("TFTRANSFER_CACHE_BUDGET", "1KB")
    assert _load(folder)[0].cache is None
    x, y = _digits((10, 10, 10))
    assert tfd.from_arrays(x, y, image_size=(8, 8), cache_budget="1KB").cache is None
    assert tfd.from_arrays(x, y, image_size=(8, 8), cache_budget="1MB").cache == "memory"
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    assert tfd.from_dataset(ds, image_size=(8, 8)).cache is None  # over $TFTRANSFER_...
    assert tfd.from_dataset(ds, image_size=(8, 8), cache_budget="1MB").cache == "memory"
    unknown = ds.filter(lambda image, label: True)  # cardinality unknown: not in memory
    assert tfd.from_dataset(unknown, image_size=(8, 8), class_names=list("abc"),
                            cache_budget="1MB").cache is None


def test_explicit_memory_cache_over_budget_warns_with_the_numbers(folder):
    with pytest.warns(UserWarning, match=r"cache='memory' keeps 37 resized images in memory: "
                      r"28.4 KB as uint8, over the cache budget of 1 KB"):
        data = tfd.from_directory(folder, image_size=(16, 16), cache="memory",
                                  cache_budget="1KB")
    assert data.cache == "memory"


def test_disk_cache_writes_files_and_gives_the_same_pixels(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        disk = tfd.from_directory(folder, image_size=(16, 16), cache="disk", shuffle=False)
        plain = tfd.from_directory(folder, image_size=(16, 16), cache=False, shuffle=False)
        np.testing.assert_array_equal(_epoch(disk.train)[0], _epoch(plain.train)[0])
    assert any(name.endswith(".index") for name in os.listdir(os.path.dirname(disk.cache)))
    np.testing.assert_array_equal(_epoch(disk.train)[0], _epoch(plain.train)[0])


def test_webp_and_every_format_match_the_shared_decode(tmp_path):
    """WebP loads; the pipeline feeds exactly what `_images.decode` gives serving."""
    from tftransfer import _images

    x, _ = _write_folder(tmp_path, n_per_class=(3, 3, 3), formats=("png", "jpg", "webp"))
    rgba = np.dstack([np.repeat(x[0][..., None], 3, -1), np.full((16, 16), 200, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "one" / "rgba.webp", lossless=True)
    for channels, size in ((3, (24, 20)), (4, (32, 32)), (1, (16, 16))):
        data = tfd.from_directory(tmp_path, image_size=size, channels=channels,
                                  validation_split=0, shuffle=False, cache=False)
        images, _ = _epoch(data.train)
        paths = sorted(str(p) for p in tmp_path.glob("*/*") if p.is_file())  # listing order
        paths.sort(key=lambda p: SORTED.index(os.path.basename(os.path.dirname(p))))
        expected = np.stack([_images.decode(tf.io.read_file(p), channels, size).numpy()
                             for p in paths])
        assert images.shape == (10, *size, channels) and not data.skipped
        np.testing.assert_array_equal(images, expected)
        if channels == 4:
            assert (images[paths.index(str(tmp_path / "one" / "rgba.webp")), ..., 3] == 200).all()
    webp = [i for i, p in enumerate(paths) if p.endswith("img_002.webp")][0]
    assert np.abs(images[webp, ..., 0] - x[2]).mean() < 3  # lossy WebP of the digit itself


def test_shared_decode_converts_channels_like_tensorflow():
    from tftransfer import _images

    rgb = np.random.default_rng(0).integers(0, 256, (6, 8, 3)).astype(np.uint8)
    png = tf.io.encode_png(rgb)
    gray = _images.decode(png, 1, (6, 8)).numpy()
    np.testing.assert_array_equal(gray, np.round(tf.image.rgb_to_grayscale(
        rgb.astype(np.float32)).numpy()))
    rgba = _images.decode(png, 4, (6, 8)).numpy()
    np.testing.assert_array_equal(rgba[..., :3], rgb)
    assert (rgba[..., 3] == 255).all()
    served = tf.function(lambda b: tf.map_fn(lambda one: _images.decode(one, 3, (3, 4)), b,
                                             fn_output_signature=tf.float32))
    batch = served(tf.stack([png, png])).numpy()
    np.testing.assert_array_equal(batch[0], _images.decode(png, 3, (3, 4)).numpy())


def test_fine_tune_on_a_folder_larger_than_the_memory_budget(tmp_path, digits_target,
                                                              monkeypatch):
    from conftest import SAVED

    from tftransfer import build_finetuner, fine_tune

    x, y = digits_target
    for i in range(200):
        folder = tmp_path / f"digit_{y[i]}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(x[i].astype(np.uint8)).save(folder / f"{i:03d}.png")
    monkeypatch.setenv("TFTRANSFER_CACHE_BUDGET", "4KB")  # 200 images: 614 KB; features too
    data = tfd.from_directory(tmp_path, image_size=(32, 32), batch_size=16, seed=0)
    assert data.cache is None and data.cache_bytes == 200 * 32 * 32 * 3
    model = build_finetuner(str(SAVED / "digits_cnn.keras"), num_classes=5, learning_rate=1e-2)
    with pytest.warns(UserWarning, match="exceed the cache budget of 4 KB.*cached on disk"):
        fine_tune(model, data, head_epochs=8, fine_tune_epochs=0, early_stopping=None,
                  verbose=0)
    images, labels = _epoch(data.validation)
    accuracy = np.mean(np.argmax(model.predict(images, verbose=0), -1) == labels)
    assert accuracy > 0.6  # chance: 0.2

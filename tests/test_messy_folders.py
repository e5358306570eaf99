"""Folders as people keep them: one listing rule for training and predict, every
readable image exactly once per epoch with its own label, the others named, and
EXIF orientation applied by the one shared decode."""

import io
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tftransfer import _images, predict
from tftransfer.data import from_directory

SIZE = 16
# Stored -> shown for EXIF orientation k is Pillow's exif_transpose; its inverse:
STORE = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM,
         5: Image.TRANSPOSE, 6: Image.ROTATE_90, 7: Image.TRANSVERSE, 8: Image.ROTATE_270}


def _upright(tag, size=(30, 40)):
    """An image whose top-left quadrant is white, the rest red=`tag`: the tag is its median."""
    pixels = np.zeros((*size, 3), np.uint8)
    pixels[..., 0], pixels[..., 2] = tag, 90
    pixels[:size[0] // 2, :size[1] // 2] = 255
    return Image.fromarray(pixels)


def _encode(image, fmt, **options):
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _with_orientation(tag, orientation, fmt="JPEG"):
    """The bytes of a file showing `_upright(tag)` once its EXIF orientation is applied."""
    stored = _upright(tag).transpose(STORE[orientation]) if orientation > 1 else _upright(tag)
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"lossless": True} if fmt == "WEBP" else {"quality": 95}
    return _encode(stored, fmt, exif=exif.tobytes(), **options)


def _is_upright(image):
    """Top-left quadrant white, the others not, in a decoded [h, w, 3] image."""
    h, w = image.shape[0] // 2, image.shape[1] // 2
    corners = [image[:h, :w], image[:h, w:], image[h:, :w], image[h:, w:]]
    return [float(c[..., 1].mean()) > 200 for c in corners] == [True, False, False, False]


# A graph, as in the export's serving signature (traced once for all cases).
_SERVED = tf.function(lambda b: (_images.orientation(b), _images.decode(b, 3, (30, 40))),
                      input_signature=[tf.TensorSpec([], tf.string)])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_exif_orientation_decodes_upright(orientation):
    for fmt in ("JPEG", "PNG", "WEBP"):
        found, image = _SERVED(tf.constant(_with_orientation(60, orientation, fmt)))
        assert int(found) == orientation and _is_upright(image.numpy()), (fmt, orientation)
    eager = _images.decode(tf.constant(_with_orientation(60, orientation)), 3, (30, 40))
    assert _is_upright(eager.numpy())


def _solid(tag, size=(24, 24), mode="RGB"):
    pixels = np.zeros((*size, 3), np.uint8)
    pixels[..., 0], pixels[..., 2] = tag, 90
    return Image.fromarray(pixels).convert(mode)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """`(root, {path: (tag, label)} of readable files, [unreadable paths])`."""
    base = tmp_path_factory.mktemp("messy")
    root, outside = base / "photos", base / "elsewhere"
    for folder in ("cats/nested/deeper", "cats/.hidden_folder", "dogs", "elsewhere"):
        (base / ("photos/" + folder if folder != "elsewhere" else folder)).mkdir(parents=True)
    readable, tags = {}, iter(range(20, 250, 6))

    def good(path, encode, label):
        tag = next(tags)
        path.write_bytes(encode(tag))
        readable[str(path)] = (tag, label)

    for k in range(1, 9):  # EXIF 1-8, half in each class
        good(root / ("cats" if k % 2 else "dogs") / f"exif_{k}.jpg",
             lambda t, k=k: _with_orientation(t, k), 0 if k % 2 else 1)
    cats, dogs = root / "cats", root / "dogs"
    good(cats / "plain.png", lambda t: _encode(_solid(t), "PNG"), 0)
    good(cats / "cmyk.jpg", lambda t: _encode(_solid(t, mode="CMYK"), "JPEG", quality=95), 0)
    good(cats / "nested/deeper/gray16.png", lambda t: _encode(
        Image.fromarray(np.full((24, 24), t * 257, np.uint16)), "PNG"), 0)
    good(dogs / "palette.png", lambda t: _encode(
        _solid(t).convert("P", palette=Image.ADAPTIVE), "PNG", transparency=1), 1)
    good(dogs / "animated.gif", lambda t: _encode(
        _solid(t).convert("P", palette=Image.ADAPTIVE), "GIF", save_all=True,
        append_images=[_solid(250).convert("P", palette=Image.ADAPTIVE)]), 1)
    good(dogs / "large.jpg", lambda t: _encode(_solid(t, (3000, 4000)), "JPEG", quality=40), 1)
    good(dogs / "ünïcødé 猫.webp", lambda t: _encode(_solid(t), "WEBP", lossless=True), 1)
    good(outside / "linked.png", lambda t: _encode(_solid(t), "PNG"), 1)
    (dogs / "link.png").symlink_to(outside / "linked.png")
    readable[str(dogs / "link.png")] = readable.pop(str(outside / "linked.png"))
    (dogs / "loop").symlink_to(dogs, target_is_directory=True)  # followed once
    jpeg, png = _encode(_solid(30, (64, 64)), "JPEG"), _encode(_solid(30), "PNG")
    bad = {cats / "truncated.jpg": jpeg[:len(jpeg) // 2], dogs / "truncated.png": png[:-20],
           cats / "empty.jpg": b"", dogs / "notes.jpg": b"shopping list: milk, eggs\n" * 3,
           cats / "scan.tif": _encode(_solid(30), "TIFF")}
    for path, data in bad.items():
        path.write_bytes(data)
    (cats / "._exif_1.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (cats / ".hidden.jpg").write_bytes(jpeg)
    (cats / ".hidden_folder" / "x.jpg").write_bytes(jpeg)
    (dogs / "readme.txt").write_text("not an image")
    return root, readable, sorted(map(str, bad))


def _epoch(dataset):
    images, labels = [], []
    for x, y in dataset:
        images.append(x.numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


def test_every_readable_image_once_per_epoch_with_its_own_label(messy):
    root, readable, bad = messy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = from_directory(root, image_size=(SIZE, SIZE), validation_split=0.0,
                              batch_size=4, shuffle=True)
        epochs = [_epoch(data.train) for _ in range(2)]  # the second from the memory cache
    assert sorted(data.skipped) == bad
    labels = [label for _, label in readable.values()]
    assert data.counts == {"cats": labels.count(0), "dogs": labels.count(1)} == {"cats": 7,
                                                                                "dogs": 9}
    expected = sorted(readable.values())
    for images, labels in epochs:
        seen = sorted(zip(np.median(images[..., 0].reshape(len(images), -1), 1).round()
                          .astype(int).tolist(), labels.tolist()))
        assert len(seen) == len(expected)
        for (tag, label), (want_tag, want_label) in zip(seen, expected):
            assert abs(tag - want_tag) <= 2 and label == want_label
    messages = " ".join(str(w.message) for w in caught)
    assert "scan.tif" in messages and "readme" not in messages and ".txt: 1" in messages


def test_predict_on_the_folder_returns_the_same_readable_set(messy):
    root, readable, bad = messy
    inputs = keras.Input((SIZE, SIZE, 3))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(inputs)))
    with pytest.warns(UserWarning, match=r"Skipped 5 file\(s\).*`skipped`"):
        results = predict(model, root)
    assert sorted(r["path"] for r in results) == sorted(readable)
    assert sorted(results.skipped) == bad
    with pytest.warns(UserWarning, match="Skipped 5"):
        again = predict(model, [str(root)])  # a list holding a folder
    assert [r["path"] for r in again] == [r["path"] for r in results]
    exif = _images.decode(tf.io.read_file(str(root / "dogs" / "exif_6.jpg")), 3, (30, 40))
    assert _is_upright(exif.numpy())
    assert os.path.islink(root / "dogs" / "loop")

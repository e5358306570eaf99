"""The one image decode / channel conversion / resize used everywhere.

Training (``tftransfer.data``), the ``serving_bytes`` export signature and
prediction all turn encoded bytes into model input with :func:`decode`, and
arrays with :func:`fit_image`, so an image gives the same pixels in all three.
Pixels are float32 in ``[0, 255]``, rounded to whole values after resizing,
so that a ``uint8`` cache of them is exact.

Example:
    >>> image = decode(tf.io.read_file("cat.webp"), channels=3, image_size=(224, 224))
"""

import numpy as np
import tensorflow as tf

from tftransfer._checks import invalid

# Formats `tf.io.decode_image` reads, by the first bytes of the file.
EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".webp")
_MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"),
          (b"GIF89a", "gif"), (b"BM", "bmp"))
MIN_BYTES = 26  # smaller than the smallest valid file of any of them (a 1x1 GIF)
# Image formats that `tf.io.decode_image` cannot read: a file with one of these
# extensions is an image the user meant, so listings name it in `skipped`.
UNREADABLE_EXTENSIONS = (".avif", ".heic", ".heif", ".ico", ".jp2", ".jxl", ".psd", ".svg",
                         ".tga", ".tif", ".tiff")
_EXIF_SCAN = 65536  # bytes searched for the EXIF block (JPEG's APP1 comes first)
# What precedes the EXIF block (TIFF header first): JPEG's APP1 (and some WebP
# writers), PNG's eXIf chunk type, WebP's EXIF chunk type and its size.
_EXIF_MARKERS = ((b"Exif\x00\x00", 0), (b"eXIf", 0), (b"EXIF", 4))
_ORIENTATION_TAG = 0x0112
# Methods whose result of 0-255 input stays in 0-255 (weights >= 0): no clip.
_CONVEX = ("area", "bilinear", "nearest")
_RESIZABLE = (tf.uint8, tf.int8, tf.uint16, tf.int16, tf.int32, tf.int64, tf.float16,
              tf.bfloat16, tf.float32, tf.float64)  # what `tf.image.resize` takes as is


def sniff(head: bytes) -> str | None:
    """The format of a file from its first bytes (12 tell them all apart), or ``None``.

    Example:
        >>> sniff(b"\\x89PNG\\r\\n\\x1a\\n\\0\\0\\0\\r")
        'png'
    """
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def check_pixels(array, argument, finite=True):
    """`array` if its pixels are usable 0-255 values, else a ValueError naming `argument`.

    Accepted: uint8; other integers within 0-255; floats without NaN or
    infinity. Refused: bool, integers outside 0-255 (16-bit images: divide
    by 257 first), NaN / infinity (the first bad image is named) unless
    ``finite=False`` (the caller checks them).
    """
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer)
                                   or np.issubdtype(array.dtype, np.floating)):
        raise invalid(argument, "numeric pixels (uint8, or integers / floats in 0-255)", array,
                      f"bool masks are not images: pass `{argument}.astype('uint8') * 255`.",
                      verb="hold")
    if np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8 and array.size \
            and (array.min() < 0 or array.max() > 255):
        raise invalid(argument, "integer pixels in 0-255", array,
                      f"They span {array.min()} to {array.max()}; for 16-bit images pass "
                      f"`({argument} // 257).astype('uint8')`.", verb="hold")
    if finite and np.issubdtype(array.dtype, np.floating):
        ok = np.isfinite(array.reshape(len(array), -1)).all(axis=1)
        if not ok.all():  # worded as `_checks.check_batch` words it
            first = int(np.argmin(ok))
            row = array[first].reshape(-1)
            raise invalid(argument, "finite images (no NaN or infinity)", array,
                          f"The first bad image is at index {first} "
                          f"(it holds {row[~np.isfinite(row)][0]}).")
    return array


def convert_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """Converts a float ``[h, w, n]`` image (n in 1-4, maybe unknown) to ``channels``.

    Gray is tiled to RGB, RGB becomes gray by ``tf.image.rgb_to_grayscale``,
    alpha (n = 2 or 4) is dropped, or added as opaque 255 for ``channels=4``.
    A known ``n`` equal to ``channels`` is returned as is (any ``n``).

    RGB and RGBA from an unknown ``n`` take no ``tf.cond``: a conditional
    cost about 0.1 ms per image in a ``tf.data`` map (8% of a 320x240 JPEG's
    decode and resize, measured here), where a slice and a broadcast to the
    shape they already have cost nothing.

    Args:
        image: Float tensor ``[h, w, n]``.
        channels: Integer, 1, 3 or 4 (or ``n``).

    Returns:
        A float tensor ``[h, w, channels]``.
    """
    have = image.shape[-1]
    if have == channels:
        return image
    if channels not in (1, 3, 4) or have not in (None, 1, 2, 3, 4):
        allowed = sorted({1, 3, 4, have} - {None}) if have in (None, 1, 2, 3, 4) else [have]
        raise invalid("channels", f"one of {allowed} for images with {have or '1-4'} channels",
                      channels)
    n = tf.shape(image)[-1]
    has_rgb = n >= 3
    if channels == 1:  # a conditional: cheaper than computing gray from RGB for all
        gray = tf.cond(has_rgb, lambda: tf.image.rgb_to_grayscale(image[..., :3]),
                       lambda: image[..., :1])
        return tf.ensure_shape(gray, (None, None, 1))
    # RGB, or gray repeated: the first 3 channels or the first one, broadcast to 3.
    first = image[..., :tf.where(has_rgb, 3, 1)]
    size = image.shape[:-1]  # known after resizing: a constant shape, one op fewer
    size = size.as_list() if size.is_fully_defined() else tf.shape(image)[:-1]
    rgb = tf.broadcast_to(first, tf.concat([size, [3]], 0))
    if channels == 3:
        return tf.ensure_shape(rgb, (None, None, 3))
    opaque = tf.constant(255, image.dtype)
    alpha = tf.where(tf.equal(n % 2, 0), image[..., n - 1:], opaque)  # n - 1: the last one
    return tf.ensure_shape(tf.concat([rgb, alpha], -1), (None, None, 4))


def fit_image(image: tf.Tensor, channels: int, image_size, interpolation="bilinear"):
    """``[h, w]`` or ``[h, w, n]`` pixels (any dtype, 0-255) -> float32 ``[H, W, C]``.

    Resizes with ``tf.image.resize(method=interpolation)`` (straight from
    ``uint8``: no float copy of the full-size image), converts the channels,
    clips to ``[0, 255]`` where the result can leave it (float input, or an
    interpolation with negative lobes) and rounds to whole values.

    Args:
        image: Image tensor; 2-D is one gray channel.
        channels: Integer, channels of the result (see `convert_channels`).
        image_size: ``(height, width)`` of the result.
        interpolation: String, a ``tf.image.resize`` method. Defaults to
            ``"bilinear"``.

    Returns:
        A float32 tensor ``[height, width, channels]`` of whole values 0-255.
    """
    image = image[..., None] if image.shape.rank == 2 else image
    in_range = image.dtype == tf.uint8 and interpolation in _CONVEX
    if image.dtype not in _RESIZABLE:
        image = tf.cast(image, tf.float32)
    image = tf.cast(tf.image.resize(image, image_size, method=interpolation), tf.float32)
    image = convert_channels(image, channels)
    return tf.round(image if in_range else tf.clip_by_value(image, 0.0, 255.0))


def orientation(image_bytes: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (1-8) of encoded image bytes, or 1 without a valid one.

    Reads the orientation tag of the first image directory of the EXIF
    block found in the first 64 KB (JPEG's APP1 segment, WebP's EXIF chunk,
    PNG's ``eXIf`` chunk) with string and ``decode_raw`` ops only, so it runs
    inside a serving graph. Bytes without EXIF cost a scan of their head.

    Example:
        >>> orientation(tf.io.read_file("phone.jpg")).numpy()
        6
    """
    head = tf.strings.substr(image_bytes, 0, _EXIF_SCAN)
    tiff = tf.constant(b"")
    for marker, skip in reversed(_EXIF_MARKERS):  # the first marker found wins
        parts = tf.strings.split(head, marker, maxsplit=1)
        after = tf.strings.substr(parts[-1], tf.minimum(skip, tf.strings.length(parts[-1])), -1)
        tiff = tf.where(tf.size(parts) == 2, after, tiff)
    size = tf.strings.length(tiff)
    padded = tf.strings.join([tiff, b"\0" * 8])  # a read at `size` still gets its bytes
    little = tf.equal(tf.strings.substr(padded, 0, 2), b"II")

    def read(position, length, dtype):  # numbers in the TIFF's byte order
        raw = tf.strings.substr(padded, tf.clip_by_value(position, 0, size), length)
        return tf.where(little, tf.io.decode_raw(raw, dtype, little_endian=True),
                        tf.io.decode_raw(raw, dtype, little_endian=False))

    directory = tf.clip_by_value(read(4, 4, tf.int32)[0], 0, size)
    count = tf.cast(read(directory, 2, tf.uint16)[0], tf.int32)
    count = tf.clip_by_value(count, 0, tf.maximum((size - directory - 2) // 12, 0))
    entries = tf.reshape(tf.cast(read(directory + 2, count * 12, tf.uint16), tf.int32), (-1, 6))
    found = tf.reduce_max(tf.where(entries[:, 0] == _ORIENTATION_TAG, entries[:, 4], 0))
    return tf.where((found >= 1) & (found <= 8), found, 1)


def _orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """``image`` as stored -> as shown, for an EXIF orientation 2-8 (like
    Pillow's ``ImageOps.exif_transpose``)."""
    image = tf.cond(orientation >= 5, lambda: tf.transpose(image, (1, 0, 2)), lambda: image)
    mirror = tf.reduce_any(tf.equal(orientation, (2, 3, 6, 7)))
    upside_down = tf.reduce_any(tf.equal(orientation, (3, 4, 7, 8)))
    image = tf.where(mirror, tf.reverse(image, [1]), image)
    return tf.where(upside_down, tf.reverse(image, [0]), image)


def decode(image_bytes: tf.Tensor, channels: int, image_size, interpolation="bilinear"):
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes (a scalar string) -> model input.

    The first frame of an animation is used; 16-bit images are scaled to 8
    bits; the EXIF orientation tag (1-8, see :func:`orientation`) is
    applied, so a phone photo comes out upright. Decoding is exact (no
    approximate JPEG modes). Works eagerly, in ``tf.data.Dataset.map`` and
    in a ``tf.function`` / ``tf.map_fn`` (the export's ``serving_bytes``
    signature runs it, so clients send the file's bytes as they are).
    Raises ``InvalidArgumentError`` when the bytes are not an image.

    Args:
        image_bytes: Scalar string tensor, the file's content.
        channels: Integer, 1, 3 or 4.
        image_size: ``(height, width)``.
        interpolation: String, a ``tf.image.resize`` method. Defaults to
            ``"bilinear"``.

    Returns:
        A float32 tensor ``[height, width, channels]`` of whole values 0-255.

    Example:
        >>> decode(tf.io.read_file("a.png"), 3, (224, 224)).shape
        TensorShape([224, 224, 3])
    """
    # Native channels (1-4; WebP refuses to drop alpha), converted after resizing:
    # bilinear and the others work per channel, so the order changes no pixel. So
    # do flips and transposes: the image is resized to the stored orientation's
    # size (height and width swapped for 5-8), then turned upright.
    turn = orientation(image_bytes)
    height, width = image_size
    size = tf.where(turn >= 5, (width, height), (height, width))
    image = tf.io.decode_image(image_bytes, channels=0, dtype=tf.uint8, expand_animations=False)
    image = fit_image(image, channels, size, interpolation)
    image = tf.cond(tf.equal(turn, 1), lambda: image, lambda: _orient(image, turn))
    return tf.ensure_shape(image, (height, width, channels))

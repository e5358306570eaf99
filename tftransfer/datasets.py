"""Small real image data that ships with scikit-learn, for examples and tests.

The digits data set (1,797 grayscale 8x8 images of handwritten digits) is
bundled inside scikit-learn, so it needs no download. This module turns it
into image batches that look like what image backbones expect.

Example:
    >>> from tftransfer.datasets import load_digits_images, few_shot_split
    >>> x, y = load_digits_images(classes=(5, 6, 7, 8, 9))
    >>> x.shape[1:], x.dtype, int(y.max())
    ((32, 32, 3), dtype('float32'), 4)
    >>> x_few, y_few, x_rest, y_rest = few_shot_split(x, y, per_class=5)
    >>> len(y_few)
    25
"""

import numpy as np

from tftransfer._checks import invalid

_DIGITS_MAX = 16.0
_DIGITS_SIZE = 8


def _validate_classes(classes):
    """Checks `classes` and returns it as a tuple of ints."""
    allowed = "a non-empty sequence of distinct ints in 0..9"
    try:
        values = tuple(classes)
    except TypeError:
        raise invalid("classes", allowed, classes) from None
    ok = (
        len(values) > 0
        and all(isinstance(c, (int, np.integer)) for c in values)
        and not any(isinstance(c, bool) for c in values)
        and all(0 <= c <= 9 for c in values)
        and len(set(int(c) for c in values)) == len(values)
    )
    if not ok:
        raise invalid("classes", allowed, classes)
    return tuple(int(c) for c in values)


def _validate_image_args(image_size, channels):
    """Checks `image_size` and `channels`."""
    if (
        not isinstance(image_size, (int, np.integer))
        or isinstance(image_size, bool)
        or image_size < _DIGITS_SIZE
    ):
        raise invalid("image_size", "an int >= 8", image_size)
    if isinstance(channels, bool) or channels not in (1, 3):
        raise invalid("channels", "one of (1, 3)", channels)


def _resize(images, image_size):
    """Bilinearly resizes `[n, 8, 8, 1]` images and clips them to 0..255."""
    import tensorflow as tf

    if image_size == _DIGITS_SIZE:
        resized = images
    else:
        resized = tf.image.resize(
            images, (image_size, image_size), method="bilinear"
        ).numpy()
    return np.clip(resized, 0.0, 255.0).astype(np.float32)


def load_digits_images(classes=(0, 1, 2, 3, 4), image_size=32, channels=3):
    """Loads scikit-learn's 8x8 digits as float images in the 0-255 range.

    Pixel values 0..16 are scaled by 255/16, resized bilinearly from 8x8 to
    `image_size` x `image_size` with `tf.image.resize`, clipped to [0, 255]
    and the gray channel is replicated to `channels`. Labels are remapped to
    `0..len(classes) - 1` in the order of `classes`. The result is
    deterministic (same order on every call).

    Args:
        classes: Distinct digits in 0..9 to keep. `classes[i]` becomes label i.
        image_size: Output height and width, an int >= 8.
        channels: 1 (grayscale) or 3 (gray replicated to RGB).

    Returns:
        A tuple `(x, y)`: `x` float32 `[n, image_size, image_size, channels]`
        with values in 0-255, `y` int32 `[n]`.

    Raises:
        ValueError: If an argument is invalid.

    Example:
        >>> x, y = load_digits_images(classes=(3, 8), image_size=16, channels=1)
        >>> x.shape[1:], sorted(set(y.tolist()))
        ((16, 16, 1), [0, 1])
    """
    classes = _validate_classes(classes)
    _validate_image_args(image_size, channels)
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.isin(digits.target, classes)
    images = digits.images[keep].astype(np.float32) * (255.0 / _DIGITS_MAX)
    x = _resize(images[..., np.newaxis], image_size)
    if channels == 3:
        x = np.repeat(x, 3, axis=-1)
    lookup = {c: i for i, c in enumerate(classes)}
    y = np.array([lookup[int(t)] for t in digits.target[keep]], dtype=np.int32)
    return x, y


def few_shot_split(x, y, per_class, seed=0):
    """Splits off `per_class` examples of every label, chosen with `seed`.

    Args:
        x: Array of examples, first axis aligned with `y`.
        y: 1-D array of integer labels.
        per_class: Number of examples to keep for every label, an int >= 1.
        seed: Seed of the random choice.

    Returns:
        A tuple `(x_few, y_few, x_rest, y_rest)`. The few-shot part holds
        exactly `per_class` examples of each label (grouped by label); the
        rest keeps the original order.

    Raises:
        ValueError: If `per_class` is invalid, `x` and `y` do not align, or a
            label has fewer than `per_class` examples.

    Example:
        >>> x, y = load_digits_images(classes=(0, 1))
        >>> x_few, y_few, x_rest, y_rest = few_shot_split(x, y, per_class=3)
        >>> y_few.tolist()
        [0, 0, 0, 1, 1, 1]
    """
    if (
        not isinstance(per_class, (int, np.integer))
        or isinstance(per_class, bool)
        or per_class < 1
    ):
        raise invalid("per_class", "an int >= 1", per_class)
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim != 1 or len(x) != len(y):
        raise ValueError(
            "Expected `x` and `y` with the same number of examples and 1-D `y`. "
            f"Received: x.shape={x.shape}, y.shape={y.shape}"
        )
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(y):
        indices = np.flatnonzero(y == label)
        if len(indices) < per_class:
            raise ValueError(
                f"Label {label} has only {len(indices)} examples, fewer than "
                f"`per_class`. Received: per_class={per_class}"
            )
        chosen.append(np.sort(rng.choice(indices, per_class, replace=False)))
    few = np.concatenate(chosen)
    rest = np.setdiff1d(np.arange(len(y)), few)
    return x[few], y[few], x[rest], y[rest]

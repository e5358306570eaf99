"""Test-time augmentation: scores averaged over flipped and cropped views.

`predict(model, images, tta=True)` calls `averaged(call, images, views)`:
the model scores each view of a batch (the images themselves, a horizontal
flip, and four corner crops of `CROP` of each side resized back to the input
size) and the scores are averaged. A view is a plain function of a batch of
0-255 images, so every form of model predict reads (Keras, export, .tflite)
gets the same views.

Example:

>>> predict("runs/a/model.keras", "photos/", tta=True)
>>> predict(model, x, tta=["crops"])       # no flip (e.g. for text or digits)
"""

import numpy as np
import tensorflow as tf

CROP = 0.9  # side of the corner crops, as a fraction of the image's


def _flip(images):
    return images[:, :, ::-1]


def _crops(images):
    """The four corner crops, each resized back to the input size."""
    height, width = images.shape[1:3]
    h, w = max(1, round(height * CROP)), max(1, round(width * CROP))
    views = []
    for top, left in ((0, 0), (0, width - w), (height - h, 0), (height - h, width - w)):
        crop = images[:, top:top + h, left:left + w]
        views.append(tf.image.resize(crop, (height, width), method="bilinear").numpy())
    return views


_VIEWS = {"flip": lambda images: [_flip(images)], "crops": _crops}
VIEW_NAMES = tuple(_VIEWS)


def resolve(tta):
    """`tta` -> the tuple of view names (empty: no augmentation).

    Args:
        tta: False/None, True (every view: `"flip"` and `"crops"`), or a
            list of names from `VIEW_NAMES`.
    """
    if tta is None or tta is False:
        return ()
    if tta is True:
        return VIEW_NAMES
    names = [tta] if isinstance(tta, str) else list(tta) if isinstance(tta, (list, tuple)) else None
    if not names or any(name not in _VIEWS for name in names):
        raise ValueError(f"`tta` must be True, False or a list of view names; allowed values: "
                         f"{list(VIEW_NAMES)}. Received: tta={tta!r}")
    return tuple(dict.fromkeys(names))


def averaged(call, images, views):
    """The mean of `call`'s scores over the images and their `views`.

    Args:
        call: A function from float `[n, H, W, C]` 0-255 images to `[n, k]`
            scores (numpy).
        images: float `[n, H, W, C]`.
        views: View names from `resolve`.

    Returns:
        float64 `[n, k]` averaged scores.
    """
    images = np.asarray(images, np.float32)
    batches = [images] + [view for name in views for view in _VIEWS[name](images)]
    return np.mean([np.asarray(call(batch), np.float64) for batch in batches], axis=0)

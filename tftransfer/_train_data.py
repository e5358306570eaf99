"""The data `fine_tune` trains on, whatever form it came in.

`TrainData.of` turns a batched `tf.data.Dataset`, a tuple `(x, y)` of arrays
or a `tftransfer.data.ImageData` into train / validation datasets, and keeps
what the rest of the run asks of the data: class names and weights, whether
it is augmented, and a fingerprint a resumed run must match.
"""

import hashlib

import numpy as np
import tensorflow as tf


class TrainData:
    """The train / validation datasets and what the run needs to know of them."""

    def __init__(self, train, validation, class_weight, augmented, class_names=None,
                 shuffle=True):
        self.train, self.validation, self.shuffle = train, validation, shuffle
        self.class_weight, self.augmented = class_weight, augmented
        self.class_names = class_names
        self.arrays = self.image_data = None

    @classmethod
    def of(cls, train, validation, class_weight, batch_size, shuffle):
        """Normalizes `fine_tune`'s `train` / `validation` arguments."""
        augmented, names, image_data = False, None, None
        if hasattr(train, "train") and hasattr(train, "class_names"):  # ImageData
            validation = train.validation if validation is None else validation
            class_weight = train.class_weight if class_weight is None else class_weight
            augmented, names = bool(getattr(train, "augmented", False)), train.class_names
            image_data, train = train, train.train
        data = cls(dataset(train, batch_size, shuffle, "train"),
                   dataset(validation, batch_size, False, "validation"), class_weight,
                   augmented, names, shuffle)
        data.arrays = train if isinstance(train, (tuple, list)) else None
        data.image_data = image_data
        _check_not_empty(data.validation, image_data)
        return data

    def adopt_class_names(self, model):
        """Gives the model the data's class names when it has none."""
        if model.class_names is None and self.class_names is not None \
                and len(self.class_names) == model.num_classes:
            model.class_names = self.class_names

    def warn_if_unit_range(self, model):
        """Warns (once) when the images look like 0-1 data; peeks one batch of a
        dataset (not of an ImageData: tftransfer.data delivers 0-255)."""
        if self.arrays is not None:
            model.warn_if_unit_range(self.arrays[0], "train")
        elif self.image_data is None:
            for batch in self.train.take(1):
                model.warn_if_unit_range(np.asarray(batch[0]), "train")

    def fingerprint(self):
        """A digest of the training data: its arrays' bytes; an ImageData's
        classes, counts, size and listing key; a dataset's element spec, size
        and first batch."""
        h = hashlib.blake2b(digest_size=16)
        if self.image_data is not None:
            d = self.image_data
            h.update(repr((d.class_names, d.counts, d.image_size, d.channels,
                           getattr(d, "fingerprint", None))).encode())
            parts = []
        elif self.arrays is not None:
            parts = self.arrays
        else:
            parts = [np.asarray(t) for batch in self.train.take(1) for t in batch[:2]]
        h.update(repr(self.train.element_spec).encode())
        h.update(str(int(self.train.cardinality())).encode())
        for part in parts:
            array = np.ascontiguousarray(np.asarray(part))
            h.update(f"{array.dtype.str}{array.shape}".encode())
            h.update(array.tobytes())
        return h.hexdigest()


def dataset(data, batch_size, shuffle, name):
    """`data` as a batched dataset (None stays None)."""
    if data is None or isinstance(data, tf.data.Dataset):
        return data
    if hasattr(data, "train") and hasattr(data, "class_names"):
        return data.train
    if isinstance(data, (tuple, list)) and len(data) == 2:
        ds = tf.data.Dataset.from_tensor_slices(tuple(data))
        if shuffle:
            ds = ds.shuffle(len(data[1]), seed=0, reshuffle_each_iteration=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    raise ValueError(
        f"`{name}` must be a batched tf.data.Dataset, a tuple (x, y) or an ImageData. "
        f"Received: {name} of type {type(data).__name__}"
    )


def _check_not_empty(validation, image_data):
    """Refuses validation data without a single batch (a split too small to
    leave an image in any class), which no metric can be computed on."""
    if validation is None or int(validation.cardinality()) != 0:
        return
    origin = ("the ImageData's validation split is empty: too few images per class "
              f"({image_data.counts}) for its `validation_split`. Load the data with a larger "
              "`validation_split` or more images, pass `validation` yourself, or load it "
              "with validation_split=0 to train without validation"
              if image_data is not None else "pass a dataset with at least one batch, or None")
    raise ValueError(f"`validation` holds no images: {origin}. "
                     "Received: validation with 0 batches")

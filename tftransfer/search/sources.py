"""The one adapter between a search's `data:` section and tftransfer's loaders.

Kept small on purpose: `tftransfer.data` is still changing, so the search
only touches `from_directory` / `from_tfds` here.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from tftransfer.datasets import few_shot_split, load_digits_images

_PIPELINE_BATCH = 32


@dataclasses.dataclass
class SearchData:
    """Training and validation data of a search.

    Attributes:
        train / validation: `(x, y)` arrays, or batched `tf.data.Dataset`s.
        class_names: One name per class.
        input_shape: `(height, width, channels)` of the images.
        num_train: Number of training examples (an estimate for streams).
    """

    train: object
    validation: object
    class_names: list
    input_shape: tuple
    num_train: int

    @property
    def num_classes(self):
        return len(self.class_names)

    def batched(self, batch_size, replicas=1):
        """Returns `(train, validation)` ready for `fine_tune` at a global batch size.

        With several replicas every batch must split evenly between them:
        arrays are cut to a multiple of `replicas`, streams drop their last
        partial batch.
        """
        if isinstance(self.train, tuple):
            return _trim(self.train, replicas), _trim(self.validation, replicas)
        return (_rebatch(self.train, batch_size, replicas > 1),
                _rebatch(self.validation, batch_size, replicas > 1))


def _trim(arrays, replicas):
    x, y = arrays
    n = len(y) - len(y) % replicas
    return x[:n], y[:n]


def _rebatch(ds, batch_size, drop_remainder):
    return ds.unbatch().batch(batch_size, drop_remainder=drop_remainder).prefetch(
        tf.data.AUTOTUNE)


def load(data_cfg):
    """Loads the data a `data:` config section describes.

    Args:
        data_cfg: The validated `data` section.

    Returns:
        A `SearchData`.
    """
    source = data_cfg["source"]
    if source == "digits":
        return _digits(data_cfg)
    if source.startswith("tfds:"):
        return _from_image_data(_tfds(data_cfg), data_cfg)
    if data_cfg.get("kind") == "text":
        return _text(data_cfg)
    from tftransfer.data import from_directory

    data = from_directory(source, image_size=tuple(data_cfg["image_size"]),
                          channels=data_cfg["channels"], batch_size=_PIPELINE_BATCH,
                          validation_split=data_cfg["validation_split"],
                          seed=data_cfg["seed"])
    return _from_image_data(data, data_cfg)


def _digits(cfg):
    height, width = cfg["image_size"]
    if height != width:
        raise ValueError(f"The digits data is square; data.image_size must be [n, n]. "
                         f"Received: {cfg['image_size']}")
    x, y = load_digits_images(classes=tuple(cfg["classes"]), image_size=height,
                              channels=cfg["channels"])
    order = np.random.default_rng(cfg["seed"]).permutation(len(y))
    n_val = max(1, int(round(len(y) * cfg["validation_split"])))
    val, train = order[:n_val], order[n_val:]
    x_train, y_train = x[train], y[train]
    if cfg["per_class"]:
        x_train, y_train, _, _ = few_shot_split(x_train, y_train, cfg["per_class"],
                                                seed=cfg["seed"])
    return SearchData((x_train, y_train), (x[val], y[val]),
                      [str(c) for c in cfg["classes"]], (height, width, cfg["channels"]),
                      len(y_train))


def _tfds(cfg):
    from tftransfer.data import from_tfds

    percent = int(round(100 * (1 - cfg["validation_split"])))
    return from_tfds(cfg["source"][len("tfds:"):],
                     split=(f"train[:{percent}%]", f"train[{percent}%:]"),
                     image_size=tuple(cfg["image_size"]), channels=cfg["channels"],
                     batch_size=_PIPELINE_BATCH, seed=cfg["seed"])


def _from_image_data(data, cfg):
    if data.validation is None:
        raise ValueError("The search needs validation data: set data.validation_split > 0.")
    if data.counts:
        num_train = sum(data.counts.values())
    else:
        batches = int(data.train.cardinality())
        num_train = batches * _PIPELINE_BATCH if batches > 0 else 1000
    return SearchData(data.train, data.validation, list(data.class_names),
                      (*cfg["image_size"], cfg["channels"]), num_train)


def _text(cfg):
    """A folder of `.txt` files per class: strings in, no image shape."""
    from tftransfer.data import from_text_directory

    data = from_text_directory(cfg["source"], batch_size=_PIPELINE_BATCH,
                               validation_split=cfg["validation_split"], seed=cfg["seed"])
    if data.validation is None:
        raise ValueError("The search needs validation data: set data.validation_split > 0.")
    return SearchData(data.train, data.validation, list(data.class_names), (),
                      sum(data.counts.values()))

"""Stage-1 backbone features shared between runs through a directory.

The features of a frozen backbone depend only on the backbone (its weights,
layers and preprocessing) and on each image, not on the head or the other
settings of a run. `FeatureStore` keeps them in
`<directory>/<backbone key>/<shard>.npz`, each shard holding `digests` (a
16-byte hash per image) and `features`, so the trials of a search, in one
process or in one process each, run the backbone over the data once.

Shards are named by the images they hold and written to a temporary file
that is then renamed, so runs that share the directory never read a partial
file, and a run that adds nothing writes nothing.
"""

import hashlib
import json
import os
import uuid
import warnings
import zipfile

import numpy as np

_DIGEST_BYTES = 16


def backbone_key(model):
    """A hex key that changes whenever the features of a FineTuner's backbone could change.

    It covers the source (and the file's size and time when it is a path),
    the preprocessing layer's config, the backbone's layer classes, output
    shape and dtype, and the bytes of all its weights (trainable or not), so
    a backbone changed by an earlier fine-tune gets its own key.
    """
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    backbone = model.backbone
    source = model.source or backbone.name
    preprocessing = model.preprocessing.get_config()
    h.update(json.dumps([str(source), _stat(source), preprocessing,
                         [type(layer).__name__ for layer in backbone.layers],
                         str(backbone.output.shape), str(backbone.compute_dtype)],
                        sort_keys=True, default=str).encode())
    for weight in backbone.weights:
        value = np.ascontiguousarray(np.asarray(weight))
        h.update(f"{value.dtype.str}{value.shape}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def _stat(source):
    path = os.path.join(source, "saved_model.pb") if os.path.isdir(source) else source
    if not os.path.isfile(path):
        return None
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def digests(images):
    """One 16-byte hash per image of a batch (its dtype, shape and bytes)."""
    images = np.asarray(images)
    if images.dtype == object:  # a batch of strings (text): hash their bytes
        return [hashlib.blake2b(b"text:" + bytes(text), digest_size=_DIGEST_BYTES).digest()
                for text in images]
    head = f"{images.dtype.str}{images.shape[1:]}".encode()
    return [hashlib.blake2b(head + np.ascontiguousarray(image).tobytes(),
                            digest_size=_DIGEST_BYTES).digest() for image in images]


class FeatureStore:
    """The features a directory holds for one backbone, and the ones added.

    Args:
        directory: The shared directory (created on the first write).
        key: `backbone_key(model, backbone)`.
    """

    def __init__(self, directory, key):
        self.directory = os.path.join(os.fspath(directory), key)
        self.rows, self.added = {}, {}
        for name in sorted(os.listdir(self.directory)) if os.path.isdir(self.directory) else []:
            if name.endswith(".npz"):
                self._read(os.path.join(self.directory, name))

    def _read(self, path):
        try:
            with np.load(path) as shard:
                keys = [row.tobytes() for row in shard["digests"]]
                self.rows.update(zip(keys, shard["features"]))
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
            warnings.warn(f"Ignoring the unreadable feature cache file {path!r} ({e}); the "
                          "features it held are computed again.", stacklevel=5)  # fine_tune's caller

    def features(self, images, extract):
        """The features of a batch: from the store, else `extract(images)`.

        Args:
            images: A batch of images (a tensor or array).
            extract: Callable mapping the batch to its features.

        Returns:
            A NumPy array of features, one row per image.
        """
        keys = digests(images)
        if all(k in self.rows for k in keys):
            return np.stack([self.rows[k] for k in keys])
        values = np.asarray(extract(images))
        for k, value in zip(keys, values):
            self.rows[k] = self.added[k] = value
        return values

    def save(self):
        """Writes the features added since the last save as one new shard."""
        if not self.added:
            return
        keys = sorted(self.added)
        name = hashlib.blake2b(b"".join(keys), digest_size=8).hexdigest() + ".npz"
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, name)
        tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, digests=np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), -1),
                     features=np.stack([self.added[k] for k in keys]))
        os.replace(tmp, path)
        self.added = {}

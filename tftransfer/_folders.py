"""Image folders: a cheap listing, and the files that fail to decode while reading.

Listing never decodes: a file is kept when its extension is an image one, it
is not too small to be an image and its first bytes are those of a format
``tf.io.decode_image`` reads. Files that pass that check and still fail to
decode are dropped from the pipeline (``ignore_errors``) and named by a
:class:`ReadCheck` at the end of the first full pass over their split.
"""

import collections
import concurrent.futures
import os
import warnings

import numpy as np
import tensorflow as tf

from tftransfer import _images

_plain = tf.autograph.experimental.do_not_convert  # no AutoGraph needed: fast to build
Listing = collections.namedtuple("Listing", "classes paths labels bad excluded")
_SHOWN = 5  # file names a warning shows before "..."


def _is_image(path: str) -> bool:
    """Whether a file is big enough to be an image and starts like one."""
    try:
        fd = os.open(path, os.O_RDONLY)  # no Python file object: 20,000 files in ~0.2 s
        try:
            head = os.read(fd, _images.MIN_BYTES)
        finally:
            os.close(fd)
    except OSError:
        return False
    return len(head) >= _images.MIN_BYTES and _images.sniff(head) is not None


def _scan(folder: str):
    """``(good paths, bad paths, Counter of left-out extensions)`` of a folder tree."""
    good, bad, excluded, subfolders = [], [], collections.Counter(), []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            subfolders.append(entry.path)
            continue
        extension = os.path.splitext(entry.name)[1].lower()
        if extension not in _images.EXTENSIONS:
            excluded[extension or "(none)"] += 1
        else:
            (good if _is_image(entry.path) else bad).append(entry.path)
    for path in subfolders:
        more = _scan(path)
        good, bad = good + more[0], bad + more[1]
        excluded.update(more[2])
    return good, bad, excluded


def list_images(root, classes) -> Listing:
    """Lists ``root/<class>/**`` for each class, one thread per class folder."""
    with concurrent.futures.ThreadPoolExecutor(min(8, len(classes))) as pool:
        scans = list(pool.map(_scan, [os.path.join(root, c) for c in classes]))
    paths, labels, bad, excluded = [], [], [], collections.Counter()
    for label, (good, broken, left_out) in enumerate(scans):
        paths, bad = paths + good, bad + broken
        labels += [label] * len(good)
        excluded.update(left_out)
    return Listing(classes, paths, np.asarray(labels, np.int32), bad, excluded)


def _names(paths) -> str:
    return ", ".join(paths[:_SHOWN]) + ", ..." * (len(paths) > _SHOWN)


def listing_warning(bad, excluded) -> str | None:
    """One message for the files a listing left out, or ``None``."""
    parts = []
    if bad:
        parts.append(f"Skipped {len(bad)} file(s) that could not be decoded as images (empty, "
                     f"or not JPEG/PNG/GIF/BMP/WebP by their first bytes): {_names(bad)}. "
                     "See ImageData.skipped for the full list.")
    if excluded:
        counts = ", ".join(f"{ext}: {n}" for ext, n in sorted(excluded.items()))
        parts.append(f"Left out {sum(excluded.values())} file(s) without an image extension "
                     f"({counts}); images are read from {', '.join(_images.EXTENSIONS)}.")
    return " ".join(parts) or None


class ReadCheck:
    """Names the files of one split that fail to decode during its first full pass.

    ``apply`` drops the failing elements (``ignore_errors``) and, through a
    Python call per ``batch`` elements, records the indices that came
    through; an end marker after the last element triggers :meth:`finish` (a begin
    marker restarts the count of a pass).
    So that the split keeps its length (Keras knows the steps of an epoch),
    each element dropped in a pass is replaced by a second copy of one of
    the split's readable images, taken from its start, with its own label.

    Args:
        paths: All listed paths (the elements carry indices into it).
        labels: Their integer labels.
        split: Integer array, the indices of this split.
        name: ``"train"`` or ``"validation"``.
        batch: Elements per Python call.
    """

    def __init__(self, paths, labels, split, name, batch=64):
        self.paths, self.labels, self.split = paths, labels, np.asarray(split)
        self.name, self.batch = name, batch
        self.seen, self.done, self.data = np.zeros(len(paths), bool), False, None
        self.count = self.missing = 0

    def apply(self, ds: tf.data.Dataset, load) -> tf.data.Dataset:
        """``(image, label, index)`` elements from ``load(index)`` -> ``(image, label)``
        ones, unreadable ones replaced; the cardinality is the split's size."""
        zeros = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
        begin, end = (tf.data.Dataset.from_tensors((*zeros[:2], tf.constant(i, zeros[2].dtype)))
                      for i in (-2, -1))  # markers of a pass, for the count of each pass
        ds = begin.concatenate(ds.ignore_errors()).concatenate(end).batch(self.batch)
        ds = ds.map(_plain(self._record)).unbatch()
        refill = tf.data.Dataset.from_tensor_slices(self.split).map(load).ignore_errors()
        refill = refill.map(_plain(lambda image, label, index: (image, label)))
        ds = ds.concatenate(tf.data.Dataset.range(1).flat_map(_plain(
            lambda _: refill.take(tf.numpy_function(self._missing, [], tf.int64, stateful=True)))))
        return ds.apply(tf.data.experimental.assert_cardinality(len(self.split)))

    def _missing(self):
        return np.int64(self.missing)

    def _record(self, images, labels, index):
        rows = tf.numpy_function(self._seen, [index], tf.int64, stateful=True)
        rows.set_shape([None])
        whole = tf.equal(tf.size(rows), tf.size(index))  # no marker: no copy
        return tf.cond(whole, lambda: (images, labels),
                       lambda: (tf.gather(images, rows), tf.gather(labels, rows)))

    def _seen(self, index):
        """Rows of real elements in a batch of indices (the end marker is -1)."""
        good = index[index >= 0]
        self.count = len(good) + (0 if (index == -2).any() else self.count)
        if not self.done:
            self.seen[good] = True
        if (index == -1).any():  # the end marker: a full pass
            self.missing = max(0, len(self.split) - self.count)
            if not self.done:
                self.finish()
        return np.flatnonzero(index >= 0).astype(np.int64)

    def finish(self):
        """Reports the split's files not seen in a full pass (once)."""
        self.done = True
        missing = [self.paths[i] for i in self.split[~self.seen[self.split]]]
        if not missing:
            return
        if self.data is not None:
            self.data.skipped.extend(missing)
            if self.name == "train" and self.data.counts:
                for i in self.split[~self.seen[self.split]]:
                    label = self.data.class_names[self.labels[i]]
                    self.data.counts[label] -= 1
        warnings.warn(f"Skipped {len(missing)} file(s) of the {self.name} split that could "
                      f"not be decoded as images while reading: {_names(missing)}. See "
                      "ImageData.skipped for the full list.", stacklevel=2)

"""Image folders: one listing rule, and the files that fail to decode while reading.

The rule, shared by ``tftransfer.data`` and ``tftransfer.predict``:

- names starting with ``.`` (hidden files and folders, macOS's AppleDouble
  ``._IMG_0001.jpg``) are ignored; symbolic links are followed, each folder
  once;
- a file with an image extension ``tf.io.decode_image`` reads (``.jpg``,
  ``.png``, ...) is kept when its first bytes are those of such an image and
  its end is there (JPEG's end marker, PNG's ``IEND`` chunk, GIF's trailer,
  the sizes BMP and WebP declare): one read of its first and last bytes,
  no decoding. Otherwise (empty, text, truncated) it is *skipped* (named);
- a file with the extension of an image format TensorFlow does not read
  (``.tif``, ``.heic``, ...) is skipped (named);
- other files are left out (counted by extension).

Files that pass and still fail to decode are dropped from the pipeline
(``ignore_errors``) and named by a :class:`ReadCheck` at the end of the
first full pass over their split.
"""

import collections
import concurrent.futures
import os
import warnings

import numpy as np
import tensorflow as tf

from tftransfer import _images

Listing = collections.namedtuple("Listing", "classes paths labels bad excluded")
_SHOWN = 5  # file names a warning shows before "..."
_HEAD, _TAIL = 32, 1024  # bytes read at each end of a file


def _whole(kind: str, head: bytes, tail: bytes, size: int) -> bool:
    """Whether a file of format ``kind`` ends where its format says it ends."""
    if kind == "jpeg":  # EOI; some cameras pad after it
        return b"\xff\xd9" in tail
    if kind == "png":
        return b"IEND" in tail
    if kind == "gif":
        return tail.rstrip(b"\0").endswith(b";")
    if kind == "bmp":
        return int.from_bytes(head[2:6], "little") <= size
    return int.from_bytes(head[4:8], "little") + 8 <= size  # webp: RIFF's size


def is_image(path: str) -> bool:
    """Whether a file starts and ends like a JPEG/PNG/GIF/BMP/WebP image."""
    try:
        fd = os.open(path, os.O_RDONLY)  # no Python file object: 20,000 files in ~0.2 s
        try:
            head = os.read(fd, _HEAD)
            size = os.fstat(fd).st_size
            tail = os.pread(fd, _TAIL, max(size - _TAIL, 0)) if size > len(head) else head
        finally:
            os.close(fd)
    except OSError:
        return False
    kind = _images.sniff(head) if len(head) >= _images.MIN_BYTES else None
    return kind is not None and _whole(kind, head, tail, size)


def _scan(folder: str, seen=None):
    """``(good paths, bad paths, Counter of left-out extensions)`` of a folder tree."""
    seen = set() if seen is None else seen
    real = os.path.realpath(folder)
    if real in seen:  # a symbolic link back up the tree
        return [], [], collections.Counter()
    seen.add(real)
    good, bad, excluded, subfolders = [], [], collections.Counter(), []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            subfolders.append(entry.path)
        else:
            _sort_file(entry.path, good, bad, excluded)
    for path in subfolders:
        more = _scan(path, seen)
        good, bad = good + more[0], bad + more[1]
        excluded.update(more[2])
    return good, bad, excluded


def _sort_file(path, good, bad, excluded):
    """Appends ``path`` to ``good`` or ``bad``, or counts its extension."""
    extension = os.path.splitext(path)[1].lower()
    if extension in _images.EXTENSIONS:
        (good if is_image(path) else bad).append(path)
    elif extension in _images.UNREADABLE_EXTENSIONS:
        bad.append(path)
    else:
        excluded[extension or "(none)"] += 1


def list_paths(paths):
    """``(good, bad, excluded)`` of files and folders (recursively), in order.

    A file named directly is kept or skipped by the same rule, whatever its
    extension (only a folder's files are chosen by extension).

    Raises:
        ValueError: A path that does not exist.
    """
    good, bad, excluded = [], [], collections.Counter()
    for path in paths:
        if os.path.isdir(path):
            more = _scan(path)
            good, bad = good + more[0], bad + more[1]
            excluded.update(more[2])
        elif os.path.isfile(path):
            (good if is_image(path) else bad).append(path)
        else:
            raise ValueError(f"`images` names a path that does not exist. Received: {path!r}")
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


def listing_warning(bad, excluded, where="ImageData.skipped") -> str | None:
    """One message for the files a listing left out, or ``None``."""
    parts = []
    if bad:
        parts.append(f"Skipped {len(bad)} file(s) that could not be decoded as images (empty, "
                     "truncated, or not JPEG/PNG/GIF/BMP/WebP by their first bytes): "
                     f"{_names(bad)}. See {where} for the full list.")
    if excluded:
        counts = ", ".join(f"{ext}: {n}" for ext, n in sorted(excluded.items()))
        parts.append(f"Left out {sum(excluded.values())} file(s) without an image extension "
                     f"({counts}); images are read from {', '.join(_images.EXTENSIONS)}.")
    return " ".join(parts) or None


class ReadCheck:
    """Names the files of one split that fail to decode, by the end of its first full pass.

    Upstream of any cache, :meth:`fill` drops the elements whose file fails
    to decode (``ignore_errors``) and tops each pass up to the split's length
    with second copies of the split's readable images (taken from its start),
    so that Keras knows the steps of an epoch. The pipeline's per-batch step
    (``_pipeline``) calls :meth:`record` with each batch's file indices, in
    order, and :meth:`finish` on the last batch of a pass, which reports the
    files never read (once: a warning, ``ImageData.skipped`` and the
    training ``ImageData.counts``).

    Args:
        paths: All listed paths (the elements carry indices into it).
        labels: Their integer labels.
        split: Integer array, the indices of this split.
        name: ``"train"`` or ``"validation"``.
    """

    def __init__(self, paths, labels, split, name):
        self.paths, self.labels, self.split, self.name = paths, labels, np.asarray(split), name
        self.seen, self.done, self.data = np.zeros(len(paths), bool), False, None

    def fill(self, ds: tf.data.Dataset, spare: tf.data.Dataset) -> tf.data.Dataset:
        """Loaded elements -> the readable ones, topped up from ``spare`` (the
        split's elements, loaded in order) to the split's size."""
        size = len(self.split)
        ds = ds.ignore_errors().concatenate(spare.ignore_errors().repeat()).take(size)
        return ds.apply(tf.data.experimental.assert_cardinality(size))  # (empty repeat ends)

    def record(self, index):
        """Marks a batch of file indices as read."""
        if not self.done:
            self.seen[index] = True

    def finish(self):
        """Reports the split's files not read in a full pass (once)."""
        if self.done:
            return
        self.done = True
        unread = self.split[~self.seen[self.split]]
        if not len(unread):
            return
        missing = [self.paths[i] for i in unread]
        if self.data is not None:
            self.data.skipped.extend(missing)
            if self.name == "train" and self.data.counts:
                for i in unread:
                    self.data.counts[self.data.class_names[self.labels[i]]] -= 1
        warnings.warn(f"Skipped {len(missing)} file(s) of the {self.name} split that could "
                      f"not be decoded as images while reading: {_names(missing)}. See "
                      "ImageData.skipped for the full list.", stacklevel=2)

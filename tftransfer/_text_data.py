"""Text data: ``tf.data`` pipelines of ``(string [b], labels)`` for text FineTuners.

Three loaders, re-exported by ``tftransfer.data``: ``from_text_directory``
(one subfolder of ``.txt`` files per class, the layout of
``keras.utils.text_dataset_from_directory``), ``from_csv`` (a text column
and a label column, or several 0/1 label columns for multi-label data) and
``from_text_arrays`` (``from_arrays`` dispatches here for strings). Each
returns a ``TextData``, the text twin of ``ImageData``, so ``fine_tune``,
the search and ``model.fit`` take it alike.

A folder is streamed: the pipeline holds file paths and reads each file per
epoch (``tf.io.read_file``), so memory stays flat in the number of files.
Files that are not UTF-8 or hold only whitespace are listed in ``skipped``
(the listing reads each file once and keeps nothing).

Example:
    >>> data = from_text_directory("saved_models/newsgroups", validation_split=0.2)
    >>> data.class_names
    ['atheism', 'space']
"""

import csv
import dataclasses
import hashlib
import os
import warnings

import numpy as np
import tensorflow as tf

from tftransfer import _settings

TEXT_EXTENSIONS = (".txt",)


@dataclasses.dataclass
class TextData:
    """Text datasets plus what a trainer needs to know about them.

    Attributes:
        train / validation: Batched ``(texts, labels)``: ``tf.string [b]`` and
            ``int32 [b]`` (``float32 [b, k]`` for multi-label data);
            validation is ``None`` without a split and is never shuffled.
        class_names / num_classes: Label ``i`` is ``class_names[i]``.
        class_weight: ``{class_index: weight}`` for ``Model.fit``, or ``None``.
        skipped: Files (or ``"row N"`` of arrays and CSV files) left out:
            empty texts and files that are not UTF-8.
        counts: ``{class_name: texts}`` of the training split.
        multi_label: Whether labels are 0/1 vectors.
        fingerprint: A digest of the texts (or file listing) and labels.
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    class_names: list[str]
    num_classes: int
    class_weight: dict[int, float] | None = None
    skipped: list[str] = dataclasses.field(default_factory=list)
    counts: dict[str, int] | None = None
    multi_label: bool = False
    fingerprint: str | None = None
    augmented = False  # text is never augmented: frozen features can be cached
    cache = None
    image_size = None  # read by fine_tune's run fingerprint, as for an ImageData
    channels = None


# ------------------------------------------------------------------ checks


def _check_split(validation_split):
    if not isinstance(validation_split, (int, float)) or isinstance(validation_split, bool) \
            or not 0 <= validation_split < 1:
        raise _settings.invalid("validation_split", "a float in [0, 1)", validation_split)
    return float(validation_split)


def _check_batch_size(batch_size):
    if not _settings.is_int(batch_size) or batch_size < 1:
        raise _settings.invalid("batch_size", "a positive integer", batch_size)
    return int(batch_size)


def _encode_labels(labels, class_names, argument="labels"):
    """``(int32 labels, class names)`` from integer or string labels."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise _settings.invalid(argument, "a non-empty 1-D list of labels, one per text", labels)
    if labels.dtype.kind in "USO":
        names = sorted({str(v) for v in labels}) if class_names is None else list(class_names)
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted({str(v) for v in labels} - set(index))
        if unknown:
            raise _settings.invalid(argument, f"labels among class_names {names}", unknown[:5])
        return np.array([index[str(v)] for v in labels], np.int32), names
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise _settings.invalid(argument, "non-negative integer labels or label strings", labels)
    k = int(labels.max()) + 1
    names = [str(i) for i in range(k)] if class_names is None else [str(c) for c in class_names]
    if len(names) < k:
        raise _settings.invalid("class_names", f"a list of at least {k} names", class_names)
    return labels.astype(np.int32), names


def _split(labels, validation_split, seed):
    """Stratified, seeded ``(train, validation)`` indices (>= 1 train per class)."""
    rng, train, val = np.random.default_rng(seed), [], []
    strata = labels if labels.ndim == 1 else labels.argmax(1)  # multi-label: first label
    for c in np.unique(strata):
        idx = rng.permutation(np.flatnonzero(strata == c))
        k = min(int(len(idx) * validation_split + 0.5), len(idx) - 1)
        val, train = val + list(idx[:k]), train + list(idx[k:])
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(val, np.int64))


# ------------------------------------------------------------------ building


def _batched(ds, count, batch_size, shuffle, seed, read=None):
    if shuffle:
        ds = ds.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    if read is not None:
        ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _build(items, labels, names, *, validation_split, batch_size, seed, shuffle,
           class_weight, skipped, read=None, digest=None):
    """TextData from ``items`` (texts, or file paths with ``read``) and encoded labels."""
    validation_split = _check_split(validation_split)
    batch_size = _check_batch_size(batch_size)
    train, val = _split(labels, validation_split, seed)
    multi = labels.ndim == 2
    counts = (labels[train].sum(0) if multi else np.bincount(labels[train], minlength=len(names)))
    items = np.asarray(items, dtype=object)

    def make(index, do_shuffle):
        ds = tf.data.Dataset.from_tensor_slices(
            (tf.constant(list(items[index]), tf.string), labels[index]))
        return _batched(ds, len(index), batch_size, do_shuffle, seed, read)

    digest = digest or hashlib.sha1()
    digest.update(labels.tobytes())
    digest.update(repr((validation_split, seed)).encode())
    return TextData(
        train=make(train, shuffle),
        validation=make(val, False) if validation_split and len(val) else None,
        class_names=list(names), num_classes=len(names),
        class_weight=_settings.resolve_class_weight(class_weight, names, np.asarray(counts)),
        skipped=list(skipped), counts={n: int(c) for n, c in zip(names, counts)},
        multi_label=multi, fingerprint=digest.hexdigest()[:12])


def _keep_nonempty(texts, skipped):
    """Indices of the texts with something besides whitespace; the others go to ``skipped``."""
    keep = []
    for i, text in enumerate(texts):
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if not isinstance(text, str):
            raise _settings.invalid("texts", "a list of strings", f"{type(text).__name__} at {i}")
        if text.strip():
            keep.append(i)
        else:
            skipped.append(f"row {i}")
    if skipped:
        warnings.warn(f"Skipped {len(skipped)} empty texts: {', '.join(skipped[:5])}"
                      f"{', ...' if len(skipped) > 5 else ''}.", stacklevel=3)
    if not keep:
        raise _settings.invalid("texts", "at least one non-empty text", f"{len(texts)} empty texts")
    return np.asarray(keep, np.int64)


def from_text_arrays(texts, labels, *, class_names=None, batch_size=32, validation_split=0.2,
                     seed=1337, shuffle=True, class_weight=None) -> TextData:
    """Builds text pipelines from in-memory strings and labels.

    Args:
        texts: List (or array) of strings.
        labels: ``[n]`` integer class indices or label strings (class names
            are then the sorted distinct labels), or ``[n, k]`` 0/1 rows for
            multi-label data.
        class_names: Optional names, one per class.
        batch_size: Integer. Defaults to `32`.
        validation_split: Float in [0, 1), stratified. Defaults to `0.2`.
        seed: Integer seed of the split and shuffling.
        shuffle: Shuffle the training split each epoch. Defaults to `True`.
        class_weight: None, ``"balanced"`` or ``{class: weight}``.

    Returns:
        A ``TextData``.

    Example:
        >>> data = from_text_arrays(["great", "awful", "fine", "bad"], ["pos", "neg", "pos", "neg"],
        ...                         validation_split=0)
    """
    texts = list(texts) if not isinstance(texts, str) else None
    if texts is None:
        raise _settings.invalid("texts", "a list of strings", "a single string")
    raw = np.asarray(labels)
    if len(raw) != len(texts):
        raise _settings.invalid("labels", f"{len(texts)} labels, one per text", raw)
    skipped = []
    keep = _keep_nonempty(texts, skipped)
    if raw.ndim == 2:
        y, names = _multi_hot(raw[keep], class_names)
    else:
        y, names = _encode_labels(raw[keep], class_names)
    kept = [texts[i] if isinstance(texts[i], str) else texts[i].decode("utf-8", "replace")
            for i in keep]
    digest = hashlib.sha1("\0".join(kept).encode())
    return _build(kept, y, names, validation_split=validation_split, batch_size=batch_size,
                  seed=seed, shuffle=shuffle, class_weight=class_weight, skipped=skipped,
                  digest=digest)


def _multi_hot(rows, class_names):
    rows = np.asarray(rows)
    if rows.dtype.kind not in "biuf" or not np.isin(rows, (0, 1)).all():
        raise _settings.invalid("labels", "0/1 values in the multi-label columns", rows[:3])
    names = [str(i) for i in range(rows.shape[1])] if class_names is None else list(class_names)
    if len(names) != rows.shape[1]:
        raise _settings.invalid("class_names", f"{rows.shape[1]} names, one per column", names)
    return rows.astype(np.float32), names


def from_csv(path, *, text, label, class_names=None, delimiter=",", encoding="utf-8",
             **options) -> TextData:
    """Builds text pipelines from a CSV file with a header row.

    Args:
        path: The CSV file.
        text: Name of the column holding the texts.
        label: Name of the label column (integers or strings), or a list of
            0/1 columns for multi-label data (the class names are the column
            names).
        class_names: Optional names of a single label column's classes.
        delimiter: The field separator. Defaults to `","`.
        encoding: The file's encoding. Defaults to `"utf-8"`.
        **options: ``batch_size``, ``validation_split``, ``seed``,
            ``shuffle``, ``class_weight`` as in ``from_text_arrays``.

    Returns:
        A ``TextData``; rows with an empty text are listed in ``skipped``.

    Example:
        >>> data = from_csv("reviews.csv", text="review", label="stars")
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _settings.invalid("path", "an existing CSV file", path)
    columns = [label] if isinstance(label, str) else list(label)
    with open(path, newline="", encoding=encoding) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        for arg, names in (("text", [text]), ("label", columns)):
            missing = [n for n in names if n not in header]
            if missing:
                raise _settings.invalid(arg, f"column names of {path!r} ({', '.join(header)})",
                                        missing if arg == "label" else text)
        rows = [(row[text] or "", [row[c] for c in columns]) for row in reader]
    texts = [r[0] for r in rows]
    if isinstance(label, str):
        values = [r[1][0] for r in rows]
        labels = np.asarray([int(v) for v in values]) if all(
            v.strip().lstrip("-").isdigit() for v in values) else np.asarray(values)
    else:
        try:
            labels = np.asarray([[int(float(v)) for v in r[1]] for r in rows])
        except ValueError as error:
            raise _settings.invalid("label", "columns of 0/1 values", columns) from error
        class_names = columns
    return from_text_arrays(texts, labels, class_names=class_names, **options)


def _readable_text(path):
    """Whether the file decodes as UTF-8 and holds more than whitespace (read once, not kept)."""
    try:
        with open(path, "rb") as f:
            return bool(f.read().decode("utf-8").strip())
    except (UnicodeDecodeError, OSError):
        return False


def _read_file(path, label):
    return tf.io.read_file(path), label


def from_text_directory(path, *, class_names=None, batch_size=32, validation_split=0.2,
                        seed=1337, shuffle=True, class_weight=None,
                        extensions=TEXT_EXTENSIONS) -> TextData:
    """Builds text pipelines from ``path/<class>/*.txt``.

    Args:
        path: Folder with one subfolder per class.
        class_names: Optional subset and order of the subfolders to use.
        extensions: File endings read as texts. Defaults to ``(".txt",)``.
        **others: As in ``from_text_arrays``.

    Returns:
        A ``TextData`` whose datasets read the files as they go; files that
        are empty or not UTF-8 are in ``skipped``.

    Example:
        >>> data = from_text_directory("saved_models/newsgroups")
    """
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise _settings.invalid("path", "an existing folder with one subfolder per class", root)
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    names = found if class_names is None else list(class_names)
    missing = sorted(set(names) - set(found))
    if not names or missing:
        raise _settings.invalid("class_names" if class_names else "path",
                                f"class subfolders of {root!r} (found: {found})",
                                missing or root)
    files, labels, skipped = [], [], []
    for index, name in enumerate(names):
        folder = os.path.join(root, name)
        for entry in sorted(os.listdir(folder)):
            full = os.path.join(folder, entry)
            if not entry.lower().endswith(tuple(extensions)) or not os.path.isfile(full):
                continue
            if _readable_text(full):
                files.append(full)
                labels.append(index)
            else:
                skipped.append(full)
    if skipped:
        warnings.warn(f"Skipped {len(skipped)} files that are empty or not UTF-8 text: "
                      f"{', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}.",
                      stacklevel=2)
    if not files:
        raise _settings.invalid("path", f"a folder with {', '.join(extensions)} files in its "
                                "class subfolders", root)
    digest = hashlib.sha1("\0".join(files).encode())
    return _build(files, np.asarray(labels, np.int32), names, validation_split=validation_split,
                  batch_size=batch_size, seed=seed, shuffle=shuffle, class_weight=class_weight,
                  skipped=skipped, read=_read_file, digest=digest)


def is_text(x):
    """Whether ``x`` is a list or array of strings (for ``from_arrays``)."""
    if isinstance(x, np.ndarray):
        return x.dtype.kind in "USO" and x.ndim == 1
    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], (str, bytes))

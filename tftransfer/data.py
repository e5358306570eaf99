"""``tf.data`` image pipelines yielding ``float32 [b, H, W, C]`` raw pixels in
``[0, 255]``, resized to the model's input, and ``int32 [b]`` labels. The model
applies ``preprocess_input`` itself (a layer, see ``build_finetuner``).

Example:
    >>> data = from_directory("flowers/", model=model, augment="default")
    >>> model.fit(data.train, validation_data=data.validation, class_weight=data.class_weight)
"""

import dataclasses
import functools
import os
import warnings

import numpy as np
import tensorflow as tf

from tftransfer import _checks, _folders, _images, _pipeline, _settings, _text_data
from tftransfer._checks import invalid
from tftransfer._text_data import TextData, from_csv, from_text_arrays, from_text_directory  # noqa: F401

IMAGE_EXTENSIONS = _images.EXTENSIONS
CACHE_MODES, INTERPOLATIONS = _settings.CACHE_MODES, _settings.INTERPOLATIONS
AUGMENTATIONS, DEFAULT_AUGMENTATION = _settings.AUGMENTATIONS, _settings.DEFAULT_AUGMENTATION


@dataclasses.dataclass
class ImageData:
    """Datasets plus what a trainer needs to know about them.

    Attributes:
        train / validation: Batched ``(images, labels)``; validation is ``None``
            without a split and is never shuffled or augmented.
        class_names / num_classes: Label ``i`` is ``class_names[i]``.
        image_size / channels: ``(height, width)`` and channels delivered.
        class_weight: ``{class_index: weight}`` for ``Model.fit``, or ``None``.
        skipped: Files left out (``from_directory``): those the listing
            finds not to be images, then, by the end of the first pass over
            each split, those that failed to decode while reading.
        counts: ``{class_name: images}`` of the training split, or ``None``
            (files that fail to decode are taken out after the first pass).
        augmented: Whether ``train`` is augmented (a frozen-feature cache is
            only valid when it is not).
        cache: Where resized images are cached: ``"memory"`` (as uint8), a
            file prefix (``tf.data`` cache files), or ``None``.
        cache_bytes: Size of the resized uint8 images of both splits, the
            figure the ``cache="auto"`` decision compares to the budget
            (``None`` when the number of images is unknown).

    Example:
        >>> data.class_names, data.counts, data.augmented
        (['cat', 'dog'], {'cat': 80, 'dog': 120}, False)
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    class_names: list[str]
    num_classes: int
    image_size: tuple[int, int]
    channels: int
    class_weight: dict[int, float] | None = None
    skipped: list[str] = dataclasses.field(default_factory=list)
    counts: dict[str, int] | None = None
    augmented: bool = False
    cache: str | None = None
    cache_bytes: int | None = None


def _build(spec, load, train, val, sizes, *, names, counts, class_weight, key, images,
           skipped=None, checks=(None, None)) -> ImageData:
    """ImageData from unbatched train/validation element datasets and ``load``;
    ``sizes`` are their numbers of elements (or None), ``images`` (both splits, or None)
    decides ``cache="auto"``."""
    cache, nbytes = _settings.cache_plan(spec, images)

    def make(ds, count, tag, check):
        train = tag == "train"
        return _pipeline.split_pipeline(
            ds, load, count=count, batch_size=spec.batch_size, seed=spec.seed,
            shuffle=train and spec.shuffle, layers=spec.augment if train else (),
            cache=cache and f"{cache}-{key}-{tag}", check=check)

    data = ImageData(
        train=make(train, sizes[0], "train", checks[0]), class_names=names,
        validation=None if val is None else make(val, sizes[1], "validation", checks[1]),
        num_classes=len(names), image_size=spec.image_size, channels=spec.channels,
        class_weight=_settings.resolve_class_weight(class_weight, names, counts),
        skipped=list(skipped or []), augmented=bool(spec.augment),
        counts=None if counts is None else dict(zip(names, map(int, counts))),
        cache="memory" if cache == "" else cache, cache_bytes=nbytes)
    for check in checks:
        if check is not None:
            check.data = data
    return data


def _split(labels, spec) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded ``(train, validation)`` indices (>= 1 train per class)."""
    rng, train, val = np.random.default_rng(spec.seed), [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(int(len(idx) * spec.validation_split + 0.5), len(idx) - 1)
        val, train = val + list(idx[:k]), train + list(idx[k:])
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(val, np.int64))


def _indexed(spec, load, labels, names, class_weight, key, skipped=None,
             check=None) -> ImageData:
    """ImageData of ``load(i)`` examples, stratified split; ``check(split, name)``
    gives each split's ``_folders.ReadCheck``."""
    train, val = _split(labels, spec)
    counts = np.bincount(labels[train], minlength=len(names))
    slices = tf.data.Dataset.from_tensor_slices
    checks = (None, None) if check is None else (check(train, "train"),
                                                 check(val, "validation"))
    return _build(spec, load, slices(train), slices(val) if spec.validation_split else None,
                  (len(train), len(val)), names=names, counts=counts,
                  class_weight=class_weight, key=key, skipped=skipped, checks=checks,
                  images=len(train) + (len(val) if spec.validation_split else 0))


def _list_images(root) -> _folders.Listing:
    """The cheap listing of ``root``; warns once about the files it leaves out."""
    if not isinstance(root, (str, os.PathLike)) or not os.path.isdir(root):
        raise invalid("path", "an existing directory with one subfolder per class", root)
    classes = sorted(e.name for e in os.scandir(root)
                     if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise invalid("path", "a directory with one subfolder of images per class "
                       "(e.g. path/cat/1.jpg, path/dog/2.png)", root)
    listing = _folders.list_images(root, classes)
    message = _folders.listing_warning(listing.bad, listing.excluded)
    if message:
        warnings.warn(message, stacklevel=3)
    counts = np.bincount(listing.labels, minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise invalid("path", f"at least one readable {'/'.join(IMAGE_EXTENSIONS)} image "
                       f"per class subfolder; none in {empty} ({len(listing.bad)} undecodable "
                       "file(s) skipped overall)", root, verb="hold")
    return listing


def from_directory(path, *, model=None, image_size=None, channels=None,
                   batch_size=32, validation_split=0.2, seed=1337, shuffle=True,
                   cache="auto", augment=None, class_weight=None,
                   interpolation="bilinear", cache_budget=None) -> ImageData:
    """Loads ``path/<class_name>/**/<image>`` (one subfolder per class).

    Listing decodes no image (the rule ``predict`` follows too): files with
    an image extension (jpg, jpeg, png, bmp, gif, webp; any case) are kept
    when their first bytes are those of an image and their end is there
    (JPEG's end marker, PNG's IEND chunk, ...: a truncated file is found
    before the first epoch). The others, files of image formats TensorFlow
    cannot read (``.tif``, ``.heic``, ...), and the rare file that still
    fails to decode while reading are left out without stopping the epoch:
    they are named in one warning each time (at listing, and at the end of
    the first pass over each split) and in ``skipped``. Files with another
    extension are counted in the listing's warning. Hidden files and folders
    (and macOS's ``._*`` files) are ignored; symbolic links are followed.
    Images are decoded by ``tftransfer._images.decode``: first frame of an
    animation, 16-bit scaled to 8, EXIF orientation applied.

    Args:
        path: Root directory; class names are its sorted subfolder names.
        model: Keras model whose ``input_shape`` gives size and channels.
        image_size: ``(height, width)``; needed when ``model`` is not given.
        channels: Output channels (default: the model's, else 3).
        batch_size: Images per batch.
        validation_split: Fraction in ``[0, 1)`` held out of every class
            (stratified, seeded); 0 gives ``validation=None``.
        seed: Seed of the split, shuffling and augmentation.
        shuffle: Reshuffle the train split every epoch.
        cache: Where resized images are kept after the first epoch, as
            uint8: ``"auto"`` (default) in memory when both splits fit the
            cache budget, else nowhere (decoded every epoch); ``"memory"``
            or ``True`` in memory (warns above the budget); ``"disk"`` in a
            temporary directory removed at exit; a string path prefix in
            ``tf.data`` cache files there; ``False``/``None`` nowhere.
        augment: ``None``, ``True``/``"default"``, or a list of names from
            ``AUGMENTATIONS`` and/or keras layers; train split only.
        class_weight: ``None``, ``"balanced"`` (``n / (k * count_c)`` over
            the training split) or ``{class_index_or_name: weight}``.
        interpolation: ``tf.image.resize`` method.
        cache_budget: Bytes (an int or ``"2GB"``-style string) or a share of
            RAM (``"0.1"``) that an in-memory cache may use; defaults to
            ``$TFTRANSFER_CACHE_BUDGET``, else 10% of RAM.

    Raises:
        ValueError: No directory, no class folder, a class without a readable
            image, or any invalid argument.

    Example:
        >>> data = from_directory("pets/", image_size=(224, 224),
        ...                       augment=["flip", "zoom"], class_weight="balanced")
        >>> images, labels = next(iter(data.train))  # float32 0-255, int32
    """
    spec = _settings.make_spec(
        model=model, image_size=image_size, channels=channels, batch_size=batch_size, seed=seed,
        shuffle=shuffle, cache=cache, augment=augment, interpolation=interpolation,
        validation_split=validation_split, cache_budget=cache_budget)
    listing = _list_images(path)
    key = spec.cache not in CACHE_MODES and _settings.fingerprint(
        spec, listing.paths, [_size_and_time(p) for p in listing.paths])
    files, targets = tf.constant(listing.paths, tf.string), tf.constant(listing.labels)
    size, mode = spec.image_size, spec.interpolation

    def load(i):  # a plain function, traced into each map: no nested function call per image
        return _images.decode(tf.io.read_file(files[i]), spec.channels, size, mode), targets[i], i

    def check(split, name):
        return _folders.ReadCheck(listing.paths, listing.labels, split, name)

    return _indexed(spec, load, listing.labels, list(listing.classes), class_weight, key,
                    listing.bad, check)


def _check_arrays(x, y, class_names):
    """``(x, int32 y, class_names)``: images with a channel axis, labels as indices."""
    x = _stack_images(x)
    x = x[..., None] if x.ndim == 3 else x
    if x.ndim != 4:
        raise invalid("x", "images of shape [n, H, W] or [n, H, W, C]", x)
    _images.check_pixels(x, "x", finite=False)  # NaN / inf: `_checks.check_batch` below
    y, class_names = _label_indices(np.asarray(y), class_names)
    if y.ndim != 1 or len(y) != len(x) or len(y) == 0 or y.min() < 0:
        raise invalid("y", f"{len(x) or 'n'} non-negative integer labels (or class names) of "
                      "shape [n]", y)
    if x.dtype != np.uint8 and (x.min() < 0 or x.max() <= 1.0):
        warnings.warn(f"`x` spans [{x.min():.3g}, {x.max():.3g}]; raw [0, 255] pixels are "
                      "expected (models preprocess themselves).", stacklevel=3)
    return x, y.astype(np.int32), class_names


def _stack_images(x):
    """``x`` as one array; a list of images of different sizes is refused by name."""
    if isinstance(x, (list, tuple)):
        shapes = sorted({np.shape(image) for image in x})
        if len(shapes) > 1:
            raise invalid("x", "images of one size (resize them first, or load "
                          f"them with from_directory); found sizes {shapes[:4]}",
                          f"a list of {len(x)} images")
    return np.asarray(x)


def _label_indices(y, class_names):
    """Integer labels from integers, whole-number floats or class names."""
    if y.dtype.kind in "USO":  # names: mapped to class_names (default: sorted)
        names = [str(v) for v in y.ravel()]
        class_names = sorted(set(names)) if class_names is None else class_names
        known = {str(c): i for i, c in enumerate(class_names)}
        unknown = sorted(set(names) - set(known))
        if unknown or y.ndim != 1:
            raise invalid("y", f"labels that are names in class_names={list(class_names)}"
                          f" (unknown: {unknown[:5]})", y)
        return np.asarray([known[n] for n in names]), class_names
    if np.issubdtype(y.dtype, np.floating) and y.size and np.all(np.isfinite(y)) \
            and np.all(y == np.round(y)):
        y = y.astype(np.int64)  # whole-number floats, as fine_tune takes them
    if not np.issubdtype(y.dtype, np.integer):
        raise invalid("y", "integer labels, whole-number floats or class names", y)
    return y, class_names


def _names_for(class_names, num_labels: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_labels)]
    if isinstance(class_names, str) or len(class_names) < num_labels:
        raise invalid("class_names", f"a list of at least {num_labels} names "
                       "(one per label)", class_names)
    return [str(c) for c in class_names]


def from_arrays(x, y, *, class_names=None, model=None, image_size=None,
                channels=None, batch_size=32, validation_split=0.2, seed=1337,
                shuffle=True, cache="auto", augment=None, class_weight=None,
                interpolation="bilinear", cache_budget=None) -> ImageData:
    """Builds pipelines from in-memory images ``x`` and integer labels ``y``.

    Args:
        x: ``[n, H, W]`` or ``[n, H, W, C]`` raw pixels (0-255): uint8, other
            integers within 0-255, or floats without NaN; bool and 16-bit
            values are refused (divide 16-bit images by 257). Channels are
            converted to the model's (gray <-> RGB, RGBA -> RGB).
        y: ``[n]`` integer class indices (whole-number floats accepted), or
            class names, mapped to ``class_names`` (default: sorted names).
        class_names: Optional names; default ``"0"`` .. ``str(max(y))``.
        **others: As in :func:`from_directory`.

    A list of strings for ``x`` gives text pipelines instead (a ``TextData``,
    see ``from_text_arrays``; the image arguments do not apply).

    Example:
        >>> (x, y), _ = keras.datasets.mnist.load_data()
        >>> data = from_arrays(x, y, image_size=(32, 32), channels=3)
        >>> texts = from_arrays(["a good film", "a dull one"], ["pos", "neg"], validation_split=0)
    """
    if _text_data.is_text(x):
        return from_text_arrays(x, y, class_names=class_names, batch_size=batch_size,
                                validation_split=validation_split, seed=seed, shuffle=shuffle,
                                class_weight=class_weight)
    spec = _settings.make_spec(
        model=model, image_size=image_size, channels=channels, batch_size=batch_size, seed=seed,
        shuffle=shuffle, cache=cache, augment=augment, interpolation=interpolation,
        validation_split=validation_split, cache_budget=cache_budget)
    x, y, class_names = _check_arrays(x, y, class_names)
    _checks.check_batch(x, y, argument=("x", "y"))  # NaN / inf pixels: the first bad index
    class_names = _names_for(class_names, int(y.max()) + 1)
    key = spec.cache and _settings.fingerprint(spec, x, y)
    images, labels = tf.constant(x), tf.constant(y)
    load = lambda i: (_fitted(images[i], spec), labels[i])  # noqa: E731
    return _indexed(spec, load, y, class_names, class_weight, key)


def _count_labels(labels: tf.data.Dataset, minlength: int = 0) -> np.ndarray:
    """Per-class counts of a dataset of scalar integer labels (one pass)."""
    batches = list(labels.batch(4096).as_numpy_iterator()) or [np.zeros(0, np.int64)]
    return np.bincount(np.concatenate(batches), minlength=minlength)


def _check_element_spec(ds, arg: str) -> tf.data.Dataset:
    spec = getattr(ds, "element_spec", None)
    if isinstance(spec, tuple) and len(spec) == 2 and spec[1].shape.rank == 1:
        ds, spec = ds.unbatch(), ds.unbatch().element_spec  # labels [b]: batched
    image = spec[0].shape if isinstance(spec, tuple) and len(spec) == 2 else None
    if image is None or image.rank not in (2, 3) or image[-1] is None and image.rank == 3 \
            or spec[1].shape.rank != 0 or not spec[1].dtype.is_integer:
        raise invalid(arg, "a tf.data.Dataset of (image [H, W] or [H, W, C] with "
                       "known C, integer label []) pairs, or batches of them", ds)
    return ds


def _fitted(image, spec):
    """The shared resize/convert of ``_images``: float32, whole values 0-255."""
    return _images.fit_image(image, spec.channels, spec.image_size, spec.interpolation)


def _num_images(*datasets) -> int | None:
    """Elements of all ``datasets`` (None ones count 0), or None if unknown."""
    sizes = [0 if ds is None else int(ds.cardinality()) for ds in datasets]
    return None if min(sizes) < 0 else sum(sizes)


def _stream(spec, train, val, names, counts, class_weight, key, images) -> ImageData:
    """ImageData for streamed ``(image, label)`` datasets (tf.data, TFDS)."""
    load = lambda x, y: (_fitted(x, spec), tf.cast(y, tf.int32))  # noqa: E731
    sizes = [None if ds is None else _num_images(ds) for ds in (train, val)]
    return _build(spec, load, train, val, sizes, names=names,
                  counts=counts, class_weight=class_weight, key=_settings.fingerprint(spec, key),
                  images=images)


def from_dataset(ds, *, validation=None, class_names=None, model=None,
                 image_size=None, channels=None, batch_size=32, seed=1337,
                 shuffle=True, cache="auto", augment=None, class_weight=None,
                 interpolation="bilinear", cache_budget=None) -> ImageData:
    """Resizes, batches and augments an existing ``(image, label)`` dataset.

    Args:
        ds: ``(image, label)`` dataset, maybe batched: uint8/float 0-255 images.
        validation: Optional validation dataset of the same form.
        class_names: Label names; if ``None`` (or for ``"balanced"`` class
            weights) one pass over ``ds`` counts the labels.
        **others: As in :func:`from_directory`; a file cache is keyed per call.
            ``cache="auto"`` caches in memory only when the number of
            elements is known (``ds.cardinality()``, or the label count
            pass) and the resized images fit the budget.

    Example:
        >>> ds = tf.data.Dataset.from_tensor_slices((images, labels))
        >>> data = from_dataset(ds, class_names=["cat", "dog"], model=model)
    """
    spec = _settings.make_spec(
        model=model, image_size=image_size, channels=channels, batch_size=batch_size, seed=seed,
        shuffle=shuffle, cache=cache, augment=augment, interpolation=interpolation,
        cache_budget=cache_budget)
    ds = _check_element_spec(ds, "ds")
    validation = validation and _check_element_spec(validation, "validation")
    count = class_names is None or class_weight == "balanced"
    counts = _count_labels(ds.map(lambda x, y: y), len(class_names or ())) if count else None
    names = _names_for(class_names, 0 if counts is None else len(counts))
    images = _num_images(ds, validation)
    if images is None and counts is not None and validation is None:
        images = int(counts.sum())
    return _stream(spec, ds, validation, names, counts, class_weight, (id(ds), os.getpid()),
                   images)


def _tfds_builder(name: str, data_dir, download: bool):
    """Returns a prepared builder and its supervised keys, or says how to prepare."""
    import tensorflow_datasets as tfds  # heavy; imported only when used

    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    how = (f"Prepare it with internet access: `tfds build {name} --data_dir={where}` (or "
           f"from_tfds({name!r}, data_dir={where!r}, download=True)), then copy the "
           f"directory here. Received: name={name!r}, data_dir={data_dir!r}")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:  # unknown name, no files
        builder = None
    if download and builder is not None and not builder.is_prepared():
        builder.download_and_prepare()
    if builder is None or not builder.is_prepared():
        hint = " and no builder is registered under that name" if builder is None else ""
        raise ValueError(f"TFDS dataset {name!r} is not prepared in data_dir={where!r}"
                         f"{hint}. {how}")
    keys = builder.info.supervised_keys
    if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)
            and isinstance(builder.info.features[keys[1]], tfds.features.ClassLabel)):
        raise invalid("name", "a dataset with supervised_keys=(image, ClassLabel)", name)
    return builder, keys


def from_tfds(name, *, split=("train[:80%]", "train[80%:]"), data_dir=None,
              download=False, model=None, image_size=None, channels=None,
              batch_size=32, seed=1337, shuffle=True, cache="auto", augment=None,
              class_weight=None, interpolation="bilinear", cache_budget=None) -> ImageData:
    """Reads a prepared TensorFlow Datasets image classification dataset.

    Args:
        name: TFDS name, e.g. ``"tf_flowers"`` or ``"cats_vs_dogs:4.*.*"``.
        split: ``(train_split, validation_split_or_None)`` or one split string.
        data_dir: TFDS data directory (default: ``$TFDS_DATA_DIR`` or TFDS's).
        download: Download and prepare when missing (needs internet).
        **others: As in :func:`from_directory`; ``counts`` is only computed
            (without decoding images) for ``class_weight="balanced"``.

    Raises:
        ValueError: Data not prepared (the message gives the ``tfds build``
            command), not image classification, or an invalid argument.

    Example:
        >>> data = from_tfds("tf_flowers", data_dir="/data/tfds", model=model)
    """
    import tensorflow_datasets as tfds

    spec = _settings.make_spec(
        model=model, image_size=image_size, channels=channels, batch_size=batch_size, seed=seed,
        shuffle=shuffle, cache=cache, augment=augment, interpolation=interpolation,
        cache_budget=cache_budget)
    splits = (split, None) if isinstance(split, str) else split
    if not isinstance(splits, (tuple, list)) or len(splits) != 2 or not isinstance(splits[0], str):
        raise invalid("split", "a TFDS split string or (train, validation_or_None)", split)
    builder, (image_key, label_key) = _tfds_builder(name, data_dir, download)
    names, counts = builder.info.features[label_key].names, None
    read = functools.partial(builder.as_dataset, as_supervised=True,
                             read_config=tfds.ReadConfig(shuffle_seed=spec.seed))
    if class_weight == "balanced":
        labels = read(split=splits[0], decoders={image_key: tfds.decode.SkipDecoding()})
        counts = _count_labels(labels.map(lambda x, y: y), len(names))
    train, val = (read(split=splits[0], shuffle_files=spec.shuffle),
                  read(split=splits[1]) if splits[1] else None)
    return _stream(spec, train, val, names, counts, class_weight,
                   (name, str(builder.data_dir), splits), _num_images(train, val))


def _size_and_time(path):
    """What changes when a file is rewritten: its size and modification time."""
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns

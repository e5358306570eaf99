"""The ``tf.data`` pipeline of one split: load in parallel, cache, batch, report.

    elements -> [rows] -> [shuffle] -> load (parallel) -> [drop unreadable, top up]
      -> [file cache -> shuffle] -> batch -> [bookkeeping] -> float32 [-> augment]
      -> prefetch

An in-memory cache is an :class:`ArrayCache`: the split's resized images in
one preallocated ``uint8`` array, filled from the float32 batches of the first
full pass and read back a batch at a time (a fresh permutation every epoch)
after it. It holds exactly the ``N * H * W * C`` bytes that ``cache="auto"``
compares with the budget. The array is an anonymous memory map of ordinary
pages: numpy asks for transparent huge pages on large arrays, and here writing
0.75 GB of fresh memory took 1.05-1.46 s of CPU in huge pages against
0.80-1.06 s in 4 KB pages (4 fresh processes each, alternating; a VM that
hands freed memory back to its host). While the array fills, batches reach the
bookkeeping through a one-batch prefetch, so decoding goes on while Python
copies a batch into the array (first epoch 4.7 s instead of 5.3 s at 5,000
images, 8 rounds in one process). ``tf.data``'s own in-memory cache keeps one
heap allocation per image, and glibc's malloc left 1.8-2.4 GB resident for
0.75 GB of images (5,000 images at 224 px, ``bench/data_scale.py``); it is
only used when the number of elements is unknown.

The bookkeeping step runs once per batch, in order: it writes the batch into
the array cache, marks its files as read for a ``_folders.ReadCheck``, and on
the last batch of a pass reports the unread files and marks the cache full.

The pipelines run with ``tf.data``'s model-based autotuner off
(:func:`steady`): the parallel steps use one call per schedulable core. On
2 cores the autotuner left about half a core idle for a whole pass in about
half of the passes, decode and resize included (5,000 JPEGs: 5.1 s instead of
2.8-3.6 s, with the same CPU time; ``bench/data_scale.py``), whatever its
algorithm or CPU budget; with it off, every pass ran at full speed.
"""

import mmap
import os

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
SHUFFLE_BUFFER = 1024  # bound for shuffle buffers that hold decoded images
_plain = tf.autograph.experimental.do_not_convert  # our map functions need no AutoGraph


class ArrayCache:
    """One split's images (and other columns) in preallocated arrays, by row.

    Rows are the elements' positions in the unshuffled split, so a pass that
    is abandoned and a new one write the same image to the same row. After a
    full pass, :meth:`read` serves batches of the rows that were written (files
    that failed to decode have none), topped up to the split's size with
    repeats of written rows, in a new seeded permutation each pass when
    shuffling.

    Args:
        size: Number of elements (rows) of the split.
        batch_size: Rows per batch read.
        shuffle: Whether each read pass is a new permutation.
        seed: Seed of the permutations.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int):
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.rng = np.random.default_rng(seed)
        self.columns, self.written, self.full, self.order = None, np.zeros(size, bool), False, None

    @property
    def steps(self) -> int:
        return -(-self.size // self.batch_size)

    def write(self, rows, columns):
        """Stores a batch of ``columns`` (arrays with a first axis of rows); the
        first one, float images of whole values 0-255, as uint8 (exact)."""
        if self.columns is None:  # pages are only used as rows are written
            image, *rest = columns
            self.columns = [_pages((self.size, *image.shape[1:]))] + [
                np.empty((self.size, *c.shape[1:]), c.dtype) for c in rest]
        for stored, column in zip(self.columns, columns):
            stored[rows] = column  # (numpy casts while it copies: no pass of its own)
        self.written[rows] = True

    def read(self, step):
        """Batch ``step`` of a read pass (step 0 draws the pass's order)."""
        if step == 0 or self.order is None:
            rows = np.flatnonzero(self.written)
            rows = np.resize(rows, self.size) if 0 < len(rows) < self.size else rows
            self.order = self.rng.permutation(rows) if self.shuffle else rows
        rows = self.order[step * self.batch_size:(step + 1) * self.batch_size]
        return [column[rows] for column in self.columns]

    def reader(self, element_spec) -> tf.data.Dataset:
        """Batches of the stored rows, with ``element_spec`` (batched)."""
        dtypes = [tf.uint8] + [s.dtype for s in element_spec[1:]]

        def read(step):
            columns = tf.numpy_function(self.read, [step], dtypes, stateful=True)
            columns[0] = tf.cast(columns[0], element_spec[0].dtype)
            return tuple(tf.ensure_shape(c, s.shape) for c, s in zip(columns, element_spec))

        return tf.data.Dataset.range(self.steps).map(_plain(read))


def _pages(shape) -> np.ndarray:
    """A uint8 array of ``shape`` in an anonymous memory map: ordinary pages,
    zero-filled by the kernel when first written (see the module docstring)."""
    return np.frombuffer(mmap.mmap(-1, int(np.prod(shape))), np.uint8).reshape(shape)


def cores() -> int:
    """CPU cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def steady(ds: tf.data.Dataset) -> tf.data.Dataset:
    """``ds`` with the autotuner off and ``AUTOTUNE`` meaning one call per core.

    Prefetch buffers still grow on demand (``tf.data``'s legacy prefetch
    autotuning). A user who wants the autotuner back sets
    ``options.autotune.enabled = True`` in a later ``with_options``.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    options.autotune.initial_parallelism = cores()
    return ds.with_options(options)


def _as_uint8(load):
    """``load`` with its image (the first output) cast to uint8 (exact: whole values)."""
    def compact(*args):
        image, *rest = load(*args)
        return (tf.cast(image, tf.uint8), *rest)
    return compact


def _with_row(load):
    """``load`` of enumerated elements: ``(row, element)`` -> ``(*load(element), row)``."""
    def loaded(row, element):
        return (*load(*(element if isinstance(element, tuple) else (element,))), row)
    return loaded


def _to_float(layers, images, labels, *_):
    """A uint8 or float32 batch -> float32, augmented by ``layers``, in [0, 255]."""
    images = tf.cast(images, tf.float32)
    for layer in layers:
        images = layer(images, training=True)
    if layers:
        images = tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 255.0)
    return images, labels


def _bookkeeping(batches, array, check, steps):
    """The per-batch step, in order: array writes, files read, end of a pass.
    Python sees the whole batch only while it fills the array, else the indices."""

    def keep(step, columns, index):
        if array is not None and not array.full:
            array.write(columns[-1], columns)
        if check is not None:
            check.record(index)
        if step == steps - 1:  # the last batch of a full pass: every element went by
            if check is not None:
                check.finish()
            if array is not None:
                array.full = True
        return np.True_

    def step_fn(step, batch):
        if array is not None:
            call = lambda s, *c: keep(s, c, c[2] if check is not None else None)  # noqa: E731
            inputs = [step, *batch]
        else:  # a ReadCheck alone: the file index is the third column
            call, inputs = (lambda s, index: keep(s, (), index)), [step, batch[2]]
        done = tf.numpy_function(call, inputs, tf.bool, stateful=True)
        with tf.control_dependencies([done]):
            return tuple(tf.identity(t) for t in batch)

    return batches.enumerate().map(_plain(step_fn))


def split_pipeline(elements, load, *, count, batch_size, shuffle, seed, cache,
                   layers=(), check=None) -> tf.data.Dataset:
    """Batched ``(float32 images, labels)`` of one split.

    Args:
        elements: Unbatched dataset of what ``load`` takes (an index, or an
            ``(image, label)`` pair).
        load: ``element -> (image float32 whole values, label, *extra)``.
        count: Elements of the split, or ``None`` when unknown.
        batch_size / shuffle / seed: As the loaders take them.
        cache: ``None`` (none), ``""`` (memory) or a file prefix.
        layers: Augmentation layers (train split only).
        check: A ``_folders.ReadCheck`` (its elements carry the file index
            third), or ``None``.
    """
    array = ArrayCache(count, batch_size, shuffle, seed + 1) if cache == "" and count else None
    indices = isinstance(elements.element_spec, tf.TensorSpec) and not elements.element_spec.shape
    size = count if indices and count else min(count or SHUFFLE_BUFFER, SHUFFLE_BUFFER)
    # Whole values: uint8 is exact, a quarter of float32's bytes. A file cache stores
    # elements as they come; the array cache converts as it stores.
    if cache is not None and array is None:
        load = _as_uint8(load)
    if array is not None:
        elements, load = elements.enumerate(), _with_row(load)
    load = _plain(load)
    # Indices shuffle in full; images (streams) in a bounded buffer.
    ds = elements.shuffle(size, seed=seed, reshuffle_each_iteration=True) if shuffle else elements
    ds = ds.map(load, num_parallel_calls=AUTOTUNE)
    if check is not None:
        ds = check.fill(ds, elements.map(load))
    if cache is not None and array is None:  # a file, or memory for an unknown count
        ds = ds.cache(cache)
        if shuffle:
            ds = ds.shuffle(min(size, SHUFFLE_BUFFER), seed=seed + 1)
    ds = ds.batch(batch_size)
    if array is not None or check is not None:
        steps = int(ds.cardinality())
        ds = _bookkeeping(ds if array is None else ds.prefetch(1), array, check, steps)
    if array is not None:
        fill, read = ds, array.reader(ds.element_spec)

        def this_pass(_):  # decided when each pass starts: fill the array, or read it
            full = tf.numpy_function(lambda: np.bool_(array.full), [], tf.bool, stateful=True)
            every, none = tf.constant(-1, tf.int64), tf.constant(0, tf.int64)
            return fill.take(tf.where(full, none, every)).concatenate(
                read.take(tf.where(full, every, none)))

        ds = tf.data.Dataset.range(1).flat_map(_plain(this_pass))
        ds = ds.apply(tf.data.experimental.assert_cardinality(array.steps))
    # Batches that need no augmenting take one cheap step (a cast): no parallel buffers.
    ds = ds.map(_plain(lambda *batch: _to_float(layers, *batch)),
                num_parallel_calls=AUTOTUNE if layers else None)
    return steady(ds.prefetch(AUTOTUNE))

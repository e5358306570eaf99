"""Stage 1 on cached backbone features: the frozen backbone runs once.

When nothing random happens before the head (no augmentation), the features
of the frozen backbone are the same every epoch: `head_datasets` computes them
once and returns datasets of `(features, labels, ...)` for the head model. They
stay in memory while they fit the cache budget of `tftransfer._memory`, else
go to a tf.data cache file; with a shared directory (`feature_cache_dir`) they
are read from and written to a `_feature_store.FeatureStore`.
"""

import atexit
import os
import shutil
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from tftransfer import _feature_store, _memory

CACHE_MODES = ("auto", True, False, "disk")


def use_cache(cache_features, data):
    """Whether stage 1 runs on cached features."""
    if cache_features not in CACHE_MODES:
        raise ValueError(
            '`cache_features` must be "auto", True, False or "disk". '
            f"Received: cache_features={cache_features!r}"
        )
    return bool(cache_features) and not data.augmented


def head_datasets(model, data, cache_features, shared_dir, state, verbose):
    """The train and validation features of the frozen backbone, as datasets.

    Args:
        model: The `FineTuner` whose backbone is frozen.
        data: A `_train_data.TrainData`.
        cache_features: `fine_tune`'s argument: `"disk"` caches in
            `state.path("feature_cache")` when the run has a directory.
        shared_dir: `fine_tune`'s `feature_cache_dir`, or None.
        state: The `_run_state.RunState` of the run.
        verbose: `fit`'s verbosity; 0 hides the progress bars.

    Returns:
        `(train, validation)`; validation is None without validation data.
    """
    extract = tf.function(model.extract_features)
    on_disk = cache_features == "disk" and state.directory
    store = None
    if shared_dir and not on_disk:
        store = _feature_store.FeatureStore(shared_dir, _feature_store.backbone_key(model))
    verbose = 0 if verbose == 0 else 1
    train = cached(data.train, extract, state.path("feature_cache", "train") if on_disk else "",
                   data.shuffle, store, verbose)
    val = cached(data.validation, extract,
                 state.path("feature_cache", "val") if on_disk else "", store=store,
                 verbose=verbose)
    return train, val


def cached(dataset, extract, filename, shuffle=False, store=None, verbose=1):
    """Backbone features computed once, with a progress bar: in memory (read
    from `store` when it holds them) while they fit the cache budget
    (`tftransfer._memory`: `$TFTRANSFER_CACHE_BUDGET`, else 10% of RAM), else
    in a tf.data cache file: `filename`, or a temporary one removed at exit."""
    if dataset is None:
        return None
    if not filename:
        extracted = extract_all(dataset, for_any_batch(extract, dataset), store, verbose)
        if extracted is not None:
            columns, batch_size = extracted
            cached = tf.data.Dataset.from_tensor_slices(tuple(columns))
            if shuffle:
                cached = cached.shuffle(len(columns[0]), seed=0, reshuffle_each_iteration=True)
            return cached.batch(batch_size).prefetch(2)
        folder = tempfile.mkdtemp(prefix="tftransfer-features-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        filename = os.path.join(folder, "features")
        warnings.warn(f"The backbone features exceed the cache budget of "
                      f"{_memory.show(_memory.budget())} (${_memory.ENV}): they are cached on "
                      f"disk in {folder} instead.", stacklevel=5)
    os.makedirs(os.path.dirname(filename), exist_ok=True)
    cached = dataset.map(lambda x, *rest: (extract(x), *rest)).cache(filename)
    bar = keras.utils.Progbar(batches(dataset), verbose=verbose, unit_name="batch")
    for step, _ in enumerate(cached, start=1):  # computed here, read from disk by fit
        bar.update(step)
    return (cached.shuffle(256, reshuffle_each_iteration=True) if shuffle else cached).prefetch(2)


def batches(dataset):
    """The number of batches of `dataset`, or None when unknown."""
    count = int(dataset.cardinality())
    return count if count >= 0 else None


def for_any_batch(extract, dataset):
    """`extract` traced once for every batch size of `dataset` (not once per
    size), on its first call: never when stored features cover the data."""
    spec = dataset.element_spec[0]
    if not isinstance(spec, tf.TensorSpec):
        return extract
    spec = tf.TensorSpec([None, *spec.shape[1:]], spec.dtype)
    return lambda images: extract.get_concrete_function(spec)(images)


def extract_all(dataset, extract, store=None, verbose=1, budget=None):
    """One pass of the backbone over `dataset`: features and the other columns.

    With a `_feature_store.FeatureStore`, batches it holds skip the backbone
    and the new ones are written to it. A progress bar shows the pass.
    Returns None, having stopped early, when the columns would exceed
    `budget` bytes (default: the cache budget of `tftransfer._memory`),
    estimated after the first batch from the number of batches.
    """
    features = (lambda images: store.features(images, extract)) if store else extract
    budget = _memory.budget() if budget is None else budget
    target = batches(dataset)
    bar = keras.utils.Progbar(target, verbose=verbose, unit_name="batch")
    parts, nbytes = [], 0
    for step, batch in enumerate(dataset, start=1):
        parts.append([np.asarray(column) for column in (features(batch[0]), *batch[1:])])
        nbytes += sum(column.nbytes for column in parts[-1])
        if max(nbytes, nbytes / step * (target or 0)) > budget:
            return None
        bar.update(step)
    if store:
        store.save()
    columns = [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
    return columns, int(parts[0][0].shape[0])

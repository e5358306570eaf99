"""Two-stage fine-tuning, the recipe experts run by hand.

Stage 1 trains the head on a frozen backbone (on cached backbone features when
nothing random happens before the head); stage 2 unfreezes part of the backbone
and continues, from the stage-1 epoch count, at a lower learning rate,
optionally with layer-wise (discriminative) rates. Safety nets are on by
default: EarlyStopping with best weights restored, TerminateOnNaN, and with an
`output_dir` also BackupAndRestore (a killed run resumes where it was),
TensorBoard and CSV logs, `curves.png` and `confusion_matrix.png`.

Example:

>>> model = build_finetuner("saved_models/digits_cnn.keras", num_classes=5)
>>> history = fine_tune(model, (x, y), (x_val, y_val), head_epochs=5,
...                     fine_tune_epochs=5, unfreeze="top:1", output_dir="runs/a")
"""

import atexit
import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from tftransfer import _checks, _feature_store, _lock, _memory, _stage2, distribute, reports
from tftransfer.model import FineTuner

_STATE = "fine_tune_state.json"
_STAGE1_WEIGHTS = "stage1.weights.h5"
_MODEL_FILE = "model.keras"


def fine_tune(model, train, validation=None, *, head_epochs=5, fine_tune_epochs=5,
              unfreeze="all", fine_tune_learning_rate=None, lr_factor=0.1,
              fine_tune_warmup=1.0, layerwise_lr_decay="auto", freeze_batchnorm=True, class_weight=None,
              batch_size=32, shuffle=True, cache_features="auto", early_stopping=3,
              callbacks=None, output_dir=None, overwrite=False, verbose="auto",
              initial_epoch=0, feature_cache_dir=None, keep_best_stage=True):
    """Trains the head on a frozen backbone, then fine-tunes the backbone.

    Args:
        model: A `FineTuner`, from `build_finetuner` or reloaded with
            `keras.models.load_model`. Its recipe gives the optimizer and
            base rate of both stages. Without class names, it takes the
            data's (an `ImageData`'s).
        train: A batched `tf.data.Dataset` of `(images, labels)`, a tuple
            `(x, y)` of arrays, or a `tftransfer.data.ImageData` (its
            validation split and class weights are used when not given).
        validation: Like `train`, or None.
        head_epochs: Integer, epochs of stage 1. Defaults to `5`.
        fine_tune_epochs: Integer, epochs of stage 2 (0 skips it).
        unfreeze: Freezing policy of stage 2 (`"all"`, `"top:N"`,
            `"fraction:F"`, regexes, callable). Defaults to `"all"`.
        fine_tune_learning_rate: The rate of stage 2: anything
            `build_finetuner(learning_rate=...)` takes (a float, a schedule
            name or `{"class_name", "config"}` dict, a Keras schedule); a
            `cosine`, `warmup_cosine` or `polynomial` dict without
            `decay_steps` decays over stage 2. Defaults to the stage-1 rate
            times `lr_factor`.
        lr_factor: Float in (0, 1], stage 2's rate as a fraction of stage
            1's. Defaults to `0.1`.
        fine_tune_warmup: Float >= 0, epochs over which a float stage-2
            rate ramps up linearly from nearly 0 (`optim.WarmupSchedule`; 0
            turns it off; a schedule passed as `fine_tune_learning_rate` is
            used as it is). Defaults to `1.0`.
        layerwise_lr_decay: `"auto"`, a float in (0, 1] or None: the k-th
            trainable backbone layer counted from the top learns at
            `rate * decay**k` (fastai's `slice(lo, hi)`); the head at `rate`.
            `"auto"` (the default) picks the decay that spreads the
            backbone's rates over 30x, top to bottom, whatever its depth;
            None trains the whole backbone at `rate`.
        freeze_batchnorm: Keep BatchNormalization in inference mode in
            stage 2. Defaults to `True`.
        class_weight: Optional dict `{class: weight}`.
        batch_size: Batch size for array inputs. Defaults to `32`.
        shuffle: Shuffle array inputs and cached features each epoch.
        cache_features: `"auto"` (cache when the data is not augmented),
            `True`, `False`, or `"disk"` (a tf.data cache file under
            `output_dir`, for sets too large for memory).
        feature_cache_dir: Optional directory shared between runs, e.g. by
            the trials of a search: the features of the frozen backbone
            (computed when `cache_features` caches in memory) are kept there,
            keyed by the backbone's weights and preprocessing and by each
            image, and read back instead of running the backbone again.
        early_stopping: Integer patience of EarlyStopping (best weights
            restored), or None to turn it off. Defaults to `3`.
        callbacks: Optional list of more Keras callbacks (both stages).
        output_dir: Optional directory for the final `model.keras` (the
            restored best weights), backups (a killed run resumes), logs and
            plots. It is locked while the run lasts (a second process gets
            an error naming the first), and keeps a fingerprint of the data
            and settings: a rerun with other data refuses to mix them. Under
            multi-worker training only the chief writes there; the other
            workers keep their state in `output_dir/workers/<task>-<index>`.
        overwrite: Boolean, start over in an `output_dir` that holds a
            finished run, or an unfinished one with other data or settings.
            Defaults to `False`.
        verbose: Passed to `fit`.
        initial_epoch: Integer, the epoch of the two-stage schedule to start
            at, for a model that already ran the epochs before it (as
            KerasTuner's Hyperband does when it trains a trial further).
            Epochs `[0, head_epochs)` are stage 1 and the next
            `fine_tune_epochs` are stage 2; from `head_epochs` on, stage 1 is
            skipped. Defaults to `0`.
        keep_best_stage: Boolean: when stage 2 never beats stage 1's best
            validation loss (training loss without validation data), the
            model gets its stage-1 weights back, with a warning. Defaults to
            `True`.

    Returns:
        A `keras.callbacks.History` covering both stages; its `stages`
        attribute maps `"head"` and `"fine_tune"` to `(first, end)` epochs
        (counted from 0, so the first is `initial_epoch`), and
        `restored_stage1` says whether stage 2 never beat stage 1, so the
        model kept the stage-1 weights.

    Raises:
        FloatingPointError: The loss became NaN or inf; the last good
            epoch's weights are restored and the run in `output_dir` is
            marked failed (the same call retries it).
    """
    model = _check_model(model)
    _checks.fine_tune_arguments(**locals())
    _stage2.check_rate(fine_tune_learning_rate)
    _stage2.check_warmup(fine_tune_warmup)
    _checks.fine_tune_data(model, train, validation, class_weight)
    data = _Data.of(train, validation, class_weight, batch_size, shuffle)
    data.adopt_class_names(model)
    data.warn_if_unit_range(model)
    settings = dict(head_epochs=head_epochs, fine_tune_epochs=fine_tune_epochs,
                    unfreeze=unfreeze, fine_tune_learning_rate=fine_tune_learning_rate,
                    lr_factor=lr_factor, fine_tune_warmup=fine_tune_warmup,
                    layerwise_lr_decay=layerwise_lr_decay,
                    batch_size=batch_size, class_weight=class_weight, source=model.source,
                    num_classes=model.num_classes, task=model.task,
                    keep_best_stage=keep_best_stage)
    with _strategy_scope(model):  # head model, optimizers and state in the model's strategy
        state = _State(distribute.worker_directory(output_dir, model.distribute_strategy),
                       overwrite, _fingerprint(data, settings) if output_dir else None)
        with state:
            history = _run(model, data, state, settings, initial_epoch,
                           (cache_features, feature_cache_dir), freeze_batchnorm,
                           dict(callbacks=callbacks, early_stopping=early_stopping,
                                verbose=verbose))
            if output_dir:
                reports.write_training_plots(model, history, data.validation, output_dir,
                                             data.class_names)
    return history


def _run(model, data, state, settings, initial_epoch, cache, freeze_batchnorm, common):
    """Both stages, resumed from what `state` has finished."""
    head_epochs, fine_tune_epochs = settings["head_epochs"], settings["fine_tune_epochs"]
    base_lr = model.base_learning_rate
    if state.stage1_done:
        model.load_weights(state.path(_STAGE1_WEIGHTS))
        first = state.stage1_history
    else:
        first = _stage1(model, data, (initial_epoch, head_epochs), base_lr, cache, state, common)
        state.finish_stage1(model, first)
    stage1_weights = [np.array(w) for w in model.weights]
    second, start = {}, initial_epoch + len(next(iter(first.values()), []))
    if fine_tune_epochs:
        lr = _stage2.stage2_rate(model, settings["fine_tune_learning_rate"],
                                 settings["lr_factor"], settings["fine_tune_warmup"],
                                 _batches(data.train), fine_tune_epochs)
        model.freeze(settings["unfreeze"], freeze_batchnorm=freeze_batchnorm)
        model.compile_stage(lr, layerwise_lr_decay=settings["layerwise_lr_decay"])
        done = max(0, initial_epoch - head_epochs)  # stage-2 epochs run before
        second = _fit(model, data.train, data.validation, data.class_weight, start,
                      start + fine_tune_epochs - done, state, "stage2", common).history
    if state.directory:  # The log holds epochs run before an interruption too.
        second = _stage2_rows(state.path("history.csv"), start)
    history = _merge(model, first, second, initial_epoch)
    history.restored_stage1 = settings["keep_best_stage"] and _keep_better_stage(
        model, first, second, stage1_weights, data.validation is not None)
    state.finish(model, history)
    return history


def _keep_better_stage(model, first, second, stage1_weights, has_validation):
    """Restores the stage-1 weights when stage 2 never beat them.

    Returns:
        Whether it did.
    """
    key = "val_loss" if has_validation else "loss"
    before, after = first.get(key), second.get(key)
    if not before or not after or min(after) <= min(before):
        return False
    for variable, value in zip(model.weights, stage1_weights):
        variable.assign(value)
    warnings.warn(
        f"Stage 2 (fine-tuning the backbone) never beat stage 1's best {key} "
        f"({min(after):.4g} > {min(before):.4g}): the model keeps the stage-1 weights. "
        "Try a lower `fine_tune_learning_rate` or `lr_factor`, or `unfreeze` fewer layers.",
        stacklevel=4,
    )
    return True


def _check_model(model):
    if not isinstance(model, FineTuner):
        raise ValueError(
            "`model` must be a tftransfer.FineTuner, as `build_finetuner` returns (or "
            "`keras.models.load_model` of one saved after `import tftransfer`). "
            f"Received: model of type {type(model).__name__}"
        )
    return model


def _strategy_scope(model):
    """The scope of the strategy the model was built in, unless already in it."""
    strategy = model.distribute_strategy
    if tf.distribute.get_strategy() is strategy:
        return contextlib.nullcontext()
    return strategy.scope()


class _Data:
    """The train / validation datasets, whatever form they came in."""

    def __init__(self, train, validation, class_weight, augmented, class_names=None,
                 shuffle=True):
        self.train, self.validation, self.shuffle = train, validation, shuffle
        self.class_weight, self.augmented = class_weight, augmented
        self.class_names = class_names

    @classmethod
    def of(cls, train, validation, class_weight, batch_size, shuffle):
        augmented, names, image_data = False, None, None
        if hasattr(train, "train") and hasattr(train, "class_names"):  # ImageData
            validation = train.validation if validation is None else validation
            class_weight = train.class_weight if class_weight is None else class_weight
            augmented, names = bool(getattr(train, "augmented", False)), train.class_names
            image_data, train = train, train.train
        data = cls(_dataset(train, batch_size, shuffle, "train"),
                   _dataset(validation, batch_size, False, "validation"), class_weight,
                   augmented, names, shuffle)
        data.arrays = train if isinstance(train, (tuple, list)) else None
        data.image_data = image_data
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


def _dataset(data, batch_size, shuffle, name):
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


def _stage1(model, data, epochs, base_lr, cache, state, common):
    """Epochs `[start, end)` of the head on the frozen backbone (none from `end` on)."""
    (start, end), (cache_features, shared_dir) = epochs, cache
    use_cache = _use_cache(cache_features, data)
    if start >= end:
        return {}
    model.freeze("none")
    model.compile_stage(base_lr)
    if not use_cache:
        return _fit(model, data.train, data.validation, data.class_weight, start, end, state,
                    "stage1", common).history
    head = distribute.prepare_model(model.head_model(base_lr))
    extract = tf.function(model.extract_features)
    on_disk = cache_features == "disk" and state.directory
    store = None
    if shared_dir and not on_disk:
        store = _feature_store.FeatureStore(shared_dir, _feature_store.backbone_key(model))
    verbose = 0 if common["verbose"] == 0 else 1
    train = _cached(data.train, extract, state.path("feature_cache", "train") if on_disk else "",
                    data.shuffle, store, verbose)
    val = _cached(data.validation, extract,
                  state.path("feature_cache", "val") if on_disk else "", store=store,
                  verbose=verbose)
    return _fit(head, train, val, data.class_weight, start, end, state, "stage1",
                common).history


def _use_cache(cache_features, data):
    if cache_features not in ("auto", True, False, "disk"):
        raise ValueError(
            '`cache_features` must be "auto", True, False or "disk". '
            f"Received: cache_features={cache_features!r}"
        )
    return bool(cache_features) and not data.augmented


def _cached(dataset, extract, filename, shuffle=False, store=None, verbose=1):
    """Backbone features computed once, with a progress bar: in memory (read
    from `store` when it holds them) while they fit the cache budget
    (`tftransfer._memory`: `$TFTRANSFER_CACHE_BUDGET`, else 10% of RAM), else
    in a tf.data cache file: `filename`, or a temporary one removed at exit."""
    if dataset is None:
        return None
    if not filename:
        extracted = _extract_all(dataset, _for_any_batch(extract, dataset), store, verbose)
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
                      f"disk in {folder} instead.", stacklevel=4)
    os.makedirs(os.path.dirname(filename), exist_ok=True)
    cached = dataset.map(lambda x, *rest: (extract(x), *rest)).cache(filename)
    bar = keras.utils.Progbar(_batches(dataset), verbose=verbose, unit_name="batch")
    for step, _ in enumerate(cached, start=1):  # computed here, read from disk by fit
        bar.update(step)
    return (cached.shuffle(256, reshuffle_each_iteration=True) if shuffle else cached).prefetch(2)


def _batches(dataset):
    """The number of batches of `dataset`, or None when unknown."""
    count = int(dataset.cardinality())
    return count if count >= 0 else None


def _for_any_batch(extract, dataset):
    """`extract` traced once for every batch size of `dataset` (not once per
    size), on its first call: never when stored features cover the data."""
    spec = dataset.element_spec[0]
    if not isinstance(spec, tf.TensorSpec):
        return extract
    spec = tf.TensorSpec([None, *spec.shape[1:]], spec.dtype)
    return lambda images: extract.get_concrete_function(spec)(images)


def _extract_all(dataset, extract, store=None, verbose=1, budget=None):
    """One pass of the backbone over `dataset`: features and the other columns.

    With a `_feature_store.FeatureStore`, batches it holds skip the backbone
    and the new ones are written to it. A progress bar shows the pass.
    Returns None, having stopped early, when the columns would exceed
    `budget` bytes (default: the cache budget of `tftransfer._memory`),
    estimated after the first batch from the number of batches.
    """
    features = (lambda images: store.features(images, extract)) if store else extract
    budget = _memory.budget() if budget is None else budget
    target = _batches(dataset)
    bar = keras.utils.Progbar(target, verbose=verbose, unit_name="batch")
    batches, nbytes = [], 0
    for step, batch in enumerate(dataset, start=1):
        batches.append([np.asarray(column) for column in (features(batch[0]), *batch[1:])])
        nbytes += sum(column.nbytes for column in batches[-1])
        if max(nbytes, nbytes / step * (target or 0)) > budget:
            return None
        bar.update(step)
    if store:
        store.save()
    columns = [np.concatenate([b[i] for b in batches]) for i in range(len(batches[0]))]
    return columns, int(batches[0][0].shape[0])


def _fit(model, train, validation, class_weight, initial_epoch, epochs, state, stage, common):
    guard = _NaNGuard()
    callbacks = [guard] + _callbacks(state, stage, validation is not None, **common)
    if not model.optimizer.built:  # Built while tracing, it would make Keras trace twice.
        model.optimizer.build(model.trainable_variables)
    history = model.fit(train, validation_data=validation, epochs=epochs, shuffle=False,
                        initial_epoch=initial_epoch, class_weight=class_weight,
                        callbacks=callbacks, verbose=common["verbose"])
    if guard.bad_epoch is not None:
        state.fail(stage, initial_epoch)
        raise FloatingPointError(
            f"The training loss became {guard.bad_loss} (NaN or inf) in epoch {guard.bad_epoch + 1}, batch "
            f"{guard.bad_batch + 1} of {_STAGE_NAMES[stage]}: the weights of the last good epoch "
            "are restored and the run is marked failed, not done (the same call retries it). "
            "Lower the learning rate (`learning_rate`, `fine_tune_learning_rate` or "
            "`lr_factor`), or check the data for extreme values."
        )
    return history


_STAGE_NAMES = {"stage1": "stage 1 (head)", "stage2": "stage 2 (fine-tuning)"}


class _NaNGuard(keras.callbacks.Callback):
    """Stops at the first NaN or inf loss and restores the last good epoch's weights."""

    def __init__(self):
        super().__init__()
        self.bad_epoch = self.bad_batch = self.bad_loss = None
        self._good, self._epoch = None, 0

    def _keep(self):
        self._good = [np.array(w) for w in self.model.weights]

    def on_train_begin(self, logs=None):
        self._keep()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)) and self.bad_epoch is None:
            self.bad_epoch, self.bad_batch, self.bad_loss = self._epoch, batch, float(loss)
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.bad_epoch is None:
            self._keep()

    def on_train_end(self, logs=None):
        if self.bad_epoch is not None:
            for variable, value in zip(self.model.weights, self._good):
                variable.assign(value)


def _callbacks(state, stage, has_validation, callbacks, early_stopping, verbose):
    monitor = "val_loss" if has_validation else "loss"
    result = []
    if early_stopping:
        result.append(keras.callbacks.EarlyStopping(monitor=monitor, patience=early_stopping,
                                                    restore_best_weights=True))
    if state.directory:
        result += [
            keras.callbacks.BackupAndRestore(state.path("backup", stage)),
            keras.callbacks.CSVLogger(state.path("history.csv"), append=True),
            keras.callbacks.TensorBoard(state.path("logs"), write_graph=False),
        ]
    return result + list(callbacks or [])


def _stage2_rows(path, start):
    """Reads the stage-2 epochs (the last row of each epoch) from the CSV log."""
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            for row in csv.DictReader(f):
                rows[int(row.pop("epoch"))] = row
    epochs = sorted(e for e in rows if e >= start)
    keys = list(rows[epochs[0]]) if epochs else []
    return {k: [float(rows[e][k]) for e in epochs] for k in keys}


def _merge(model, first, second, initial_epoch=0):
    history = keras.callbacks.History()
    history.set_model(model)
    keys = list(dict.fromkeys(list(first) + list(second)))
    history.history = {k: list(first.get(k, [])) + list(second.get(k, [])) for k in keys}
    n1 = len(next(iter(first.values()), []))
    n2 = len(next(iter(second.values()), []))
    start, middle = initial_epoch, initial_epoch + n1
    history.epoch = list(range(start, middle + n2))
    history.stages = {"head": (start, middle), "fine_tune": (middle, middle + n2)}
    return history


def _fingerprint(data, settings):
    """What a rerun in the same `output_dir` must share to resume it."""
    plain = {k: (v if isinstance(v, (str, int, float, bool, type(None), list, dict))
                 else keras.saving.serialize_keras_object(v) if hasattr(v, "get_config")
                 else repr(v)) for k, v in settings.items()}
    return {"data": data.fingerprint(), "settings": json.loads(json.dumps(plain, default=str))}


class _State:
    """What a run in `output_dir` has finished, so a restart resumes it.

    Used as a context manager, it holds the directory's lock: a second
    process on the same `output_dir` is refused at once.
    """

    def __init__(self, directory, overwrite, fingerprint=None):
        self.directory = os.fspath(directory) if directory else None
        self.data, self.fingerprint, self._lock = {}, fingerprint, None
        if not self.directory:
            return
        os.makedirs(self.directory, exist_ok=True)
        self._lock = _lock.DirectoryLock(self.directory, what="fine_tune output_dir")
        self._lock.acquire()
        try:
            self._load(overwrite)
        except BaseException:
            self._lock.release()
            raise

    def _load(self, overwrite):
        if os.path.exists(self.path(_STATE)):
            with open(self.path(_STATE)) as f:
                self.data = json.load(f)
        if overwrite and self.data:
            self._clear()
        elif self.data.get("done"):
            raise FileExistsError(
                f"`output_dir` {self.directory!r} holds a finished fine_tune run; pass "
                "overwrite=True to replace it, or choose another output_dir."
            )
        elif self.data and self.fingerprint and self.data.get("fingerprint") != self.fingerprint:
            old = self.data.get("fingerprint") or {}
            changed = [k for k, v in self.fingerprint["settings"].items()
                       if old.get("settings", {}).get(k) != v]
            if old.get("data") != self.fingerprint["data"]:
                changed.insert(0, "the training data")
            raise ValueError(
                f"`output_dir` {self.directory!r} holds an unfinished fine_tune run with other "
                f"data or settings (changed: {', '.join(changed) or 'unknown'}); resuming it "
                "would mix both. Pass overwrite=True to start over, or choose another "
                f"output_dir. Received: output_dir={self.directory!r}"
            )
        if self.directory and self.fingerprint:
            self._write(fingerprint=self.fingerprint)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._lock is not None:
            self._lock.release()

    def _clear(self):
        for name in (_STATE, _STAGE1_WEIGHTS, _MODEL_FILE, "history.csv", "backup",
                     "feature_cache", "logs"):
            path = self.path(name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        self.data = {}

    def path(self, *parts):
        return os.path.join(self.directory, *parts) if self.directory else None

    @property
    def stage1_done(self):
        return "stage1_history" in self.data

    @property
    def stage1_history(self):
        return self.data["stage1_history"]

    def finish_stage1(self, model, history):
        if self.directory:
            model.save_weights(self.path(_STAGE1_WEIGHTS))
            self._write(stage1_history=_plain(history))

    def finish(self, model, history):
        """Saves `model.keras` (the final, restored-best weights), then marks the run done."""
        if not self.directory:
            return
        tmp = self.path(f".{_MODEL_FILE}.{os.getpid()}.tmp.keras")
        model.save(tmp)
        os.replace(tmp, self.path(_MODEL_FILE))
        self.data.pop("failed", None)
        self._write(done=True, history=_plain(history.history), stages=history.stages)

    def fail(self, stage, start_epoch):
        """Marks the run failed in `stage`: a rerun starts that stage again."""
        if not self.directory:
            return
        shutil.rmtree(self.path("backup", stage), ignore_errors=True)
        _drop_rows(self.path("history.csv"), start_epoch)
        if stage == "stage1":
            self.data.pop("stage1_history", None)
        self._write(failed={"stage": stage, "epoch": start_epoch}, done=False)

    def _write(self, **values):
        self.data.update(values)
        _lock.atomic_write_json(self.path(_STATE), self.data)


def _drop_rows(path, start):
    """Removes the epochs from `start` on from the CSV log."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) < start]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(kept)


def _plain(history):
    return {k: [float(v) for v in values] for k, values in history.items()}

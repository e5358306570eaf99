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
import json
import os
import shutil
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from tftransfer import _feature_store, _memory, distribute, freezing, optim, reports

_STATE = "fine_tune_state.json"
_STAGE1_WEIGHTS = "stage1.weights.h5"


def fine_tune(model, train, validation=None, *, head_epochs=5, fine_tune_epochs=5,
              unfreeze="all", fine_tune_learning_rate=None, lr_factor=0.1,
              layerwise_lr_decay=None, freeze_batchnorm=True, class_weight=None,
              batch_size=32, shuffle=True, cache_features="auto", early_stopping=3,
              callbacks=None, output_dir=None, overwrite=False, verbose="auto",
              initial_epoch=0, feature_cache_dir=None):
    """Trains the head on a frozen backbone, then fine-tunes the backbone.

    Args:
        model: A compiled model from `build_finetuner` (layers `"backbone"`
            and `"predictions"`).
        train: A batched `tf.data.Dataset` of `(images, labels)`, a tuple
            `(x, y)` of arrays, or a `tftransfer.data.ImageData` (its
            validation split and class weights are used when not given).
        validation: Like `train`, or None.
        head_epochs: Integer, epochs of stage 1. Defaults to `5`.
        fine_tune_epochs: Integer, epochs of stage 2 (0 skips it).
        unfreeze: Freezing policy of stage 2 (`"all"`, `"top:N"`,
            `"fraction:F"`, regexes, callable). Defaults to `"all"`.
        fine_tune_learning_rate: Float or schedule for stage 2; defaults to
            the stage-1 rate times `lr_factor`.
        lr_factor: Float in (0, 1]. Defaults to `0.1`.
        layerwise_lr_decay: Optional float in (0, 1]: the k-th trainable
            backbone layer counted from the top learns at
            `rate * decay**k` (fastai's `slice(lo, hi)`); the head at `rate`.
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
        output_dir: Optional directory for backups, logs and plots. Under
            multi-worker training only the chief writes there; the other
            workers keep their state in `output_dir/workers/<task>-<index>`.
        overwrite: Boolean, allow reusing an `output_dir` holding a finished
            run. Defaults to `False`.
        verbose: Passed to `fit`.
        initial_epoch: Integer, the epoch of the two-stage schedule to start
            at, for a model that already ran the epochs before it (as
            KerasTuner's Hyperband does when it trains a trial further).
            Epochs `[0, head_epochs)` are stage 1 and the next
            `fine_tune_epochs` are stage 2; from `head_epochs` on, stage 1 is
            skipped. Defaults to `0`.

    Returns:
        A `keras.callbacks.History` covering both stages; its `stages`
        attribute maps `"head"` and `"fine_tune"` to `(first, end)` epochs
        (counted from 0, so the first is `initial_epoch`).
    """
    _check_epochs(head_epochs, fine_tune_epochs, lr_factor, layerwise_lr_decay)
    _check_initial_epoch(initial_epoch, head_epochs + fine_tune_epochs)
    data = _Data.of(train, validation, class_weight, batch_size, shuffle)
    with _strategy_scope(model):  # head model, optimizers and state in the model's strategy
        state = _State(distribute.worker_directory(output_dir, model.distribute_strategy),
                       overwrite)
        backbone = _backbone(model)
        base_lr = _base_learning_rate(model.optimizer)
        common = dict(callbacks=callbacks, early_stopping=early_stopping, verbose=verbose)
        if state.stage1_done:
            model.load_weights(state.path(_STAGE1_WEIGHTS))
            first = state.stage1_history
        else:
            first = _stage1(model, backbone, data, (initial_epoch, head_epochs), base_lr,
                            (cache_features, feature_cache_dir), state, common)
            state.finish_stage1(model, first)
        second, start = {}, initial_epoch + len(next(iter(first.values()), []))
        if fine_tune_epochs:
            lr = fine_tune_learning_rate if fine_tune_learning_rate is not None else base_lr * lr_factor
            freezing.apply(backbone, unfreeze, freeze_batchnorm=freeze_batchnorm)
            _compile_like(model, model, _stage2_optimizer(model, backbone, lr, layerwise_lr_decay))
            done = max(0, initial_epoch - head_epochs)  # stage-2 epochs run before
            second = _fit(model, data.train, data.validation, data.class_weight, start,
                          start + fine_tune_epochs - done, state, "stage2", common).history
        if state.directory:  # The log holds epochs run before an interruption too.
            second = _stage2_rows(state.path("history.csv"), start)
        history = _merge(model, first, second, initial_epoch)
        state.finish(history)
        if output_dir:
            reports.write_training_plots(model, history, data.validation, output_dir,
                                         data.class_names)
    return history


def _strategy_scope(model):
    """The scope of the strategy the model was built in, unless already in it."""
    strategy = model.distribute_strategy
    if tf.distribute.get_strategy() is strategy:
        return contextlib.nullcontext()
    return strategy.scope()


def _check_epochs(head_epochs, fine_tune_epochs, lr_factor, decay):
    for name, value in (("head_epochs", head_epochs), ("fine_tune_epochs", fine_tune_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{name}` must be an integer >= 0. Received: {name}={value!r}")
    if not 0 < lr_factor <= 1:
        raise ValueError(f"`lr_factor` must be in (0, 1]. Received: lr_factor={lr_factor!r}")
    if decay is not None and not 0 < decay <= 1:
        raise ValueError(
            f"`layerwise_lr_decay` must be None or in (0, 1]. Received: layerwise_lr_decay={decay!r}"
        )


def _check_initial_epoch(initial_epoch, total):
    ok = not isinstance(initial_epoch, bool) and isinstance(initial_epoch, int)
    if not ok or not 0 <= initial_epoch < max(1, total):
        raise ValueError(
            "`initial_epoch` must be an integer from 0 to head_epochs + fine_tune_epochs - 1 "
            f"(here {max(1, total) - 1}). Received: initial_epoch={initial_epoch!r}"
        )


class _Data:
    """The train / validation datasets, whatever form they came in."""

    def __init__(self, train, validation, class_weight, augmented, class_names=None,
                 shuffle=True):
        self.train, self.validation, self.shuffle = train, validation, shuffle
        self.class_weight, self.augmented = class_weight, augmented
        self.class_names = class_names

    @classmethod
    def of(cls, train, validation, class_weight, batch_size, shuffle):
        augmented, names = False, None
        if hasattr(train, "train") and hasattr(train, "class_names"):  # ImageData
            validation = train.validation if validation is None else validation
            class_weight = train.class_weight if class_weight is None else class_weight
            augmented, names = bool(getattr(train, "augmented", False)), train.class_names
            train = train.train
        return cls(_dataset(train, batch_size, shuffle, "train"),
                   _dataset(validation, batch_size, False, "validation"), class_weight,
                   augmented, names, shuffle)


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


def _backbone(model):
    try:
        return model.get_layer("backbone")
    except ValueError:
        raise ValueError(
            "`model` must come from `build_finetuner` (it has no layer named "
            f"'backbone'). Received: model={model.name!r}"
        ) from None


def _base_learning_rate(optimizer):
    lr = optimizer._learning_rate if hasattr(optimizer, "_learning_rate") else optimizer.learning_rate
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        for attr in ("warmup_target", "initial_learning_rate"):
            if getattr(lr, attr, None):
                return float(getattr(lr, attr))
        return float(lr(0))
    return float(keras.ops.convert_to_numpy(lr))


def _compile_like(target, source, optimizer):
    """Compiles `target` with `optimizer`, `source`'s loss and fresh `source` metrics."""
    metrics = keras.saving.deserialize_keras_object(source.get_compile_config().get("metrics"))
    target.compile(optimizer=optimizer, loss=source.loss, metrics=metrics)


def _fresh_optimizer(model, learning_rate):
    """A new optimizer of the model's kind and settings at `learning_rate`."""
    current = model.optimizer
    if isinstance(current, keras.optimizers.MultiOptimizer):
        current = current.optimizers[0]
    config = {**current.get_config(), "learning_rate": optim.get_schedule(learning_rate)}
    optimizer = type(current).from_config(config)
    if config.get("weight_decay"):
        optimizer.exclude_from_weight_decay(var_names=optim.NO_DECAY)
    return optimizer


def _stage1(model, backbone, data, epochs, base_lr, cache, state, common):
    """Epochs `[start, end)` of the head on the frozen backbone (none from `end` on)."""
    (start, end), (cache_features, shared_dir) = epochs, cache
    use_cache = _use_cache(cache_features, data)
    if start >= end:
        return {}
    freezing.apply(backbone, "none")
    _compile_like(model, model, _fresh_optimizer(model, base_lr))
    if use_cache:
        head = _head_model(model, backbone)
        _compile_like(head, model, _fresh_optimizer(model, base_lr))
        extract = _extractor(model, backbone)
        on_disk = cache_features == "disk" and state.directory
        store = None
        if shared_dir and not on_disk:
            store = _feature_store.FeatureStore(
                shared_dir, _feature_store.backbone_key(model, backbone))
        train = _cached(data.train, extract, state.path("feature_cache", "train") if on_disk else "",
                        data.shuffle, store)
        val = _cached(data.validation, extract,
                      state.path("feature_cache", "val") if on_disk else "", store=store)
        return _fit(head, train, val, data.class_weight, start, end, state, "stage1",
                    common).history
    return _fit(model, data.train, data.validation, data.class_weight, start, end, state,
                "stage1", common).history


def _use_cache(cache_features, data):
    if cache_features not in ("auto", True, False, "disk"):
        raise ValueError(
            '`cache_features` must be "auto", True, False or "disk". '
            f"Received: cache_features={cache_features!r}"
        )
    return bool(cache_features) and not data.augmented


def _head_model(model, backbone):
    """The layers after the backbone, as a model on features."""
    layers = model.layers[model.layers.index(backbone) + 1:]
    inputs = keras.Input(backbone.output.shape[1:], name="features")
    x = inputs
    for layer in layers:
        x = layer(x)
    return distribute.prepare_model(keras.Model(inputs, x, name="head"))


def _extractor(model, backbone):
    preprocessing = model.get_layer("preprocessing")

    @tf.function
    def extract(images):
        return backbone(preprocessing(images), training=False)

    return extract


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


def _stage2_optimizer(model, backbone, learning_rate, decay):
    if decay is None or decay == 1:
        return _fresh_optimizer(model, learning_rate)
    rates = layerwise_rates(backbone, learning_rate, decay)
    groups = {rate: _fresh_optimizer(model, rate) for rate in {learning_rate, *rates.values()}}
    head = groups[learning_rate]
    # Called while the train step is traced: only look-ups here.
    return keras.optimizers.MultiOptimizer(
        lambda variable: groups[rates[variable.path]] if variable.path in rates else head)


def layerwise_rates(backbone, learning_rate, decay):
    """Maps variable paths of trainable backbone layers to their rates.

    The top trainable layer gets `learning_rate * decay`, the next
    `learning_rate * decay**2`, and so on down to the input.
    """
    layers = [layer for layer in freezing.leaf_layers(backbone) if layer.trainable_weights]
    rates = {}
    for depth, layer in enumerate(reversed(layers), start=1):
        for variable in layer.trainable_weights:
            rates[variable.path] = learning_rate * decay**depth
    return rates


def _fit(model, train, validation, class_weight, initial_epoch, epochs, state, stage, common):
    callbacks = _callbacks(state, stage, validation is not None, **common)
    if not model.optimizer.built:  # Built while tracing, it would make Keras trace twice.
        model.optimizer.build(model.trainable_variables)
    return model.fit(train, validation_data=validation, epochs=epochs, shuffle=False,
                     initial_epoch=initial_epoch, class_weight=class_weight,
                     callbacks=callbacks, verbose=common["verbose"])


def _callbacks(state, stage, has_validation, callbacks, early_stopping, verbose):
    monitor = "val_loss" if has_validation else "loss"
    result = [keras.callbacks.TerminateOnNaN()]
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


class _State:
    """What a run in `output_dir` has finished, so a restart resumes it."""

    def __init__(self, directory, overwrite):
        self.directory = os.fspath(directory) if directory else None
        self.data = {}
        if not self.directory:
            return
        os.makedirs(self.directory, exist_ok=True)
        if os.path.exists(self.path(_STATE)):
            with open(self.path(_STATE)) as f:
                self.data = json.load(f)
        if self.data.get("done"):
            if not overwrite:
                raise FileExistsError(
                    f"`output_dir` {self.directory!r} holds a finished fine_tune run; pass "
                    "overwrite=True to replace it, or choose another output_dir."
                )
            self._clear()

    def _clear(self):
        for name in (_STATE, _STAGE1_WEIGHTS, "history.csv", "backup", "feature_cache", "logs"):
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

    def finish(self, history):
        if self.directory:
            self._write(done=True, history=_plain(history.history), stages=history.stages)

    def _write(self, **values):
        self.data.update(values)
        tmp = self.path(_STATE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path(_STATE))


def _plain(history):
    return {k: [float(v) for v in values] for k, values in history.items()}

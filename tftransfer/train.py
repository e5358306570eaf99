"""Two-stage fine-tuning, the recipe experts run by hand.

Stage 1 trains the head on a frozen backbone (on cached backbone features when
nothing random happens before the head); stage 2 unfreezes part of the backbone
and continues, from the stage-1 epoch count, at a lower learning rate,
optionally with layer-wise (discriminative) rates. Safety nets are on by
default: EarlyStopping with best weights restored, TerminateOnNaN, and with an
`output_dir` also per-epoch backups (a killed run resumes where it was),
TensorBoard and CSV logs, `curves.png` and `confusion_matrix.png`.

Example:

>>> model = build_finetuner("saved_models/digits_cnn.keras", num_classes=5)
>>> history = fine_tune(model, (x, y), (x_val, y_val), head_epochs=5,
...                     fine_tune_epochs=5, unfreeze="top:1", output_dir="runs/a")
"""

import contextlib
import dataclasses
import math
import warnings

import keras
import numpy as np
import tensorflow as tf

from tftransfer import (
    _backup,
    _checks,
    _feature_cache,
    _run_state,
    _stage2_rate,
    distribute,
    optim,
    report_html,
    reports,
)
from tftransfer._nan_guard import NaNGuard
from tftransfer._train_data import TrainData
from tftransfer.model import FineTuner


def fine_tune(model, train, validation=None, *, head_epochs=5, fine_tune_epochs=5,
              unfreeze="all", fine_tune_learning_rate=None, lr_factor=0.03,
              fine_tune_warmup=2.0, layerwise_lr_decay="auto", fine_tune_ema="auto",
              freeze_batchnorm=None, class_weight=None,
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
            1's. Defaults to `0.03` (see `docs/stage2.md`).
        fine_tune_warmup: Float >= 0, epochs over which a float stage-2
            rate ramps up linearly from nearly 0 (`optim.WarmupSchedule`; 0
            turns it off; a schedule passed as `fine_tune_learning_rate` is
            used as it is). Defaults to `2.0`.
        fine_tune_ema: Stage 2 keeps an exponential moving average of the
            weights (Keras's `use_ema`) spanning about this many epochs;
            validation, early stopping and the final model use the average
            (`keras.callbacks.SwapEMAWeights`). `"auto"`: 40% of
            `fine_tune_epochs`; 0 or None turns it off. Defaults to `"auto"`.
        layerwise_lr_decay: `"auto"`, a float in (0, 1] or None: the k-th
            trainable backbone layer counted from the top learns at
            `rate * decay**k` (fastai's `slice(lo, hi)`); the head at `rate`.
            `"auto"` (the default) picks the decay that spreads the rates
            over 30x, head to bottom layer, whatever the depth; None trains
            the whole backbone at `rate`.
        freeze_batchnorm: Keep BatchNormalization in inference mode in
            stage 2. Defaults to None: the recipe's (`build_finetuner`'s).
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
            restored), or None to turn it off. In stage 2 it watches from
            the end of `fine_tune_warmup`. Defaults to `3`.
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
    _checks.fine_tune_arguments(
        model=model, head_epochs=head_epochs, fine_tune_epochs=fine_tune_epochs, unfreeze=unfreeze,
        fine_tune_learning_rate=fine_tune_learning_rate, lr_factor=lr_factor,
        layerwise_lr_decay=layerwise_lr_decay, freeze_batchnorm=freeze_batchnorm,
        batch_size=batch_size, shuffle=shuffle, early_stopping=early_stopping,
        overwrite=overwrite, initial_epoch=initial_epoch, keep_best_stage=keep_best_stage)
    _stage2_rate.check_rate(fine_tune_learning_rate)
    _stage2_rate.check_warmup(fine_tune_warmup)
    _stage2_rate.check_ema(fine_tune_ema)
    _checks.fine_tune_data(model, train, validation, class_weight)
    settings = _Settings(
        head_epochs=head_epochs, fine_tune_epochs=fine_tune_epochs, unfreeze=unfreeze,
        fine_tune_learning_rate=fine_tune_learning_rate, lr_factor=lr_factor,
        fine_tune_warmup=fine_tune_warmup, layerwise_lr_decay=layerwise_lr_decay,
        fine_tune_ema=fine_tune_ema, freeze_batchnorm=freeze_batchnorm,
        batch_size=batch_size, class_weight=class_weight, keep_best_stage=keep_best_stage,
        initial_epoch=initial_epoch, cache_features=cache_features,
        feature_cache_dir=feature_cache_dir, early_stopping=early_stopping,
        callbacks=list(callbacks or []), verbose=verbose)
    data = TrainData.of(train, validation, class_weight, batch_size, shuffle)
    data.adopt_class_names(model)
    data.warn_if_unit_range(model)
    with _strategy_scope(model):  # head model, optimizers and state in the model's strategy
        fingerprint = (_run_state.fingerprint(data.fingerprint(), settings.resume_key(model))
                       if output_dir else None)
        state = _run_state.RunState(
            distribute.worker_directory(output_dir, model.distribute_strategy), overwrite,
            fingerprint)
        with state:
            history = _run(model, data, state, settings)
            if output_dir:
                reports.write_training_plots(model, history, data.validation, output_dir,
                                             data.class_names)
                report_html.write_run_report(output_dir, model, history, data.validation,
                                             data.class_names)
    return history


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The arguments of one `fine_tune` call, named once and passed down."""

    head_epochs: int
    fine_tune_epochs: int
    unfreeze: object
    fine_tune_learning_rate: object
    lr_factor: float
    fine_tune_warmup: float
    layerwise_lr_decay: object
    fine_tune_ema: object
    freeze_batchnorm: bool
    batch_size: int
    class_weight: object
    keep_best_stage: bool
    initial_epoch: int
    cache_features: object
    feature_cache_dir: object
    early_stopping: object
    callbacks: list
    verbose: object

    def resume_key(self, model):
        """The settings a resumed run must share with the run it resumes."""
        return {
            "head_epochs": self.head_epochs, "fine_tune_epochs": self.fine_tune_epochs,
            "unfreeze": self.unfreeze, "fine_tune_learning_rate": _plain(
                self.fine_tune_learning_rate), "lr_factor": self.lr_factor,
            "fine_tune_warmup": self.fine_tune_warmup,
            "layerwise_lr_decay": self.layerwise_lr_decay,
            "fine_tune_ema": self.fine_tune_ema,
            "batch_size": self.batch_size, "class_weight": self.class_weight,
            "keep_best_stage": self.keep_best_stage, **_model_key(model),
        }


def _model_key(model):
    """The model's own settings (source, task, head, recipe), as `model.*` and
    `recipe.*` keys: a run resumed with a model built otherwise would mix two runs."""
    config = model.get_config()
    own = {f"model.{k}": v for k, v in config.items()
           if k not in ("name", "trainable", "backbone", "class_names", "recipe")}
    return {**own, **{f"recipe.{k}": v for k, v in (config.get("recipe") or {}).items()}}


def _run(model, data, state, settings):
    """Both stages, resumed from what `state` has finished."""
    base_lr = model.base_learning_rate
    if state.stage1_done:
        model.load_weights(state.path(_run_state.STAGE1_WEIGHTS))
        first = state.stage1_history
    else:
        first = _stage1(model, data, base_lr, state, settings)
        if state.directory:  # with the epochs a killed run finished before this call
            first = state.logged(settings.initial_epoch, settings.head_epochs)
        state.finish_stage1(model, first)
    stage1_weights = [np.array(w) for w in model.weights]
    start = settings.initial_epoch + len(next(iter(first.values()), []))
    second = _stage2(model, data, base_lr, start, state, settings)
    if state.directory:  # The log holds epochs run before an interruption too.
        second = state.logged(start)
    history = _merge(model, first, second, settings.initial_epoch)
    history.restored_stage1 = settings.keep_best_stage and _keep_better_stage(
        model, first, second, stage1_weights, data.validation is not None)
    state.finish(model, history)
    return history


def _stage1(model, data, base_lr, state, settings):
    """Epochs `[initial_epoch, head_epochs)` of the head on the frozen backbone."""
    start, end = settings.initial_epoch, settings.head_epochs
    use_cache = _feature_cache.use_cache(settings.cache_features, data)
    if start >= end:
        return {}
    model.freeze("none")
    model.compile_stage(base_lr)
    if not use_cache:
        return _fit(model, data.train, data.validation, data.class_weight, (start, end),
                    state, "stage1", settings).history
    head = model.head_model(base_lr)
    train, val = _feature_cache.head_datasets(model, data, settings.cache_features,
                                              settings.feature_cache_dir, state,
                                              settings.verbose)
    return _fit(head, train, val, data.class_weight, (start, end), state, "stage1",
                settings).history


def _stage2(model, data, base_lr, start, state, settings):
    """The fine-tuning epochs from `start`, at the lower rate; {} when there are none."""
    if not settings.fine_tune_epochs:
        return {}
    steps = _feature_cache.batches(data.train)
    lr = _stage2_rate.stage2_rate(model, settings.fine_tune_learning_rate, settings.lr_factor,
                                  settings.fine_tune_warmup, steps, settings.fine_tune_epochs)
    ema = _stage2_rate.ema_momentum(settings.fine_tune_ema, steps, settings.fine_tune_epochs)
    model.freeze(settings.unfreeze, freeze_batchnorm=settings.freeze_batchnorm)
    model.compile_stage(lr, layerwise_lr_decay=settings.layerwise_lr_decay, ema_momentum=ema)
    done = max(0, settings.initial_epoch - settings.head_epochs)  # stage-2 epochs run before
    end = start + settings.fine_tune_epochs - done
    # Early stopping counts from the end of the warmup: while the rate ramps up, the
    # validation loss of a backbone being unfrozen is expected to rise before it falls.
    warm = math.ceil(settings.fine_tune_warmup) if isinstance(lr, optim.WarmupSchedule) else 0
    return _fit(model, data.train, data.validation, data.class_weight, (start, end), state,
                "stage2", settings, patience_from=start - done + warm,
                averaged=ema is not None).history


def _plain(rate):
    """A Keras schedule by its config (its repr changes from run to run)."""
    return keras.saving.serialize_keras_object(rate) if hasattr(rate, "get_config") else rate


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


def _fit(model, train, validation, class_weight, epochs, state, stage, settings,
         patience_from=0, averaged=False):
    """`model.fit` over epochs `[start, end)` of `stage`, guarded against NaN losses,
    from the stage's last good backup when a killed run left one; early stopping
    watches from epoch `patience_from`; with `averaged`, the optimizer's weight
    average is what is validated and kept."""
    guard = NaNGuard()
    callbacks = [guard] + _callbacks(state, stage, validation is not None, settings,
                                     patience_from, averaged)
    if not model.optimizer.built:  # Built while tracing, it would make Keras trace twice.
        model.optimizer.build(model.trainable_variables)
    start = epochs[0]
    if state.directory:
        start = _backup.restore(model, state.path("backup", stage), start)
        _run_state.drop_rows(state.path(_run_state.HISTORY_FILE), start)  # run again
    history = model.fit(train, validation_data=validation, epochs=epochs[1], shuffle=False,
                        initial_epoch=start, class_weight=class_weight,
                        callbacks=callbacks, verbose=settings.verbose)
    if guard.tripped:
        state.fail(stage, epochs[0])
        raise guard.error(stage)
    return history


def _callbacks(state, stage, has_validation, settings, patience_from=0, averaged=False):
    """The stage's callbacks, in the order they must run at each epoch's end:
    the backup (trained weights and optimizer state, so a resumed run goes on as
    the uninterrupted one), the swap to the averaged weights, then whatever
    judges or keeps the model (early stopping, logs, the user's callbacks)."""
    monitor = "val_loss" if has_validation else "loss"
    result = []
    if state.directory:
        result.append(_backup.EpochBackup(state.path("backup", stage)))
    if averaged:
        result.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    if settings.early_stopping:
        result.append(keras.callbacks.EarlyStopping(
            monitor=monitor, patience=settings.early_stopping, restore_best_weights=True,
            start_from_epoch=patience_from))
    if state.directory:
        result += [
            keras.callbacks.CSVLogger(state.path(_run_state.HISTORY_FILE), append=True),
            keras.callbacks.TensorBoard(state.path("logs"), write_graph=False),
        ]
    return result + settings.callbacks


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

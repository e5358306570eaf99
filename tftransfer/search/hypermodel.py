"""`FineTuneHyperModel`: `build_finetuner` + two-stage `fine_tune` per trial.

Fixed knobs of the search space stay constants; searched knobs are declared
on the trial's `HyperParameters` (`Choice`, `Float`, `Int`). `settings(hp)`
turns a trial's values into the exact keyword arguments of
`build_finetuner` and `fine_tune`, which is also what
`best_hyperparameters.yaml` holds.
"""

import collections
import gc
import hashlib
import json
import math

import keras
import keras_tuner as kt
from keras_tuner.src.engine.tuner_utils import SaveBestEpoch  # private: see _WholeModel

from tftransfer.finetuner import build_finetuner
from tftransfer.search import control
from tftransfer.train import fine_tune

BUILD_KNOBS = ("backbone", "optimizer", "dropout", "hidden_units", "label_smoothing",
               "preprocessor")
FIT_KNOBS = ("head_epochs", "fine_tune_epochs", "lr_factor", "layerwise_lr_decay",
             "fine_tune_warmup", "fine_tune_ema")
FEATURES_DIR = "features"  # in the search directory: stage-1 features shared by the trials


def _encode_units(units):
    return ",".join(str(u) for u in units) or "none"


def _decode_units(text):
    return [] if text == "none" else [int(u) for u in text.split(",")]


def sample(hp, name, spec):
    """The value of knob `name` for this trial, declaring it on `hp` if searched.

    Args:
        hp: A `keras_tuner.HyperParameters`.
        name: The knob name.
        spec: The knob's validated config: a fixed value, `{choice}`,
            `{min, max, sampling, step}` or `{int_min, int_max, step}`.

    Returns:
        The value, decoded (`hidden_units` a list, `unfreeze` a freeze policy string).
    """
    if not isinstance(spec, dict):
        return spec
    if "choice" in spec:
        if name == "hidden_units":
            return _decode_units(hp.Choice(name, [_encode_units(u) for u in spec["choice"]]))
        if len({type(v) for v in spec["choice"]}) > 1:  # e.g. layerwise_lr_decay: auto or 0.5
            value = hp.Choice(name, [str(v) for v in spec["choice"]])
            return next(v for v in spec["choice"] if str(v) == value)
        return hp.Choice(name, spec["choice"])
    if "int_min" in spec:
        value = hp.Int(name, spec["int_min"], spec["int_max"], step=spec["step"])
        return f"top:{value}" if name == "unfreeze" else value
    value = hp.Float(name, spec["min"], spec["max"], step=spec["step"],
                     sampling=spec["sampling"])
    return f"fraction:{value:.4g}" if name == "unfreeze" else value


class FineTuneHyperModel(kt.HyperModel):
    """Builds and fine-tunes one tftransfer model per trial.

    Args:
        space: The validated `search_space` config section.
        data: A `tftransfer.search.sources.SearchData`.
        strategy: A `tf.distribute.Strategy` (or None); the global batch size
            is the sampled batch size times its replicas.
        strategy_name: The config name of the strategy, written to the best
            hyperparameters.
        feature_cache_dir: Directory of the frozen-backbone features that
            the trials share (`fine_tune`'s `feature_cache_dir`), or None
            (no cache). The search's tuner sets it to `features/` in its
            `project_dir` (`tftransfer.search.tuners.SearchTuner`).
        seed: Optional integer. Each trial then seeds Keras, NumPy and
            Python's `random` from it and its hyperparameter values, so a
            trial's result depends on its values only and a rerun of the
            search gives the same scores (the n-th execution of the same
            values gets the n-th seed, so `executions_per_trial` still
            averages over initialisations).
        dtype_policy: `build_finetuner`'s `dtype_policy` (`"float32"`,
            `"mixed_float16"` or `"mixed_bfloat16"`). Defaults to `"float32"`.
        jit_compile: `build_finetuner`'s `jit_compile` (True, False or
            `"auto"`). Defaults to `"auto"`.
        objective: Optional `{"name", "direction"}` (`search.control`): a
            metric it needs (AUC, macro F1 ...) is compiled into each model.

    Attributes:
        tensorboard_dir: Where the next trial logs its TensorBoard scalars,
            or None (set per trial by `search.control.SearchControl`).
    """

    def __init__(self, space, data, strategy=None, strategy_name="none",
                 feature_cache_dir=None, seed=None, dtype_policy="float32", jit_compile="auto",
                 objective=None):
        super().__init__(name="tftransfer_finetune")
        self.precision = {}  # passed on when not `build_finetuner`'s defaults
        if dtype_policy != "float32":
            self.precision["dtype_policy"] = dtype_policy
        if jit_compile != "auto":
            self.precision["jit_compile"] = jit_compile
        self.space, self.data = space, data
        self.strategy, self.strategy_name = strategy, strategy_name
        self.feature_cache_dir = feature_cache_dir
        self.seed = seed
        self._builds = collections.Counter()
        self.declare_only = False
        self.last_fit = {}
        self.objective, self.tensorboard_dir = objective, None

    @property
    def replicas(self):
        """Replicas in sync of the strategy (1 without one)."""
        return self.strategy.num_replicas_in_sync if self.strategy is not None else 1

    def values(self, hp):
        """Returns `{knob: value}` for this trial."""
        return {name: sample(hp, name, spec) for name, spec in self.space.items()}

    def settings(self, hp):
        """Returns `(build_finetuner kwargs, fine_tune kwargs)` for this trial."""
        v = self.values(hp)
        build = {k: v[k] for k in BUILD_KNOBS}
        shape = list(self.data.input_shape) or None  # text data: no image shape
        build.update(trainable=v["unfreeze"],  # the freeze policy the recipe records
                     num_classes=self.data.num_classes, input_shape=shape,
                     regularizer=_regularizer(v["regularizer_kind"], v["regularizer_strength"]),
                     learning_rate=self._learning_rate(v), strategy=self.strategy_name,
                     **self.precision)
        fit = {k: v[k] for k in FIT_KNOBS}
        fit.update(unfreeze=v["unfreeze"], batch_size=v["batch_size"] * self.replicas)
        return build, fit

    def _learning_rate(self, v):
        if v["schedule"] == "constant":
            return v["learning_rate"]
        steps = math.ceil(self.data.num_train / (v["batch_size"] * self.replicas))
        config = {"learning_rate": v["learning_rate"],
                  "decay_steps": max(1, steps * max(1, v["head_epochs"]))}
        if v["schedule"] == "warmup_cosine":
            config["warmup_steps"] = max(1, config["decay_steps"] // 10)
        return {"class_name": v["schedule"], "config": config}

    def build(self, hp):
        """Builds the compiled model of a trial (a fresh Keras session first).

        Then it moves the objects that survived the session's garbage
        collection out of the collector's sight (`gc.freeze()`): they live
        as long as the search (TensorFlow, Keras, the data, the tuner, what
        earlier trials leaked). KerasTuner collects garbage twice before each
        build and `clear_session` once more; each full collection walks every
        tracked object unless frozen, about 0.25 s a time with TensorFlow
        loaded. Later garbage, such as this trial's model, is collected as
        before.
        """
        build, _ = self.settings(hp)
        if self.declare_only:  # KerasTuner only collects the search space.
            return None
        keras.backend.clear_session()  # a full collection: what remains is long-lived
        gc.freeze()
        if self.seed is not None:
            keras.utils.set_random_seed(self._trial_seed(hp))
        build["strategy"] = self.strategy
        if self.objective is not None:
            build["metrics"] = control.metrics_for(self.objective)
        return build_finetuner(**build)

    def _trial_seed(self, hp):
        values = {k: v for k, v in hp.values.items() if not k.startswith("tuner/")}
        text = json.dumps([self.seed, values], sort_keys=True, default=str)
        self._builds[text] += 1
        digest = hashlib.sha256(f"{text}#{self._builds[text]}".encode()).digest()
        return int.from_bytes(digest[:4], "little") % (2**31 - 1)

    def fit(self, hp, model, *args, callbacks=None, verbose=0, epochs=None, initial_epoch=0,
            **kwargs):
        """Runs the two-stage `fine_tune` of a trial and returns its History.

        KerasTuner's callbacks run in both stages; its best-epoch checkpoint
        always saves the whole model (stage 1 may train the head alone on
        cached features). Hyperband's `epochs` is the total epoch budget; a
        trial it trains further (`initial_epoch` > 0, the model holding the
        earlier trial's best checkpoint) continues the two-stage schedule at
        `initial_epoch` instead of running it again from epoch 0. Stage-1
        features are shared by the trials through `feature_cache_dir`.

        Args:
            hp: The trial's `HyperParameters`.
            model: The model `build(hp)` returned.
            *args: Unused (the data lives in the HyperModel).
            callbacks: KerasTuner's callbacks for this execution.
            verbose: Passed to `fine_tune`.
            epochs: Hyperband's epoch budget, or None.
            initial_epoch: Hyperband's first epoch of this trial. When the
                schedule ends before it (a budget larger than `head_epochs +
                fine_tune_epochs`), the trial runs the schedule from 0.
            **kwargs: Unused.

        Returns:
            The `keras.callbacks.History` of both stages.

        Raises:
            keras_tuner.errors.FailedTrialError: The loss became NaN or inf.
        """
        _, settings = self.settings(hp)
        if epochs is not None:
            head = min(settings["head_epochs"], epochs)
            settings.update(head_epochs=head,
                            fine_tune_epochs=min(settings["fine_tune_epochs"], epochs - head))
        if initial_epoch < settings["head_epochs"] + settings["fine_tune_epochs"]:
            settings["initial_epoch"] = initial_epoch
        train, validation = self.data.batched(settings["batch_size"], self.replicas)
        settings["feature_cache_dir"] = self.feature_cache_dir
        callbacks = [_WholeModel(c, model) if isinstance(c, SaveBestEpoch) else c
                     for c in callbacks or []]
        if self.tensorboard_dir:
            callbacks.append(keras.callbacks.TensorBoard(self.tensorboard_dir, write_graph=False))
        try:  # fine_tune enters the model's strategy
            history = fine_tune(model, train, validation, callbacks=callbacks, verbose=verbose,
                                keep_best_stage=False,  # KerasTuner keeps the best epoch itself
                                **settings)
        except FloatingPointError as e:  # NaN loss: this trial fails, the search goes on
            raise kt.errors.FailedTrialError(str(e)) from None
        self.last_fit = {"replicas": model.distribute_strategy.num_replicas_in_sync,
                         "global_batch_size": settings["batch_size"]}
        _check_finite(history)
        return history


def _regularizer(kind, strength):
    if kind == "none":
        return None
    if kind == "l1_l2":
        return f"l1_l2:{strength:g},{strength:g}"
    return f"{kind}:{strength:g}"


def _check_finite(history):
    losses = history.history.get("loss", [])
    if any(not math.isfinite(v) for v in losses):
        raise kt.errors.FailedTrialError(
            f"The training loss became {losses[-1]} (NaN or inf): learning rate too high?")


class _WholeModel(keras.callbacks.Callback):
    """Runs KerasTuner's `SaveBestEpoch` on the whole model, in both stages.

    `SaveBestEpoch` is private to KerasTuner (`keras_tuner.src`), and there is
    no public way to tell `Tuner.run_trial`'s checkpoint which model to save:
    stage 1 may train the head alone on cached features, and this callback
    makes the checkpoint hold the whole model (docs/private_hooks.md).
    """

    def __init__(self, inner, model):
        super().__init__()
        self.inner, self.whole = inner, model

    def on_epoch_end(self, epoch, logs=None):
        self.inner.set_model(self.whole)
        self.inner.on_epoch_end(epoch, logs)

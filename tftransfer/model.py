"""`FineTuner`: the fine-tuned model, its parts, its recipe and its stages.

A `FineTuner` is a functional `keras.Model` (images in 0-255 ->
preprocessing -> backbone -> head) that owns what a transfer-learning model
must keep: its `backbone`, `preprocessing` and `head` layers, its `task`,
`class_names`, `source` and `recipe` (optimizer, base rate or schedule, label
smoothing, weight decay, freezing policy). All of it is in `get_config`, so
`keras.models.load_model("m.keras")` (after `import tftransfer`) gives back a
`FineTuner` that predicts, exports and trains on like the one saved.

Its methods are the steps of fastai-style fine-tuning that `fine_tune`
composes: `freeze(policy)`, `compile_stage(rate, layerwise_lr_decay=...)`,
`head_model()` and `extract_features(images)` for the frozen-feature cache.

Example:

>>> model = build_finetuner("saved_models/digits_cnn.keras", num_classes=5)
>>> model.freeze("top:1")
>>> model.compile_stage(1e-4, layerwise_lr_decay=0.8)
>>> model.fit(x, y, epochs=2)
>>> model.save("m.keras")
>>> keras.models.load_model("m.keras").class_names
"""

import copy
import re
import warnings

import keras
import numpy as np
import tensorflow as tf

from tftransfer import _text_backbones, freezing, heads, optim, tasks
from tftransfer._names import DTYPE_POLICIES
from tftransfer.distribute import MultiWorkerSteps
from tftransfer.layers import HubLayer, ImagePreprocessing

# `layerwise_lr_decay="auto"`: the head learns this many times faster than the
# bottom backbone layer (fastai's `slice(lr / 100, lr)` spans 100x; 30x gained
# more on bench/two_stage.py).
AUTO_LR_RANGE = 30.0
# What the model is fed: raw pixels, whatever the backbone's preprocessing.
INPUT_RANGE = (0.0, 255.0)


@keras.saving.register_keras_serializable(package="tftransfer")
class FineTuner(MultiWorkerSteps, keras.Model):
    """A transfer-learning model: preprocessing, pretrained backbone, new head.

    Most users get one from `build_finetuner`; the constructor takes the
    parts themselves.

    Args:
        backbone: A `keras.Model` from images to features (see
            `tftransfer.load_backbone`).
        num_classes: Integer >= 1, the head's outputs.
        task: `"classification"`, `"multi_label"` or `"regression"`.
        preprocessing: The backbone's input preprocessing, an
            `ImagePreprocessing` mode (`"none"`, `"tf"`, `"torch"`, `"caffe"`,
            `"rescale:<scale>,<offset>"`, a `{"mean", "std", "channel_order"}`
            dict) or a Keras layer; for text backbones (detected from
            the backbone) a layer taking strings (a BERT preprocessor
            `HubLayer` or `TextInput`), and the model's input is strings.
        hidden_units: Sequence of integers, ReLU layers in the head.
        dropout: Float in [0, 1), dropout in the head.
        regularizer: Optional Keras regularizer (or identifier) of the head's
            kernels.
        pooling: `"avg"` or `"max"` for backbones that output feature maps.
        class_names: Optional list of `num_classes` strings.
        source: Optional string, where the backbone came from.
        recipe: Optional dict of training settings (see `recipe`).
        dtype_policy: Optional `"float32"`, `"mixed_float16"` or
            `"mixed_bfloat16"`; the head's output stays float32.
        name: String, the model's name.
        **kwargs: Passed to `keras.Model` (e.g. `trainable`).
    """

    def __init__(self, backbone, num_classes, *, task="classification", preprocessing="none",
                 hidden_units=(), dropout=0.0, regularizer=None, pooling="avg",
                 class_names=None, source=None, recipe=None, dtype_policy=None,
                 name="finetuner", **kwargs):
        task = tasks.check_task(task)
        num_classes = heads.check_num_classes(num_classes, task)
        policy = _check_dtype_policy(dtype_policy)
        if policy is not None:
            _set_dtype_policy(backbone, policy)
        # === Layers ===
        text = _text_backbones.model_input(backbone, preprocessing)  # (string Input, layer)
        inputs, preprocessing_layer = text or (
            keras.Input(backbone.input_shape[1:], name="image"),
            ImagePreprocessing(preprocessing, name="preprocessing"))
        backbone.name = "backbone"
        head = heads.build_head(backbone.output_shape[1:], num_classes, task=task,
                                hidden_units=tuple(hidden_units), dropout=dropout,
                                regularizer=optim.get_regularizer(regularizer),
                                pooling=pooling, dtype=policy)
        # === Functional model ===
        outputs = head(backbone(preprocessing_layer(inputs)))
        kwargs.pop("dtype", None)
        super().__init__(inputs=inputs, outputs=outputs, name=name, dtype=policy, **kwargs)
        # === Config ===
        self._backbone, self._preprocessing, self._head = backbone, preprocessing_layer, head
        self._task, self._num_classes = task, num_classes
        self._head_config = {"hidden_units": [int(u) for u in hidden_units],
                             "dropout": float(dropout), "pooling": pooling,
                             "regularizer": _serialize(optim.get_regularizer(regularizer))}
        self._class_names = None
        self.class_names = class_names
        self._source = source
        self._recipe = dict(recipe or {})
        if self._recipe.get("regularize_backbone") and regularizer is not None:
            _regularize(backbone, optim.get_regularizer(regularizer))
        self._dtype_policy_name = policy
        self._warned_unit_range = False

    # === Parts ===
    @property
    def backbone(self):
        """The pretrained feature extractor (a `keras.Model`)."""
        return self._backbone

    @property
    def preprocessing(self):
        """The `ImagePreprocessing` layer that maps 0-255 pixels to the backbone's range."""
        return self._preprocessing

    @property
    def head(self):
        """The task head (a `keras.Sequential`, last layer `"predictions"`)."""
        return self._head

    @property
    def task(self):
        """`"classification"`, `"multi_label"` or `"regression"`."""
        return self._task

    @property
    def num_classes(self):
        """The number of outputs of the head."""
        return self._num_classes

    @property
    def source(self):
        """Where the backbone came from (a path, handle or application name)."""
        return self._source

    @property
    def recipe(self):
        """A copy of the training settings: `optimizer` (a serialized optimizer),
        `learning_rate` (the base rate: a float or a serialized schedule),
        `label_smoothing`, `weight_decay`, `optimizer_options`, `trainable`
        (the freezing policy, None when it was a callable),
        `freeze_batchnorm`, `regularize_backbone` and `jit_compile`."""
        return dict(self._recipe)

    @property
    def class_names(self):
        """The list of class (or label) names, or None."""
        return None if self._class_names is None else list(self._class_names)

    @class_names.setter
    def class_names(self, names):
        self._class_names = tasks.check_class_names(names, self._num_classes)

    @property
    def input_range(self):
        """`(low, high)` of the pixels the model takes: raw `(0, 255)`."""
        return INPUT_RANGE

    # === Stages ===
    def freeze(self, policy="none", *, freeze_batchnorm=None):
        """Sets which backbone layers train; the head always trains.

        Args:
            policy: A freezing policy: `"none"` (backbone frozen), `"all"`,
                `"top:N"`, `"fraction:F"`, regexes or a callable.
            freeze_batchnorm: Keep BatchNormalization in inference mode;
                defaults to the recipe's (True).

        Returns:
            The number of backbone layers with weights left trainable.
        """
        if freeze_batchnorm is None:
            freeze_batchnorm = self._recipe.get("freeze_batchnorm", True)
        self._head.trainable = True
        return freezing.apply(self._backbone, policy, freeze_batchnorm=freeze_batchnorm)

    @property
    def base_learning_rate(self):
        """The recipe's rate: a float or a `LearningRateSchedule`."""
        rate = self._recipe.get("learning_rate", 1e-3)
        if isinstance(rate, dict) and "registered_name" in rate:  # a Keras-serialized schedule
            return keras.saving.deserialize_keras_object(rate)
        return optim.get_schedule(rate)

    def stage_optimizer(self, learning_rate=None, *, layerwise_lr_decay=None,
                        ema_momentum=None):
        """A fresh optimizer of the recipe's kind.

        Args:
            learning_rate: Float or schedule; defaults to the base rate.
            layerwise_lr_decay: Optional float in (0, 1]: the k-th trainable
                backbone layer from the top learns at `rate * decay**k`, the
                head at `rate`; `"auto"` spreads the backbone's rates over
                30x (see `layerwise_multipliers`).
            ema_momentum: Optional float in [0, 1): keep an exponential moving
                average of the weights (Keras's `use_ema`), updated each step
                with this momentum.

        Returns:
            A `keras.optimizers.Optimizer` (serializable with its rates).
        """
        rate = self.base_learning_rate if learning_rate is None else learning_rate
        multipliers = None
        if layerwise_lr_decay is not None and layerwise_lr_decay != 1:
            multipliers = self.layerwise_multipliers(layerwise_lr_decay)
        options = dict(self._recipe.get("optimizer_options") or {})
        if ema_momentum is not None:
            options.update(use_ema=True, ema_momentum=float(ema_momentum))
        return optim.make_optimizer(self._recipe.get("optimizer", "adam"), rate,
                                    weight_decay=self._recipe.get("weight_decay"),
                                    options=options, lr_multipliers=multipliers)

    def layerwise_multipliers(self, decay):
        """`{"<layer>/<variable>": decay**k}` for the trainable backbone layers,
        k=1 at the top (the keys survive save and reload).

        A `HubLayer` counts as one layer per group of variables (`conv1__kernel`
        and `conv1__bias` form `conv1`), in the SavedModel's order, taken as
        bottom to top. With `decay="auto"`, the rates span `AUTO_LR_RANGE`
        (30x) from the head to the bottom layer of the whole backbone,
        whatever the depth: `decay = (1 / 30) ** (1 / layers)`, where a
        BatchNormalization (a Keras layer, or a `HubLayer` group beside moving
        statistics) is not a layer of its own but learns at the rate of the
        layer it normalizes; with `"top:N"` only the top N train, at the rates
        of their depth.
        """
        groups = self._depth_groups()
        if isinstance(decay, str):  # "auto"
            depth = sum(1 for _, batchnorm in self._depth_groups(trainable_only=False)
                        if not batchnorm)
            decay = (1.0 / AUTO_LR_RANGE) ** (1.0 / max(1, depth))
        # A BatchNormalization takes the depth of the layer it normalizes (the one below).
        levels, level = [], 0
        for _, batchnorm in groups:
            level += 0 if batchnorm and level else 1
            levels.append(level)
        multipliers = {}
        for (keys, _), level in zip(groups, levels):
            for key in keys:
                multipliers[key] = float(decay) ** (levels[-1] - level + 1)
        return multipliers

    def _depth_groups(self, trainable_only=True):
        """`(keys, is_batchnorm)` per layer of the trainable backbone (or of all
        of it), bottom to top; keys are `"<layer>/<variable>"`."""
        groups = []
        for layer in freezing.leaf_layers(self._backbone):
            weights = layer.trainable_weights if trainable_only else layer.weights
            if not weights:
                continue
            if not isinstance(layer, HubLayer):
                groups.append(([f"{layer.name}/{v.name}" for v in weights],
                               isinstance(layer, keras.layers.BatchNormalization)))
                continue
            batchnorm = {id(v) for v in layer.batchnorm_weights}
            by_prefix = {}
            for v in weights:
                prefix = re.split(r"__|/", v.name)[0]  # conv1__kernel -> conv1
                keys, _ = by_prefix.setdefault(prefix, ([], id(v) in batchnorm))
                keys.append(f"{layer.name}/{v.name}")
            groups += list(by_prefix.values())
        return groups

    def _bind(self, optimizer):
        """Binds layer-wise rates (keyed by layer and variable name) to this model's variables."""
        if hasattr(optimizer, "bind_variables"):
            optimizer.bind_variables({f"{layer.name}/{v.name}": v
                                      for layer in freezing.leaf_layers(self._backbone)
                                      for v in layer.weights})

    def compile(self, optimizer="auto", loss="auto", metrics="auto", **kwargs):
        """`keras.Model.compile` with `"auto"` defaults from the recipe and task.

        An explicit optimizer is used as given (`fit` trains with it); the
        recipe does not change, so `fine_tune` and `compile_stage` still
        build their optimizers from it (set it with `build_finetuner`).
        """
        optimizer = self.stage_optimizer() if optimizer == "auto" else optim.get_optimizer(
            optimizer)
        if loss == "auto":
            loss = heads.auto_loss(self._task, self._num_classes,
                                   self._recipe.get("label_smoothing", 0.0))
        if metrics == "auto":
            metrics = heads.auto_metrics(self._task, self._num_classes)
        kwargs.setdefault("jit_compile", self._recipe.get("jit_compile", "auto"))
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)
        self._bind(self.optimizer)

    def compile_from_config(self, config):
        """Restores the compiled state of a saved model (optimizer, loss, metrics)."""
        config = keras.saving.deserialize_keras_object(config)
        super().compile(**config)
        self._bind(self.optimizer)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def compile_stage(self, learning_rate=None, *, layerwise_lr_decay=None, ema_momentum=None):
        """Recompiles with a fresh optimizer for a training stage.

        The loss and metrics stay as compiled (metrics are made anew); the
        recipe does not change.

        Args:
            learning_rate: Float or schedule; defaults to the base rate.
            layerwise_lr_decay: Optional float in (0, 1] (see `stage_optimizer`).
            ema_momentum: Optional float in [0, 1) (see `stage_optimizer`).
        """
        self._compile_like(self, self.stage_optimizer(
            learning_rate, layerwise_lr_decay=layerwise_lr_decay, ema_momentum=ema_momentum))

    def head_model(self, learning_rate=None):
        """The head as a compiled model on backbone features (sharing its weights).

        Used to train stage 1 on cached features.
        """
        inputs = keras.Input(self._backbone.output_shape[1:], name="features")
        model = _HeadModel(inputs, self._head(inputs), name="head_model")
        self._compile_like(model, self.stage_optimizer(learning_rate))
        return model

    def extract_features(self, images):
        """The frozen backbone's features of a batch of 0-255 images (float32)."""
        features = self._backbone(self._preprocessing(images), training=False)
        return keras.ops.cast(features, "float32")

    def _compile_like(self, target, optimizer):
        compiled = self.get_compile_config() if self.compiled else {}
        metrics = keras.saving.deserialize_keras_object(compiled.get("metrics"))
        if metrics is None and not self.compiled:
            metrics = heads.auto_metrics(self._task, self._num_classes)
        loss = self.loss if self.compiled else heads.auto_loss(
            self._task, self._num_classes, self._recipe.get("label_smoothing", 0.0))
        keras.Model.compile(target, optimizer=optimizer, loss=loss, metrics=metrics,
                            jit_compile=self._recipe.get("jit_compile", "auto"))
        self._bind(target.optimizer)
        if not target.optimizer.built:  # Built while tracing, Keras would trace twice.
            target.optimizer.build(target.trainable_variables)

    # === Input checks ===
    def warn_if_unit_range(self, images, argument="x"):
        """Warns once when `images` look like 0-1 data (max <= 1) for a 0-255 model.

        Reads the first images only, unless they look like 0-1 data: then
        all of them decide, so a call with raw pixels costs a small sample.
        """
        if self._warned_unit_range or not _is_array(images):
            return
        high = _pixel_max(images)
        if high is not None and high <= 1.0:
            self._warned_unit_range = True
            warnings.warn(unit_range_message(argument, float(high), self.name,
                                             self._preprocessing.mode), stacklevel=3)

    def fit(self, x=None, y=None, *args, **kwargs):
        self.warn_if_unit_range(x)
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        self.warn_if_unit_range(x)
        return super().evaluate(x, y, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        self.warn_if_unit_range(x)
        return super().predict(x, *args, **kwargs)

    # === Config ===
    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self._backbone),
            "num_classes": self._num_classes,
            "task": self._task,
            "preprocessing": _text_backbones.preprocessing_config(self._preprocessing),
            **self._head_config,
            "class_names": self.class_names,
            "source": self._source,
            "recipe": _plain(self._recipe),
            "dtype_policy": self._dtype_policy_name,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = copy.deepcopy(config)  # Keras's deserialization consumes the dicts it reads
        config["backbone"] = keras.saving.deserialize_keras_object(
            config["backbone"], custom_objects=custom_objects)
        return cls(**config)


class _HeadModel(MultiWorkerSteps, keras.Model):
    """The functional head model of `FineTuner.head_model` (trains across workers too)."""


def unit_range_message(argument, peak, name, mode):
    """The warning for images that look scaled to [0, 1], worded by preprocessing `mode`."""
    start = (f"`{argument}` looks like images scaled to [0, 1] (max {peak:g}), but model "
             f"{name!r} takes raw pixels in [0, 255]")
    if mode is None:
        return f"{start}. Multiply the images by 255."
    if mode == "none":
        return (f"{start}, and its preprocessing is 'none': the backbone receives the pixels "
                "unchanged, so here values in [0, 1]. Multiply the images by 255; if the "
                "backbone was trained on [0, 1] inputs, declare it when building, with "
                "`preprocessing=\"rescale:1/255,0\"` (or `{\"mean\": ..., \"std\": ...}`), and "
                "feed 0-255 pixels.")
    shown = f"mode {mode!r}" if not isinstance(mode, dict) or "layer" not in mode else "a layer"
    return (f"{start} (its preprocessing, {shown}, scales them for the backbone). "
            "Multiply the images by 255.")


def _check_dtype_policy(policy):
    if policy is None:
        return None
    name = getattr(policy, "name", policy)
    if name not in DTYPE_POLICIES:
        raise ValueError(
            f"`dtype_policy` must be None or one of {', '.join(DTYPE_POLICIES)}. "
            f"Received: dtype_policy={policy!r}"
        )
    return None if name == "float32" else name


def _set_dtype_policy(backbone, policy):
    """Makes the backbone compute in `policy` (its variables stay float32).

    A `HubLayer` keeps float32: its SavedModel functions were traced for it.
    """
    for layer in freezing.leaf_layers(backbone) or [backbone]:
        if not isinstance(layer, (keras.layers.InputLayer, HubLayer)):
            layer.dtype_policy = policy


def _regularize(backbone, regularizer):
    """Puts `regularizer` on the backbone's kernels (kept by the recipe, not the layers)."""
    for layer in freezing.leaf_layers(backbone):
        kernel = getattr(layer, "kernel", None)
        if kernel is not None and hasattr(kernel, "regularizer"):
            kernel.regularizer = regularizer


def _serialize(obj):
    return None if obj is None else keras.saving.serialize_keras_object(obj)


# The images the 0-1 check reads first; all are read only when these look 0-1.
_RANGE_SAMPLE = 32


def _pixel_max(images):
    """The largest value of float `images` (NaN ignored), or None for other
    dtypes and empty arrays; decided by the first `_RANGE_SAMPLE` images when
    one of them holds a value above 1."""
    sample = np.asarray(images[:_RANGE_SAMPLE] if np.ndim(images) else images)
    if not sample.size or not np.issubdtype(sample.dtype, np.floating):
        return None
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN sample
        high = np.nanmax(sample)
        if high > 1.0 or sample.ndim == 0 or len(sample) == len(images):
            return high
        return np.nanmax(np.asarray(images))


def _is_array(x):
    return isinstance(x, np.ndarray) or (tf.is_tensor(x) and not isinstance(x, tf.RaggedTensor))


def _plain(value):
    """The recipe as JSON-able values (callables and objects by their config)."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if hasattr(value, "get_config"):
        return keras.saving.serialize_keras_object(value)
    return None

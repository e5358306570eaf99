"""`build_finetuner`: backbone + freezing + head + compile in one call."""

import keras

from tftransfer import _checks, freezing, heads, optim
from tftransfer.backbones import load_backbone
from tftransfer.distribute import prepare_model, scope
from tftransfer.layers import ImagePreprocessing


def build_finetuner(backbone, num_classes=None, *, input_shape=None, trainable="none",
                    dropout=0.0, hidden_units=(), regularizer=None, optimizer="adam",
                    learning_rate=1e-3, task="classification", strategy=None,
                    weights="imagenet", output_layer=None, signature=None, output_key=None,
                    safe_mode=True, preprocessing=None, freeze_batchnorm=True,
                    regularize_backbone=False, label_smoothing=0.0, weight_decay=None,
                    optimizer_options=None, loss="auto", metrics="auto", pooling="avg",
                    name="finetuner"):
    """Builds a compiled transfer-learning model from a pretrained backbone.

    The model takes images `[batch, H, W, C]` in the raw 0-255 range; the
    backbone's preprocessing is its first layer (`"preprocessing"`), then the
    backbone (`"backbone"`), then the head (last layer `"predictions"`).

    Args:
        backbone: Anything `load_backbone` accepts: a path (SavedModel dir,
            `.keras`, `.h5`), a TF-Hub handle, a `keras.applications` name, or
            a `keras.Model`.
        num_classes: Integer >= 1, classes (or labels, or regression values;
            defaults to 1 for regression).
        input_shape: Optional `(H, W, C)`; needed where the backbone does not
            define it, and picks the size of applications.
        trainable: Freezing policy: `"none"` (default, backbone frozen),
            `"all"`, `"top:N"`, `"fraction:F"`, a regex or list of regexes on
            layer names, or a callable `layer -> bool`.
        dropout: Float in [0, 1), dropout in the head. Defaults to `0.0`.
        hidden_units: Integer or sequence of integers, ReLU layers in the
            head (`64` means `(64,)`).
        regularizer: `"l1:1e-4"`, `"l2:1e-4"`, `"l1_l2:1e-5,1e-4"`, a Keras
            regularizer, or None; applied to the head's kernels (and the
            backbone's with `regularize_backbone=True`).
        optimizer: A name (`"adam"`, `"sgd"`, `"adamw"`, `"rmsprop"`,
            `"nadam"`, `"adagrad"`, `"lion"`, ...), a `{"class_name",
            "config"}` dict, or an optimizer instance.
        learning_rate: Float, a Keras schedule, or a schedule dict such as
            `{"class_name": "warmup_cosine", "config": {"warmup_steps": 100,
            "decay_steps": 1000}}`. Defaults to `1e-3`.
        task: `"classification"` (integer labels), `"multi_label"` or
            `"regression"`.
        strategy: None, a `tf.distribute.Strategy`, or `"auto"`,
            `"mirrored"`, `"multi_worker"`, `"one_device"`; everything is
            built and compiled in its scope.
        weights: Applications only: `"imagenet"`, None or a weights file.
        output_layer: Optional layer name to cut the backbone at.
        signature: Signature name for signature-only SavedModels.
        output_key: Output name for SavedModels that return dicts.
        safe_mode: Refuse `.keras` files holding arbitrary code. Defaults to
            `True`.
        preprocessing: Override the backbone's preprocessing mode (`"none"`,
            `"tf"`, `"torch"`, `"caffe"`, `"rescale:1/255,0"`).
        freeze_batchnorm: Keep BatchNormalization layers in inference mode
            even where the backbone trains. Defaults to `True`.
        regularize_backbone: Also regularize the backbone's kernels.
        label_smoothing: Float in [0, 1). Defaults to `0.0`.
        weight_decay: Optional float, decoupled weight decay of the optimizer
            (biases and normalization parameters excluded).
        optimizer_options: Optional dict of more optimizer arguments, e.g.
            `{"momentum": 0.9, "nesterov": True}`.
        loss: `"auto"` (from the task) or any Keras loss.
        metrics: `"auto"` (from the task) or a list of Keras metrics.
        pooling: `"avg"` or `"max"` for backbones that output feature maps.
        name: Name of the model.

    Returns:
        A compiled `keras.Model`. Its attribute `tftransfer_info` records the
        backbone source, preprocessing, task and settings.

    Example:

    >>> model = build_finetuner("saved_models/digits_cnn.keras", num_classes=5,
    ...                         trainable="top:1", dropout=0.2, regularizer="l2:1e-4")
    >>> model.fit(x, y, epochs=3)
    """
    num_classes, hidden_units = _checks.finetuner_arguments(**locals())
    num_classes = heads.check_num_classes(num_classes, task)
    heads.TASKS.lookup(task)
    with scope(strategy):
        base = load_backbone(backbone, input_shape=input_shape, weights=weights,
                             output_layer=output_layer, signature=signature,
                             output_key=output_key, safe_mode=safe_mode)
        reg = optim.get_regularizer(regularizer)
        model = _assemble(base, num_classes, task, preprocessing, hidden_units, dropout,
                          reg, pooling, name)
        freezing.apply(base, trainable, freeze_batchnorm=freeze_batchnorm)
        if regularize_backbone and reg is not None:
            _regularize(base, reg)
        model.compile(
            optimizer=_optimizer(optimizer, learning_rate, weight_decay, optimizer_options),
            loss=heads.auto_loss(task, num_classes, label_smoothing) if loss == "auto" else loss,
            metrics=heads.auto_metrics(task, num_classes) if metrics == "auto" else metrics,
        )
    model.tftransfer_info = _info(base, task, num_classes, locals())
    return prepare_model(model)  # Keras 3 fit across workers (keras-team/keras#20585)


def _assemble(base, num_classes, task, preprocessing, hidden_units, dropout, reg, pooling, name):
    mode = preprocessing or getattr(base, "tftransfer_preprocessing", "none")
    inputs = keras.Input(base.input_shape[1:], name="image")
    x = ImagePreprocessing(mode, name="preprocessing")(inputs)
    base.name = "backbone"
    features = base(x)
    outputs = heads.attach(features, num_classes, task=task, hidden_units=tuple(hidden_units),
                           dropout=dropout, regularizer=reg, pooling=pooling)
    return keras.Model(inputs, outputs, name=name)


def _regularize(base, reg):
    for layer in freezing.leaf_layers(base):
        kernel = getattr(layer, "kernel", None)
        if kernel is not None and hasattr(kernel, "regularizer"):
            kernel.regularizer = reg


def _optimizer(identifier, learning_rate, weight_decay, options):
    kwargs = dict(options or {})
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    opt = optim.get_optimizer(identifier, learning_rate=optim.get_schedule(learning_rate), **kwargs)
    if weight_decay:
        opt.exclude_from_weight_decay(var_names=optim.NO_DECAY)
    return opt


def _info(base, task, num_classes, settings):
    keep = ("trainable", "dropout", "hidden_units", "regularizer", "optimizer",
            "learning_rate", "label_smoothing", "weight_decay", "freeze_batchnorm")
    return {
        "backbone": base.tftransfer_source,
        "preprocessing": base.tftransfer_preprocessing,
        "task": task,
        "num_classes": num_classes,
        "input_shape": list(base.input_shape[1:]),
        "hyperparameters": {k: _plain(settings[k]) for k in keep},
    }


def _plain(value):
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return repr(value)

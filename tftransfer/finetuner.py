"""`build_finetuner`: backbone + freezing + head + compile in one call."""

import keras

from tftransfer import _checks, heads, optim, tasks
from tftransfer.backbones import load_backbone
from tftransfer.distribute import scope
from tftransfer.model import FineTuner


def build_finetuner(backbone, num_classes=None, *, input_shape=None, trainable="none",
                    dropout=0.0, hidden_units=(), regularizer=None, optimizer="adam",
                    learning_rate=1e-3, task="classification", strategy=None,
                    weights="imagenet", output_layer=None, signature=None, output_key=None,
                    safe_mode=True, custom_objects=None, preprocessing=None, freeze_batchnorm=True,
                    regularize_backbone=False, label_smoothing=0.0, weight_decay=None,
                    optimizer_options=None, loss="auto", metrics="auto", pooling="avg",
                    class_names=None, dtype_policy=None, jit_compile="auto",
                    preprocessor=None, name="finetuner"):
    """Builds a compiled `FineTuner` from a pretrained backbone.

    The model takes images `[batch, H, W, C]` in the raw 0-255 range; its
    `preprocessing` layer maps them to the backbone's range, then come the
    `backbone` and the `head`. Everything it knows (parts, task, class names,
    source, recipe) survives `model.save("m.keras")` and
    `keras.models.load_model`.

    Args:
        backbone: Anything `load_backbone` accepts: a path (SavedModel dir,
            `.keras`, `.h5`), a TF-Hub handle, a `keras.applications` name, or
            a `keras.Model`.
        num_classes: Integer >= 2 for classification (>= 1 otherwise), the
            number of classes, labels or regression values; defaults to
            `len(class_names)`, or 1 for regression.
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
        custom_objects: Optional dict `{name: class or function}` of custom
            layers a `.keras` / `.h5` backbone refers to (Keras's loader
            argument).
        preprocessing: Override the backbone's preprocessing mode (`"none"`,
            `"tf"`, `"torch"`, `"caffe"`, `"rescale:1/255,0"`), or any other
            normalization as `{"mean": [...], "std": [...],
            "channel_order": "rgb" or "bgr"}` in 0-255 units, or a Keras
            layer taking 0-255 pixels; saved with the model.
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
        class_names: Optional list of names, one per output.
        dtype_policy: None or `"float32"` (default), `"mixed_float16"` or
            `"mixed_bfloat16"` (GPUs / TPUs): the backbone and head compute
            in half precision, variables and the output stay float32, and
            `mixed_float16` scales the loss.
        jit_compile: `"auto"`, True or False: XLA compilation of the train
            step (`keras.Model.compile`).
        preprocessor: For a BERT-style text encoder: the SavedModel or
            TF-Hub handle mapping strings to its inputs (docs/text.md). The
            model then takes strings.
        name: Name of the model.

    Returns:
        A compiled `tftransfer.FineTuner` (a `keras.Model`).

    Example:

    >>> model = build_finetuner("saved_models/digits_cnn.keras", num_classes=5,
    ...                         trainable="top:1", dropout=0.2, regularizer="l2:1e-4")
    >>> model.fit(x, y, epochs=3)
    """
    if num_classes is None and class_names is not None and not isinstance(class_names, str):
        num_classes = len(class_names)
    num_classes, hidden_units = _checks.finetuner_arguments(
        num_classes=num_classes, input_shape=input_shape, dropout=dropout,
        hidden_units=hidden_units, label_smoothing=label_smoothing, weight_decay=weight_decay,
        pooling=pooling)
    task = tasks.check_task(task)
    num_classes = heads.check_num_classes(num_classes, task)
    with scope(strategy):
        base = load_backbone(backbone, input_shape=input_shape, weights=weights,
                             output_layer=output_layer, signature=signature,
                             output_key=output_key, safe_mode=safe_mode,
                             custom_objects=custom_objects, preprocessor=preprocessor)
        reg = optim.get_regularizer(regularizer)
        recipe = _recipe(optimizer, learning_rate, weight_decay, optimizer_options,
                         label_smoothing, trainable, freeze_batchnorm, jit_compile)
        recipe["regularize_backbone"] = bool(regularize_backbone)
        model = FineTuner(base, num_classes, task=task,
                          preprocessing=preprocessing or getattr(base, "tftransfer_preprocessing",
                                                                 "none"),
                          hidden_units=hidden_units, dropout=dropout, regularizer=reg,
                          pooling=pooling, class_names=class_names,
                          source=getattr(base, "tftransfer_source", None), recipe=recipe,
                          dtype_policy=dtype_policy, name=name)
        model.freeze(trainable, freeze_batchnorm=freeze_batchnorm)
        instance = optimizer if isinstance(optimizer, keras.optimizers.Optimizer) else "auto"
        model.compile(optimizer=instance, loss=loss, metrics=metrics)  # an instance is used as is
    return model


def _recipe(optimizer, learning_rate, weight_decay, options, label_smoothing, trainable,
            freeze_batchnorm, jit_compile):
    if isinstance(optimizer, keras.optimizers.Optimizer):  # compiled as is: its rate is the base
        learning_rate = optimizer.get_config()["learning_rate"]
        optimizer = keras.optimizers.serialize(optimizer)
    else:
        optim.get_optimizer(optimizer, **dict(options or {}))  # validated
    schedule = optim.get_schedule(learning_rate)  # validated here, before anything is built
    return {
        "optimizer": optimizer,
        "optimizer_options": dict(options or {}),
        "learning_rate": schedule if isinstance(schedule, float)
        else keras.saving.serialize_keras_object(schedule),
        "weight_decay": weight_decay,
        "label_smoothing": float(label_smoothing),
        "trainable": None if callable(trainable) else trainable,
        "freeze_batchnorm": bool(freeze_batchnorm),
        "jit_compile": jit_compile,
    }

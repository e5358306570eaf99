"""Keras 3 layers of tftransfer: a fine-tunable TF-Hub / SavedModel layer and
in-model image preprocessing.

`HubLayer` is what `tensorflow_hub.KerasLayer` is for tf-keras, rebuilt for
Keras 3: the loaded object's variables become the layer's weights (the very same
TF resources, wrapped as `keras.Variable`s, so optimizers, regularizers,
`layer.trainable`, `.keras` saving and distribution strategies see them),
`training` is passed through where the object accepts it, and the config holds
the handle, not a pickle.
"""

import inspect
import json
import numbers
import os
import urllib.error
import warnings

import keras
import numpy as np
import tensorflow as tf

_HUB_PREFIX = "hub:"
_TF1_HUB_MARKER = "tfhub_module.pb"  # What marks the legacy TF1 Hub format.


def is_hub_url(handle):
    """Whether `handle` is a remote TF-Hub / Kaggle Models handle."""
    return isinstance(handle, str) and handle.startswith(("http://", "https://", "gs://"))


def resolve_handle(handle, arg="handle"):
    """Returns a local SavedModel directory for a TF-Hub handle.

    URLs are downloaded and cached by `tensorflow_hub.resolve` (it honours
    `TFHUB_CACHE_DIR`); `hub:/some/dir` and plain paths are local directories.

    Raises:
        ValueError: a URL that is neither cached nor reachable, naming
            `TFHUB_CACHE_DIR` and the `hub:/local/dir` form.
    """
    if is_hub_url(handle):
        import tensorflow_hub  # Only for remote handles: it imports tf-keras.

        try:
            return tensorflow_hub.resolve(handle)
        except (OSError, urllib.error.URLError) as error:  # URLError is an OSError too.
            raise _unreachable_error(handle, arg, error) from error
    if handle.startswith(_HUB_PREFIX):
        handle = handle[len(_HUB_PREFIX):]
    return os.path.expanduser(handle)


def _unreachable_error(handle, arg, error):
    cache = os.environ.get("TFHUB_CACHE_DIR", "<unset: a temporary directory>")
    return ValueError(
        f"`{arg}` is a TF-Hub URL that is neither in the cache nor reachable ({error}). "
        f"Offline, download the model elsewhere and either point `TFHUB_CACHE_DIR` (now "
        f"{cache}) at the cache that holds it, or pass its unpacked SavedModel directory "
        f"as `hub:/local/dir`. Received: {arg}={handle!r}"
    )


def _accepts_training(fn):
    """Whether a restored function was traced with a `training` argument.

    Only a parameter named `training` counts: other parameters (hyperparameters
    such as `a`, `b`) are not taken for it.
    """
    try:
        return "training" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # Not introspectable: a concrete function.
        return False


def _variables_of(obj, fn):
    """Lists (trainable, non_trainable) tf.Variables of a loaded object."""
    if hasattr(obj, "variables") and not callable(obj.variables):
        all_vars = list(obj.variables)
        trainable_ids = {id(v) for v in getattr(obj, "trainable_variables", all_vars)}
    else:
        functions = getattr(fn, "concrete_functions", None) or [fn]
        all_vars, trainable_ids = [], set()
        for f in functions:
            all_vars += list(f.variables)
            trainable_ids |= {id(v) for v in f.trainable_variables}
    unique = list({id(v): v for v in all_vars}.values())
    trainable = [v for v in unique if id(v) in trainable_ids and v.trainable]
    chosen = {id(v) for v in trainable}
    return trainable, [v for v in unique if id(v) not in chosen]


def _in_batchnorm(variables):
    """Per variable, whether it belongs to a BatchNorm: a variable in the same
    scope as moving statistics (`bn1/gamma` beside `bn1/moving_mean`)."""
    def scope(v):
        return v.name.rsplit("__", 1)[0] if "__" in v.name else ""
    moving = {scope(v) for v in variables if not v.trainable
              and v.name.rsplit("__", 1)[-1].startswith(("moving_mean", "moving_variance"))}
    return [scope(v) in moving for v in variables]


def _keras_name(variable):
    return variable.name.split(":")[0].replace("/", "__")


def _is_shape(value):
    return isinstance(value, (list, tuple)) and all(
        d is None or isinstance(d, numbers.Integral) for d in value)


def _plain_shapes(value):
    """An `output_shape` nest as JSON-friendly lists (shapes exclude the batch)."""
    if value is None:
        return None
    if isinstance(value, tf.TensorShape):
        return value.as_list()
    if isinstance(value, dict):
        return {key: _plain_shapes(v) for key, v in value.items()}
    if _is_shape(value):
        return [None if d is None else int(d) for d in value]
    if isinstance(value, (list, tuple)):
        return [_plain_shapes(v) for v in value]
    raise ValueError(
        "`output_shape` must be a shape without the batch axis (a tuple of ints or None), "
        f"or a dict or list of such shapes. Received: output_shape={value!r}"
    )


def _tensor_shapes(value):
    """The same nest with `tf.TensorShape` leaves (for `tf.nest`)."""
    if isinstance(value, dict):
        return {key: _tensor_shapes(v) for key, v in value.items()}
    if _is_shape(value):
        return tf.TensorShape(value)
    return [_tensor_shapes(v) for v in value]


def _load_saved_model(path, tags, handle):
    try:
        return tf.saved_model.load(path, tags=tags)
    except (RuntimeError, ValueError) as error:
        if tags is None:
            raise
        raise ValueError(
            f"The SavedModel at {handle!r} has no MetaGraph with tags {tags} ({error}). "
            "TF2 SavedModels hold only the `serve` graph: leave `tags` unset for them. "
            f"Received: tags={tags!r}"
        ) from error


@keras.saving.register_keras_serializable(package="tftransfer")
class HubLayer(keras.layers.Layer):
    """A fine-tunable Keras 3 layer around a TF-Hub handle or a SavedModel.

    The arguments mean what they mean for `tensorflow_hub.KerasLayer`
    (docs/hub.md lists the few differences).

    Args:
        handle: String, a TF-Hub URL (downloaded and cached the standard way,
            `TFHUB_CACHE_DIR` honoured), `hub:/local/dir`, or a local
            SavedModel directory written by `tf.saved_model.save` (TF2 /
            TF-Hub reusable API), by Keras 3's `model.export()`, by TF1 (then
            name `signature`) or in the legacy TF1 Hub format.
        trainable: Boolean, whether the wrapped variables are trained (and
            the SavedModel's `regularization_losses` added to the layer's
            losses). Defaults to `False`.
        arguments: Optional dict of extra keyword arguments passed to the
            callable on every call, e.g. hyperparameters. JSON-serializable
            values keep the layer serializable.
        signature: Optional string, a signature to call instead of the
            object's `__call__` (TF1-style SavedModels expose only those;
            legacy TF1 Hub modules default to `"default"`).
        signature_outputs_as_dict: Boolean, return all outputs of
            `signature` as a dict. Only with a signature.
        output_key: Optional string, the output to take from a dict output.
            With a signature and neither this nor `signature_outputs_as_dict`,
            the signature's only output or its `"default"` output is taken.
        output_shape: Optional shape without the batch axis, or a dict / list
            of shapes matching the outputs, for functions whose output shape
            cannot be inferred.
        input_key: Optional string, the signature input that a single tensor
            feeds. Defaults to the signature's only input.
        tags: Optional list of MetaGraph tags (TF1 SavedModels), e.g.
            `["serve"]`.
        freeze_batchnorm: Boolean, call the SavedModel in inference mode
            (`training=False`) even while its variables train, so its
            BatchNormalization keeps the pretrained moving statistics (its
            dropout is off too). `tftransfer.freezing.apply` sets it from
            its own `freeze_batchnorm`. Defaults to `False`.
        **kwargs: Base `keras.layers.Layer` arguments (`name`, `dtype`, which
            defaults to `"float32"`: the SavedModel's dtypes are fixed).

    Example:

    >>> layer = HubLayer("saved_models/digits_cnn_hub", trainable=True)
    >>> features = layer(tf.zeros([2, 32, 32, 3]))
    """

    def __init__(self, handle, trainable=False, arguments=None, *, signature=None,
                 signature_outputs_as_dict=False, output_key=None, output_shape=None,
                 input_key=None, tags=None, freeze_batchnorm=False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(trainable=trainable, **kwargs)
        handle = os.fspath(handle)
        # Local directories are stored absolute, so a saved model reloads from anywhere.
        self.handle = handle if is_hub_url(handle) else os.path.abspath(resolve_handle(handle))
        self.arguments = dict(arguments or {})
        self.signature = signature
        self.signature_outputs_as_dict = bool(signature_outputs_as_dict)
        self.output_key = output_key
        self.input_key = input_key
        self.tags = list(tags) if tags is not None else None
        self._freeze_batchnorm = bool(freeze_batchnorm)
        self._shapes_config = _plain_shapes(output_shape)
        self._shapes = None if output_shape is None else _tensor_shapes(self._shapes_config)
        self._load()

    # ------------------------------------------------------------ loading

    def _load(self):
        path = resolve_handle(self.handle)
        self._is_tf1_hub = os.path.exists(os.path.join(path, _TF1_HUB_MARKER))
        tags = self.tags if self.tags is not None else ([] if self._is_tf1_hub else None)
        loaded = _load_saved_model(path, tags, self.handle)
        self._hub_object = loaded
        self._signature = self.signature or ("default" if self._is_tf1_hub else None)
        self._check_output_arguments()
        self._endpoint = self._pick_endpoint(loaded)
        self._takes_training = self._signature is None and _accepts_training(self._endpoint)
        self._output_key = self._resolve_output_key()
        self._regularization_losses = self._losses_of(loaded)
        self._track_weights(loaded)
        self.built = True

    def _check_output_arguments(self):
        if self.signature_outputs_as_dict and self._signature is None:
            raise ValueError(
                "`signature_outputs_as_dict=True` returns the outputs of a signature: pass "
                "`signature=` too (or load a legacy TF1 Hub module). "
                "Received: signature_outputs_as_dict=True, signature=None"
            )
        if self.signature_outputs_as_dict and self.output_key is not None:
            raise ValueError(
                "Pass either `output_key` (one output) or `signature_outputs_as_dict=True` "
                f"(all outputs), not both. Received: output_key={self.output_key!r}, "
                "signature_outputs_as_dict=True"
            )

    def _pick_endpoint(self, loaded):
        if self._signature is not None:
            if self._signature not in loaded.signatures:
                raise ValueError(
                    f"The SavedModel at {self.handle!r} has no signature "
                    f"{self._signature!r}. Available: {sorted(loaded.signatures)}. "
                    f"Received: signature={self.signature!r}"
                )
            return loaded.signatures[self._signature]
        if callable(loaded):
            return loaded.__call__
        if hasattr(loaded, "serve"):  # keras `model.export()`
            return loaded.serve
        raise ValueError(
            f"The SavedModel at {self.handle!r} is not callable and has no "
            "`serve` endpoint; pass `signature=` (one of "
            f"{sorted(loaded.signatures)}) and `output_key=`. Received: signature=None"
        )

    def _resolve_output_key(self):
        """The signature's only or `"default"` output when none is named."""
        if self._signature is None or self.output_key or self.signature_outputs_as_dict:
            return self.output_key
        outputs = sorted(self._endpoint.structured_outputs)
        if len(outputs) == 1:
            return outputs[0]
        if "default" in outputs:
            return "default"
        raise ValueError(
            f"Signature {self._signature!r} of {self.handle!r} has outputs {outputs}: pass "
            "`output_key=` to take one, or `signature_outputs_as_dict=True` to take all. "
            "Received: output_key=None"
        )

    def _losses_of(self, loaded):
        losses = list(getattr(loaded, "regularization_losses", None) or [])
        if not all(callable(loss) for loss in losses):
            raise ValueError(
                f"The SavedModel at {self.handle!r} has `regularization_losses` that are "
                "not all callables; each must take no argument and return a scalar."
            )
        return losses

    def _track_weights(self, loaded):
        trainable, non_trainable = _variables_of(loaded, self._endpoint)
        variables = [keras.Variable(v, trainable=any(v is t for t in trainable),
                                    name=_keras_name(v)) for v in trainable + non_trainable]
        self.hub_variables = variables  # a list set as an attribute: Keras tracks each variable
        self._publisher_trainable = [v.trainable for v in variables]
        self._in_batchnorm = _in_batchnorm(variables)
        self._sync_variables()
        if self.trainable and not trainable:
            warnings.warn(
                f"HubLayer is trainable but has zero trainable weights: the SavedModel at "
                f"{self.handle!r} exposes none (a model without weights, or TF1 reference "
                "variables; re-export those after `tf.compat.v1.enable_resource_variables()`).",
                stacklevel=4,
            )

    # ------------------------------------------------------------ training

    @property
    def trainable(self):
        return keras.layers.Layer.trainable.fget(self)

    @trainable.setter
    def trainable(self, value):
        keras.layers.Layer.trainable.fset(self, value)
        self._sync_variables()

    @property
    def freeze_batchnorm(self):
        """Call the SavedModel with `training=False` and keep its BatchNorm
        scale and offset fixed, as a frozen Keras `BatchNormalization` does."""
        return self._freeze_batchnorm

    @freeze_batchnorm.setter
    def freeze_batchnorm(self, value):
        self._freeze_batchnorm = bool(value)
        self._sync_variables()

    def _sync_variables(self):
        """Which variables train: those the publisher marked trainable, while the
        layer is, except BatchNorm's gamma and beta under `freeze_batchnorm`."""
        variables = getattr(self, "hub_variables", None)
        if variables is None:  # Layer.__init__ sets `trainable` before loading
            return
        for v, publisher, batchnorm in zip(variables, self._publisher_trainable,
                                           self._in_batchnorm):
            v.trainable = publisher and self.trainable and not (
                batchnorm and self._freeze_batchnorm)

    @property
    def batchnorm_weights(self):
        """The variables of the SavedModel's BatchNormalization layers (scale,
        offset and moving statistics: those in the scope of a `moving_mean`)."""
        return [v for v, batchnorm in zip(self.hub_variables, self._in_batchnorm) if batchnorm]

    @property
    def resolved_object(self):
        """The object `tf.saved_model.load` returned for `handle`."""
        return self._hub_object

    # ------------------------------------------------------------ calling

    def call(self, inputs, training=None):
        training = bool(training) and self.trainable and not self.freeze_batchnorm
        outputs = self._forward(inputs, training)
        if self.trainable:  # The publisher's weight penalties train with the weights.
            for loss in self._regularization_losses:
                self.add_loss(loss())
        return outputs

    def _forward(self, inputs, training):
        if self._signature is not None:
            outputs = self._endpoint(**self._signature_kwargs(inputs))
        else:
            kwargs = dict(self.arguments)
            if self._takes_training:
                kwargs["training"] = training
            outputs = self._endpoint(inputs, **kwargs)
        return self._with_output_shape(self._select_output(outputs))

    def _signature_kwargs(self, inputs):
        kwargs = dict(self.arguments)
        if isinstance(inputs, dict):
            kwargs.update(inputs)
        else:
            kwargs[self._signature_input()] = inputs
        return kwargs

    def _signature_input(self):
        if self.input_key:
            return self.input_key
        _, kwargs = self._endpoint.structured_input_signature
        names = sorted(set(kwargs) - set(self.arguments))
        if len(names) != 1:
            raise ValueError(
                f"Signature {self._signature!r} takes inputs {names}; pass `input_key=` to "
                "feed one tensor, or call the layer on a dict. Received: input_key=None"
            )
        return names[0]

    def _select_output(self, outputs):
        key = self._output_key
        if key is None:
            return outputs
        if not isinstance(outputs, dict):
            raise ValueError(
                f"`output_key` selects one output of a dict, but {self.handle!r} returns a "
                f"{type(outputs).__name__}: leave `output_key` unset. "
                f"Received: output_key={key!r}"
            )
        if key not in outputs:
            raise ValueError(
                f"`output_key` must be one of {sorted(outputs)} for "
                f"{self.handle!r}. Received: output_key={key!r}"
            )
        return outputs[key]

    def _with_output_shape(self, outputs):
        if self._shapes is None:
            return outputs
        return tf.nest.map_structure(
            lambda t, shape: tf.ensure_shape(t, tf.TensorShape([None]).concatenate(shape)),
            outputs, self._shapes, check_types=False)

    # ------------------------------------------------------------ shapes

    def compute_output_spec(self, inputs, training=None):
        specs = keras.tree.map_structure(
            lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), inputs)
        traced = tf.function(lambda x: self._forward(x, False)).get_concrete_function(specs)
        batch = keras.tree.flatten(inputs)[0].shape[0]
        return tf.nest.map_structure(lambda s: self._keras_tensor(s, batch),
                                     traced.structured_outputs)

    def _keras_tensor(self, spec, batch):
        if spec.shape.rank is None:
            raise ValueError(
                f"The output rank of {self.handle!r} cannot be inferred; pass `output_shape=` "
                "(without the batch axis). Received: output_shape=None"
            )
        return keras.KerasTensor((batch, *spec.shape[1:]), dtype=spec.dtype.name)

    def compute_output_shape(self, input_shape):
        if self._shapes is not None:
            batch = keras.tree.flatten(input_shape)[0] if _is_shape(input_shape) else None
            return tf.nest.map_structure(lambda s: (batch, *s.as_list()), self._shapes)
        dtype = self._input_dtype()
        inputs = keras.tree.map_shape_structure(
            lambda shape: keras.KerasTensor(shape, dtype=dtype), input_shape)
        return keras.tree.map_structure(lambda t: t.shape, self.compute_output_spec(inputs))

    def _input_dtype(self):
        """The dtype of the function's first input (float32 if it has none)."""
        fn = self._endpoint
        concrete = (getattr(fn, "concrete_functions", None) or [fn])[0]
        specs = [s for s in tf.nest.flatten(concrete.structured_input_signature)
                 if isinstance(s, tf.TensorSpec)]
        return specs[0].dtype.name if specs else "float32"

    # ------------------------------------------------------------ config

    def get_config(self):
        config = super().get_config()
        config.update(
            handle=self.handle,
            arguments=self._json_arguments(),
            signature=self.signature,
            signature_outputs_as_dict=self.signature_outputs_as_dict,
            output_key=self.output_key,
            output_shape=self._shapes_config,
            input_key=self.input_key,
            tags=self.tags,
            freeze_batchnorm=self.freeze_batchnorm,
        )
        return config

    def _json_arguments(self):
        for key, value in self.arguments.items():
            try:
                json.dumps(value)
            except TypeError as error:
                raise ValueError(
                    f"`arguments` must hold JSON-serializable values to save the layer; "
                    f"key {key!r} holds a {type(value).__name__}. "
                    f"Received: arguments={self.arguments!r}"
                ) from error
        return dict(self.arguments) or None


_CAFFE_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
PREPROCESSING_MODES = ("none", "tf", "torch", "caffe", "rescale:<scale>,<offset>",
                       "{\"mean\": ..., \"std\": ..., \"channel_order\": \"rgb\"}")


@keras.saving.register_keras_serializable(package="tftransfer")
class ImagePreprocessing(keras.layers.Layer):
    """The backbone's `preprocess_input`, as a layer inside the model.

    Models built by tftransfer take images in the raw 0-255 range, so training,
    evaluation and TF Serving all feed the same thing.

    Args:
        mode: String. `"none"` (identity), `"tf"` (to [-1, 1]), `"torch"`
            (to [0, 1], then ImageNet mean/std), `"caffe"` (RGB->BGR, minus
            ImageNet mean), or `"rescale:<scale>,<offset>"`; or a dict
            `{"mean": [...], "std": [...], "channel_order": "rgb"}` for any
            other normalization: `(pixels - mean) / std`, both in 0-255
            units (a number or one per channel; defaults 0 and 1), after
            reordering the channels to `"bgr"` if asked; or a Keras layer
            taking 0-255 pixels (saved with the model, weights included).

    Example:
        >>> ImagePreprocessing({"mean": [123.7, 116.3, 103.5], "std": [58.4, 57.1, 57.4]})
    """

    def __init__(self, mode="none", **kwargs):
        super().__init__(**kwargs)
        self.layer = None
        if isinstance(mode, keras.layers.Layer):  # kept in the config as Keras serializes it
            mode = {"layer": keras.saving.serialize_keras_object(mode)}
        if isinstance(mode, dict) and set(mode) == {"layer"}:
            self.layer, self.mode = keras.saving.deserialize_keras_object(mode["layer"]), mode
        else:
            self.mode = _check_mode(mode)

    def build(self, input_shape):
        if self.layer is not None and not self.layer.built:
            self.layer.build(input_shape)

    def call(self, images):
        x = keras.ops.cast(images, self.compute_dtype)
        if self.layer is not None:
            return self.layer(x)
        if self.mode == "none":
            return x
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            return (x / 255.0 - keras.ops.array(_TORCH_MEAN)) / keras.ops.array(_TORCH_STD)
        if self.mode == "caffe":
            return keras.ops.flip(x, axis=-1) - keras.ops.array(_CAFFE_MEAN)
        if isinstance(self.mode, dict):
            x = keras.ops.flip(x, axis=-1) if self.mode["channel_order"] == "bgr" else x
            mean, std = (keras.ops.array(self.mode[k], self.compute_dtype) for k in ("mean", "std"))
            return (x - mean) / std
        scale, offset = _rescale_factors(self.mode)
        return x * scale + offset

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def _rescale_factors(mode):
    scale, _, offset = mode.partition(":")[2].partition(",")
    return float(eval_fraction(scale)), float(eval_fraction(offset or "0"))


def eval_fraction(text):
    """Parses `"0.5"` or `"1/255"` into a float."""
    num, _, den = text.strip().partition("/")
    return float(num) / float(den or 1)


_NORMALIZATION_KEYS = ("mean", "std", "channel_order")


def _check_normalization(mode):
    """A `{"mean", "std", "channel_order"}` dict with lists of floats, or a ValueError."""
    def fail(why):
        return ValueError(
            f"`preprocessing` as a dict takes {', '.join(map(repr, _NORMALIZATION_KEYS))}: mean "
            "and std in 0-255 units (a number or one per channel, std > 0), channel_order "
            f"'rgb' or 'bgr' ({why}). Received: preprocessing={mode!r}")

    unknown = sorted(set(mode) - set(_NORMALIZATION_KEYS), key=str)
    if unknown:
        raise fail(f"unknown key(s) {unknown}")
    order = mode.get("channel_order", "rgb")
    if order not in ("rgb", "bgr"):
        raise fail("unknown channel_order")
    try:
        mean, std = ([float(v) for v in np.ravel(mode.get(k, d))] for k, d in (("mean", 0.0),
                                                                              ("std", 1.0)))
    except (TypeError, ValueError):
        raise fail("mean and std must be numbers") from None
    if not mean or not std or min(std) <= 0 or not np.all(np.isfinite(mean + std)):
        raise fail("std must be > 0, both finite")
    return {"mean": mean, "std": std, "channel_order": order}


def _check_mode(mode):
    if isinstance(mode, dict):
        return _check_normalization(mode)
    if mode in ("none", "tf", "torch", "caffe"):
        return mode
    if isinstance(mode, str) and mode.startswith("rescale:"):
        try:
            _rescale_factors(mode)
            return mode
        except ValueError:
            pass
    raise ValueError(
        f"`preprocessing` must be one of {', '.join(PREPROCESSING_MODES)} "
        f'(e.g. "rescale:1/255,0"). Received: preprocessing={mode!r}'
    )

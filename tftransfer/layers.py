"""Keras 3 layers of tftransfer: a fine-tunable TF-Hub / SavedModel layer and
in-model image preprocessing.

`HubLayer` is what `tensorflow_hub.KerasLayer` is for tf-keras, rebuilt for
Keras 3: the loaded object's variables become the layer's weights (the very same
TF resources, wrapped as `keras.Variable`s, so optimizers, regularizers,
`layer.trainable`, `.keras` saving and distribution strategies see them),
`training` is passed through where the object accepts it, and the config holds
the handle, not a pickle.
"""

import os
import warnings

import keras
import tensorflow as tf

_HUB_PREFIX = "hub:"


def is_hub_url(handle):
    """Whether `handle` is a remote TF-Hub / Kaggle Models handle."""
    return isinstance(handle, str) and handle.startswith(("http://", "https://", "gs://"))


def resolve_handle(handle):
    """Returns a local SavedModel directory for a TF-Hub handle.

    URLs are downloaded and cached by `tensorflow_hub.resolve` (it honours
    `TFHUB_CACHE_DIR`); `hub:/some/dir` and plain paths are local directories.
    """
    if is_hub_url(handle):
        import tensorflow_hub  # Only for remote handles: it imports tf-keras.

        return tensorflow_hub.resolve(handle)
    if handle.startswith(_HUB_PREFIX):
        handle = handle[len(_HUB_PREFIX):]
    return os.path.expanduser(handle)


def _accepts_training(fn):
    """Whether a restored `tf.function` was traced with a `training` argument."""
    for concrete in getattr(fn, "concrete_functions", []) or []:
        args, kwargs = concrete.structured_input_signature
        if "training" in kwargs or len(args) > 1:
            return True
    spec = getattr(fn, "function_spec", None)
    argspec = getattr(spec, "fullargspec", None)
    return bool(argspec) and "training" in (argspec.args + argspec.kwonlyargs)


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


def _keras_name(variable):
    return variable.name.split(":")[0].replace("/", "__")


@keras.saving.register_keras_serializable(package="tftransfer")
class HubLayer(keras.layers.Layer):
    """A fine-tunable Keras 3 layer around a TF-Hub handle or a SavedModel.

    Args:
        handle: String, a TF-Hub URL (downloaded and cached the standard way,
            `TFHUB_CACHE_DIR` honoured), `hub:/local/dir`, or a local
            SavedModel directory written by `tf.saved_model.save` (TF2 /
            TF-Hub reusable API), by Keras 3's `model.export()`, or by TF1
            (then name `signature`).
        signature: Optional string, a signature to call instead of the
            object's `__call__` (TF1-style SavedModels expose only those).
        output_key: Optional string, the output to take when the call returns
            a dict. Defaults to the only output, or `"default"`.
        input_key: Optional string, the signature's input name. Defaults to
            its only input.
        tags: Optional list of MetaGraph tags (TF1 SavedModels), e.g.
            `["serve"]`.
        trainable: Boolean, whether the wrapped variables are trained.
            Defaults to `False`.

    Example:

    >>> layer = HubLayer("saved_models/digits_cnn_hub", trainable=True)
    >>> features = layer(tf.zeros([2, 32, 32, 3]))
    """

    def __init__(self, handle, signature=None, output_key=None, input_key=None,
                 tags=None, trainable=False, **kwargs):
        super().__init__(trainable=trainable, **kwargs)
        handle = os.fspath(handle)
        # Local directories are stored absolute, so a saved model reloads from anywhere.
        self.handle = handle if is_hub_url(handle) else os.path.abspath(resolve_handle(handle))
        self.signature = signature
        self.output_key = output_key
        self.input_key = input_key
        self.tags = list(tags) if tags else None
        self._load()

    def _load(self):
        path = resolve_handle(self.handle)
        loaded = tf.saved_model.load(path, tags=self.tags)
        self._endpoint, self._takes_training = self._pick_endpoint(loaded)
        self._hub_object = loaded
        trainable, non_trainable = _variables_of(loaded, self._endpoint)
        if not trainable + non_trainable:
            warnings.warn(
                f"The SavedModel at {self.handle!r} exposes no variables to TF2 "
                "(TF1 models written with reference variables do this); it can "
                "only be used as a frozen feature extractor. Re-export it after "
                "`tf.compat.v1.enable_resource_variables()` to fine-tune it.",
                stacklevel=3,
            )
        for v in trainable + non_trainable:
            is_trainable = any(v is t for t in trainable)
            self._track_variable(keras.Variable(v, trainable=is_trainable, name=_keras_name(v)))
        self.built = True

    def _pick_endpoint(self, loaded):
        if self.signature is not None:
            if self.signature not in loaded.signatures:
                raise ValueError(
                    f"The SavedModel at {self.handle!r} has no signature "
                    f"{self.signature!r}. Available: {sorted(loaded.signatures)}. "
                    f"Received: signature={self.signature!r}"
                )
            return loaded.signatures[self.signature], False
        if callable(loaded):
            return loaded.__call__, _accepts_training(loaded.__call__)
        if hasattr(loaded, "serve"):  # keras `model.export()`
            return loaded.serve, False
        raise ValueError(
            f"The SavedModel at {self.handle!r} is not callable and has no "
            "`serve` endpoint; pass `signature=` (one of "
            f"{sorted(loaded.signatures)}) and `output_key=`."
        )

    def call(self, inputs, training=None):
        training = bool(training) and self.trainable
        if self.signature is not None:
            outputs = self._endpoint(**{self._signature_input(): inputs})
        elif self._takes_training:
            outputs = self._endpoint(inputs, training=training)
        else:
            outputs = self._endpoint(inputs)
        return self._select_output(outputs)

    def _signature_input(self):
        if self.input_key:
            return self.input_key
        _, kwargs = self._endpoint.structured_input_signature
        if len(kwargs) != 1:
            raise ValueError(
                f"Signature {self.signature!r} takes inputs {sorted(kwargs)}; "
                "pass `input_key=` to choose one."
            )
        return next(iter(kwargs))

    def _select_output(self, outputs):
        if not isinstance(outputs, dict):
            return outputs
        key = self.output_key
        if key is None:
            key = next(iter(outputs)) if len(outputs) == 1 else "default"
        if key not in outputs:
            raise ValueError(
                f"`output_key` must be one of {sorted(outputs)} for "
                f"{self.handle!r}. Received: output_key={self.output_key!r}"
            )
        return outputs[key]

    def compute_output_spec(self, inputs, training=None):
        graph_fn = tf.function(lambda x: self.call(x, training=False))
        shape = [None] + list(inputs.shape[1:])
        concrete = graph_fn.get_concrete_function(tf.TensorSpec(shape, inputs.dtype))
        out = concrete.structured_outputs
        return keras.KerasTensor(tuple(out.shape), dtype=out.dtype.name)

    def get_config(self):
        config = super().get_config()
        config.update(
            handle=self.handle,
            signature=self.signature,
            output_key=self.output_key,
            input_key=self.input_key,
            tags=self.tags,
        )
        return config


_CAFFE_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
PREPROCESSING_MODES = ("none", "tf", "torch", "caffe", "rescale:<scale>,<offset>")


@keras.saving.register_keras_serializable(package="tftransfer")
class ImagePreprocessing(keras.layers.Layer):
    """The backbone's `preprocess_input`, as a layer inside the model.

    Models built by tftransfer take images in the raw 0-255 range, so training,
    evaluation and TF Serving all feed the same thing.

    Args:
        mode: String. `"none"` (identity), `"tf"` (to [-1, 1]), `"torch"`
            (to [0, 1], then ImageNet mean/std), `"caffe"` (RGB->BGR, minus
            ImageNet mean), or `"rescale:<scale>,<offset>"`.
    """

    def __init__(self, mode="none", **kwargs):
        super().__init__(**kwargs)
        self.mode = _check_mode(mode)

    def call(self, images):
        x = keras.ops.cast(images, self.compute_dtype)
        if self.mode == "none":
            return x
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            return (x / 255.0 - keras.ops.array(_TORCH_MEAN)) / keras.ops.array(_TORCH_STD)
        if self.mode == "caffe":
            return keras.ops.flip(x, axis=-1) - keras.ops.array(_CAFFE_MEAN)
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


def _check_mode(mode):
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

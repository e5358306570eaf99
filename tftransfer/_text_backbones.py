"""Text backbones: detection from the source, the string `Input`, the text preprocessing layer.

Three forms of text backbone become the same kind of `FineTuner` (string in,
scores out), detected from the source itself:

- a text embedding SavedModel (TF-Hub), whose function takes `tf.string [batch]`:
  the backbone is its `HubLayer` (strings -> vector), the preprocessing a
  `TextInput` (strings pass through);
- a BERT-style encoder, whose function takes a dict with `input_word_ids`, plus
  `preprocessor=`: the preprocessing is the preprocessor's `HubLayer` (strings
  -> dict), the backbone the encoder's (dict -> `pooled_output`, or `output_key`);
- a Keras `.keras` / `.h5` model whose `Input` is a string (it holds its own
  `TextVectorization`): the backbone is the model (it freezes per layer), the
  preprocessing a `TextInput`.

The preprocessor sits inside the model as its `preprocessing` layer, so
training, export and prediction tokenize alike, and the model saves and
reloads (the `HubLayer`s keep their SavedModel paths).
"""

import keras

from tftransfer.layers import HubLayer

BERT_INPUTS = ("input_word_ids", "input_mask", "input_type_ids")
TEXT_INPUT_NAME = "text"


@keras.saving.register_keras_serializable(package="tftransfer")
class TextInput(keras.layers.Layer):
    """The preprocessing of a text backbone that tokenizes by itself: strings pass through.

    Example:

    >>> TextInput()(tf.constant(["a sentence"]))
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "string")
        kwargs["trainable"] = False  # nothing to train; also when reloaded from a config
        super().__init__(**kwargs)

    def call(self, texts):
        return texts

    def compute_output_shape(self, input_shape):
        return input_shape


def string_input():
    """The FineTuner's input for text: a batch of strings."""
    return keras.Input(shape=(), dtype="string", name=TEXT_INPUT_NAME)


def input_kind(layer):
    """`"string"`, `"bert"` (a dict with `input_word_ids`) or None (images) for a `HubLayer`."""
    fn = layer._endpoint  # noqa: SLF001 -- the loaded function: no public accessor on HubLayer
    concrete = (getattr(fn, "concrete_functions", None) or [fn])[0]
    args, kwargs = concrete.structured_input_signature
    first = (list(args) + list(kwargs.values()) or [None])[0]
    if layer.signature is not None and kwargs and "input_word_ids" in kwargs:
        return "bert"
    if isinstance(first, dict):
        return "bert" if "input_word_ids" in first else None
    dtype = getattr(first, "dtype", None)
    return "string" if dtype is not None and dtype.name == "string" else None


def is_text_model(model):
    """Whether a Keras backbone takes strings (its single `Input` is a string)."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return False
    return len(inputs or ()) == 1 and str(inputs[0].dtype) == "string"


def hub_text_backbone(layer, kind, handle, preprocessor, output_key):
    """`(backbone, preprocessing layer)` for a text `HubLayer` of `kind`."""
    if kind == "string":
        if preprocessor is not None:
            raise ValueError(
                f"`preprocessor` is for encoders that take token ids; the SavedModel {handle!r} "
                "takes strings itself (a text embedding). Leave `preprocessor` unset. "
                f"Received: preprocessor={preprocessor!r}"
            )
        inputs = string_input()
        outputs = _pick(layer(inputs), handle, output_key)
        return keras.Model(inputs, outputs, name="text_backbone"), TextInput(name="preprocessing")
    preprocessing = preprocessor_layer(preprocessor, handle)
    specs = _bert_specs(layer, preprocessing)
    inputs = {key: keras.Input(shape, dtype=dtype, name=key) for key, (shape, dtype) in specs.items()}
    outputs = _pick(layer(inputs), handle, output_key, prefer="pooled_output")
    return keras.Model(inputs, outputs, name="text_backbone"), preprocessing


def preprocessor_layer(preprocessor, handle):
    """The `preprocessor` (a handle, path or layer) as the model's preprocessing layer."""
    if preprocessor is None:
        raise ValueError(
            f"The SavedModel {handle!r} is a BERT-style encoder (it takes {', '.join(BERT_INPUTS)}): "
            "pass `preprocessor=` with its preprocessing SavedModel or TF-Hub handle, which maps "
            "strings to those inputs. Received: preprocessor=None"
        )
    if isinstance(preprocessor, keras.layers.Layer):
        return preprocessor
    have_text_ops = _import_text_ops()
    try:
        layer = HubLayer(preprocessor, name="preprocessing")
    except Exception as error:
        if have_text_ops or "not registered" not in str(error):
            raise
        raise ValueError(
            f"`preprocessor` needs TensorFlow Text ops, and `tensorflow_text` is not installed: "
            f"`pip install tensorflow-text` (the same version as tensorflow), here and wherever "
            f"the model is reloaded. Received: preprocessor={preprocessor!r}"
        ) from error
    if input_kind(layer) != "string":
        raise ValueError(
            f"`preprocessor` must map a batch of strings to {', '.join(BERT_INPUTS)}; the "
            f"SavedModel {preprocessor!r} does not take strings. Received: "
            f"preprocessor={preprocessor!r}"
        )
    return layer


def _import_text_ops():
    """Registers TF-Text ops (used by TF-Hub's BERT preprocessors) when tensorflow_text is there.

    Preprocessors written with plain TF ops load without it; one that needs its
    ops fails to load with TensorFlow's "Op type not registered" error, which
    `_preprocessor` turns into an error naming `preprocessor` and the package.

    Returns:
        Whether `tensorflow_text` could be imported.
    """
    try:
        import tensorflow_text  # noqa: F401 -- imported for its op registrations
    except ImportError:
        return False
    return True


def _bert_specs(layer, preprocessing):
    """`{name: (shape, dtype)}` of the encoder inputs, from the preprocessor's outputs."""
    out = preprocessing.compute_output_spec(keras.KerasTensor((None,), dtype="string"))
    missing = [k for k in BERT_INPUTS if not isinstance(out, dict) or k not in out]
    if missing:
        found = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise ValueError(
            f"`preprocessor` must return a dict with {', '.join(BERT_INPUTS)} for the encoder "
            f"{layer.handle!r}; it returns {found}. Received: preprocessor={preprocessing.name!r}"
        )
    return {k: (tuple(out[k].shape[1:]), out[k].dtype) for k in BERT_INPUTS}


def _pick(outputs, handle, output_key, prefer="default"):
    """One output of a dict: `output_key`, else `prefer`, `"default"` or the only one."""
    if not isinstance(outputs, dict):
        return outputs
    for key in (output_key, prefer, "default"):
        if key is not None and key in outputs:
            return outputs[key]
    if output_key is None and len(outputs) == 1:
        return next(iter(outputs.values()))
    raise ValueError(
        f"The SavedModel {handle!r} returns outputs {sorted(outputs)}; pass `output_key=` to "
        f"choose the features. Received: output_key={output_key!r}"
    )


def takes_text(backbone):
    """Whether a backbone is a text one: strings in, or a BERT encoder's dict of token ids."""
    if is_text_model(backbone) or hasattr(backbone, "tftransfer_text_preprocessing"):
        return True
    try:
        names = [getattr(t, "name", "") for t in backbone.inputs]
    except (AttributeError, ValueError):
        return False
    return len(names) > 1 and set(names) <= set(BERT_INPUTS)


def model_input(backbone, preprocessing):
    """`(input tensor, preprocessing layer)` of a FineTuner on a text backbone, else None.

    `preprocessing` is then a layer taking strings (or its serialized config);
    a mode string such as `"none"` means the backbone tokenizes by itself.
    """
    if not takes_text(backbone):
        return None
    if isinstance(preprocessing, dict):
        preprocessing = keras.saving.deserialize_keras_object(preprocessing)
    if not isinstance(preprocessing, keras.layers.Layer):
        preprocessing = TextInput()
    preprocessing.name = "preprocessing"
    return string_input(), preprocessing


def preprocessing_config(layer):
    """The FineTuner config's `preprocessing`: an image mode string, or a text layer's config."""
    mode = getattr(layer, "mode", None)
    if mode is not None:
        return mode
    config = keras.saving.serialize_keras_object(layer)
    config["config"]["trainable"] = False  # a preprocessor never trains (nor warns on reload)
    return config

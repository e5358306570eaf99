"""Load a pretrained backbone from whatever form the user has.

`load_backbone(source)` decides from the source itself:

| source | loader |
| --- | --- |
| `keras.Model` instance | used as is |
| `"https://tfhub.dev/..."`, `"hub:/local/dir"` | `HubLayer` (fine-tunable) |
| SavedModel dir from tf.keras 2 `model.save(dir)`: `keras_metadata.pb` (TF 2.5+), or |
|   the Keras metadata in the object graph (TF 2.0-2.4) | rebuilt as a Keras 3 model via tf-keras, HDF5 |
| other SavedModel dir (TF2 / TF-Hub, `model.export()`, TF1 signatures) | `HubLayer` |
| `*.keras` | `keras.saving.load_model` (`safe_mode` honoured) |
| `*.h5`, `*.hdf5` | Keras 3 legacy HDF5 loader, tf-keras fallback |
| `"mobilenet_v2"`, `"resnet50"`, ... | `keras.applications`, `weights="imagenet"`, None or a file |

A backbone whose input has no channel axis (`(H, W)`, e.g. an MLP starting
with `Flatten`) is returned behind a `Reshape`, taking `(H, W, 1)` images, so
every backbone takes `(H, W, C)`. Files that are not what their name says, an
unreachable TF-Hub URL and models with several inputs are refused with a
`ValueError` naming `source`.

The returned `keras.Model` maps images to features and carries two plain
attributes that `build_finetuner` reads: `tftransfer_source` and
`tftransfer_preprocessing` (an `ImagePreprocessing` mode).
"""

import os
import tempfile
import warnings
import zipfile

import keras

from tftransfer import _text_backbones as _text
from tftransfer._registry import close_matches
from tftransfer.layers import HubLayer, is_hub_url, resolve_handle

# name: (constructor, preprocessing mode, default input size)
_APPS = keras.applications
APPLICATIONS = {
    "mobilenet": (_APPS.MobileNet, "tf", 224),
    "mobilenet_v2": (_APPS.MobileNetV2, "tf", 224),
    "mobilenet_v3_small": (_APPS.MobileNetV3Small, "none", 224),
    "mobilenet_v3_large": (_APPS.MobileNetV3Large, "none", 224),
    "efficientnet_b0": (_APPS.EfficientNetB0, "none", 224),
    "efficientnet_b1": (_APPS.EfficientNetB1, "none", 240),
    "efficientnet_b2": (_APPS.EfficientNetB2, "none", 260),
    "efficientnet_b3": (_APPS.EfficientNetB3, "none", 300),
    "efficientnet_v2_b0": (_APPS.EfficientNetV2B0, "none", 224),
    "efficientnet_v2_s": (_APPS.EfficientNetV2S, "none", 384),
    "resnet50": (_APPS.ResNet50, "caffe", 224),
    "resnet101": (_APPS.ResNet101, "caffe", 224),
    "resnet50_v2": (_APPS.ResNet50V2, "tf", 224),
    "densenet121": (_APPS.DenseNet121, "torch", 224),
    "inception_v3": (_APPS.InceptionV3, "tf", 299),
    "xception": (_APPS.Xception, "tf", 299),
    "vgg16": (_APPS.VGG16, "caffe", 224),
    "convnext_tiny": (_APPS.ConvNeXtTiny, "none", 224),
    "nasnet_mobile": (_APPS.NASNetMobile, "tf", 224),
}

_FORMATS_TRIED = (
    "a keras.Model; a TF-Hub URL or hub:<dir>; a SavedModel directory "
    "(tf.keras 2, Keras 3 export, TF2/TF-Hub, TF1 signatures); a .keras file; "
    "a .h5/.hdf5 file; a keras.applications name"
)


def load_backbone(source, *, input_shape=None, weights="imagenet", output_layer=None,
                  signature=None, output_key=None, safe_mode=True, custom_objects=None,
                  name=None, preprocessor=None):
    """Loads a pretrained feature extractor as a Keras 3 model.

    Args:
        source: A `keras.Model`, a path (SavedModel directory, `.keras`,
            `.h5`), a TF-Hub handle (URL or `hub:/local/dir`), or a
            `keras.applications` name such as `"mobilenet_v2"`.
        input_shape: Optional tuple `(H, W, C)`. Needed where the source does
            not define it (hub objects with dynamic shapes, Keras 2
            `Sequential` models without an input); for applications it picks
            the size (default: the catalogue's size). For a backbone on
            `(H, W)` inputs, `(H, W)` or `(H, W, 1)`.
        weights: For applications only: `"imagenet"` (downloaded and cached
            by Keras), None (random), or a path to a weights file.
        output_layer: Optional layer name to cut the model at, to take
            features from an intermediate layer. Keras formats only, and
            not inside a subclassed `keras.Model` (which is used whole,
            behind a `keras.Input(input_shape)`).
        signature: Optional signature name for signature-only SavedModels.
        output_key: Optional output name when the SavedModel returns a dict.
        safe_mode: Boolean, refuse `.keras` files with arbitrary code
            (`Lambda` layers). Defaults to `True`.
        custom_objects: Optional dict `{name: class or function}` of the
            custom layers and functions a `.keras` / `.h5` file refers to,
            passed to Keras's loader.
        name: Optional name of the returned model.
        preprocessor: For a BERT-style encoder (a SavedModel taking
            `input_word_ids`, `input_mask`, `input_type_ids`): the SavedModel,
            TF-Hub handle or layer mapping strings to those inputs. It becomes
            the model's text preprocessing (see `_text_backbones`).

    Returns:
        A `keras.Model` from images `(H, W, C)` to features, with attributes
        `tftransfer_source` and `tftransfer_preprocessing`.

    Raises:
        ValueError: an unknown name, a missing path, a file that is not the
            format its name says (a text file named `.keras`, a bad `.h5`, a
            corrupt `saved_model.pb`), an unreachable TF-Hub URL, a model
            with several inputs, or an `output_layer` it does not have.

    Example:

    >>> backbone = load_backbone("saved_models/digits_cnn.keras")
    >>> backbone = load_backbone("mobilenet_v2", weights=None, input_shape=(96, 96, 3))
    """
    with keras.saving.custom_object_scope(custom_objects or {}):
        model, preprocessing = _dispatch(source, input_shape, weights, signature,
                                         output_key, safe_mode, preprocessor)
    # A text backbone brings its preprocessing layer (strings in); see `_text_backbones`.
    preprocessing = getattr(model, "tftransfer_text_preprocessing", None) or preprocessing
    text = _text.takes_text(model)  # no image shapes to check or fix
    subclassed = _is_subclassed(model)
    model = model if text else _ensure_input(model, input_shape)
    if not text:  # a BERT encoder's backbone takes its dict of token ids
        _check_single_input(model, source)
    if output_layer is not None:
        model = _cut(model, output_layer, subclassed)
    model = model if text else _add_channel_axis(model)
    if name:
        model.name = name
    model.tftransfer_source = getattr(source, "tftransfer_source", None) or (
        source if isinstance(source, str) else type(source).__name__)
    model.tftransfer_preprocessing = preprocessing
    return model


def _dispatch(source, input_shape, weights, signature, output_key, safe_mode, preprocessor=None):
    if isinstance(source, keras.Model):  # Maybe from `load_backbone` already.
        return source, getattr(source, "tftransfer_preprocessing", "none")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise ValueError(
            f"`source` must be a keras.Model, a path, a TF-Hub handle or an "
            f"application name. Received: source={source!r} of type {type(source).__name__}"
        )
    if is_hub_url(source) or source.startswith("hub:"):
        local = resolve_handle(source, arg="source")  # A clear error offline; cached for the layer.
        if os.path.exists(os.path.join(local, "saved_model.pb")):
            _read_saved_model_proto(local)  # A clear error for a corrupt file.
        return _from_hub(source, input_shape, signature, output_key, preprocessor), "none"
    if os.path.exists(source):
        return _from_path(source, input_shape, signature, output_key, safe_mode,
                          preprocessor), "none"
    if source.lower() in APPLICATIONS:
        return _from_application(source.lower(), input_shape, weights)
    raise _missing_source_error(source)


def _missing_source_error(source):
    looks_like_path = os.sep in source or "/" in source or source.endswith((".keras", ".h5", ".hdf5"))
    if looks_like_path:
        return ValueError(
            f"`source` names a path that does not exist: {source!r}. Pass an existing "
            f"SavedModel directory, .keras or .h5 file. Received: source={source!r}"
        )
    matches = close_matches(source, APPLICATIONS)
    hint = f" Did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""
    return ValueError(
        f"`source` is neither an existing path nor a known application name.{hint} "
        f"Application names: {', '.join(sorted(APPLICATIONS))}. Received: source={source!r}"
    )


def _from_path(path, input_shape, signature, output_key, safe_mode, preprocessor=None):
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")):
            raise ValueError(
                f"`source` is a directory but not a SavedModel (no saved_model.pb in it). "
                f"Formats tried: {_FORMATS_TRIED}. Found: {sorted(os.listdir(path))[:10]}. "
                f"Received: source={path!r}"
            )
        proto = _read_saved_model_proto(path) if os.path.exists(
            os.path.join(path, "saved_model.pb")) else None  # A clear error for a corrupt file.
        if _is_tf_keras_saved_model(path, proto) and signature is None:
            return _via_tf_keras(path)
        return _from_hub(path, input_shape, signature, output_key, preprocessor)
    if path.endswith(".keras"):
        return _from_keras_file(path, safe_mode)
    if path.endswith((".h5", ".hdf5")):
        return _from_h5(path, safe_mode)
    raise ValueError(
        f"`source` is a file of a format tftransfer cannot read. Formats tried: "
        f"{_FORMATS_TRIED}. Received: source={path!r}"
    )


def _not_a_file_of(path, expected, error=None):
    with open(path, "rb") as f:
        head = f.read(16)
    reason = f" ({error})" if error else ""
    return ValueError(
        f"`source` is named like {expected}, but the file is not one{reason}: it starts with "
        f"{head!r}. Pass a file written by Keras `model.save(...)` (or another format: "
        f"{_FORMATS_TRIED}). Received: source={path!r}"
    )


def _from_keras_file(path, safe_mode):
    if not zipfile.is_zipfile(path):
        raise _not_a_file_of(path, "a .keras archive (a zip file)")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    except (zipfile.BadZipFile, KeyError, OSError) as error:  # A damaged archive.
        raise _not_a_file_of(path, "a .keras archive", error) from error
    except TypeError as error:  # Keras's "Could not locate class ..." for a custom class
        raise _custom_object_error(path, error) from error


def _custom_object_error(path, error):
    first = str(error).strip().splitlines()[0]
    return ValueError(
        f"`source` refers to a custom class or function Keras does not know ({first}). Pass "
        "it as `custom_objects={'Name': Class}`, or register it with "
        f"`@keras.saving.register_keras_serializable()` before loading. Received: source={path!r}"
    )


def _from_h5(path, safe_mode):
    import h5py  # Keras's own dependency for HDF5.

    if not h5py.is_hdf5(path):
        raise _not_a_file_of(path, "an HDF5 model file (.h5)")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    except Exception as keras3_error:  # A tf.keras 2 file Keras 3 cannot parse.
        warnings.warn(
            f"Keras 3 could not read {path!r} ({keras3_error}); rebuilding it "
            "through tf-keras.",
            stacklevel=3,
        )
    try:
        return _via_tf_keras(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise _not_a_file_of(path, "an HDF5 model file with a Keras model in it", error) from error


_TF_KERAS_IDENTIFIERS = ("_tf_keras_sequential", "_tf_keras_model", "_tf_keras_network")


def _read_saved_model_proto(path):
    """Parses `saved_model.pb`; a corrupt or empty one is a clear ValueError."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    pb_path = os.path.join(path, "saved_model.pb")
    try:
        with open(pb_path, "rb") as f:
            proto.ParseFromString(f.read())
    except DecodeError as error:
        proto = error
    if isinstance(proto, DecodeError) or not proto.meta_graphs:
        reason = proto if isinstance(proto, DecodeError) else "it holds no MetaGraph"
        raise ValueError(
            f"`source` is a SavedModel directory whose saved_model.pb is corrupt or truncated "
            f"({reason}); expected the protocol buffer `tf.saved_model.save` writes. "
            f"Received: source={path!r}"
        )
    return proto


def _is_tf_keras_saved_model(path, proto):
    """A tf.keras 2 `model.save(dir)`: TF 2.5+ (`keras_metadata.pb`) or TF 2.0-2.4.

    TF 2.0-2.4 kept the Keras metadata in the object graph: the root object is
    a `user_object` with identifier `_tf_keras_sequential` (or `_model`,
    `_network`) and its JSON config in `metadata`.
    """
    if os.path.exists(os.path.join(path, "keras_metadata.pb")):
        return True
    if proto is None:  # Only a saved_model.pbtxt.
        return False
    nodes = proto.meta_graphs[0].object_graph_def.nodes
    root = nodes[0].user_object if nodes and nodes[0].HasField("user_object") else None
    return bool(root and root.identifier in _TF_KERAS_IDENTIFIERS and root.metadata)


def _via_tf_keras(path):
    """Rebuilds a tf.keras 2 SavedModel (or `.h5`) as a Keras 3 model, via legacy HDF5."""
    import tf_keras  # Legacy formats only.

    legacy = tf_keras.models.load_model(path, compile=False)
    with tempfile.TemporaryDirectory() as tmp:
        h5_path = os.path.join(tmp, "model.h5")
        legacy.save(h5_path)
        return keras.saving.load_model(h5_path, compile=False)


def _from_hub(handle, input_shape, signature, output_key, preprocessor=None):
    local = resolve_handle(handle)
    tf1_hub_module = os.path.exists(os.path.join(local, "tfhub_module.pb"))  # Empty tag set.
    layer = HubLayer(handle, signature=signature, output_key=output_key,
                     tags=["serve"] if signature and not tf1_hub_module else None, name="hub")
    kind = _text.input_kind(layer)
    if kind is not None:  # strings or token ids in: a text backbone
        model, text_preprocessing = _text.hub_text_backbone(layer, kind, handle, preprocessor,
                                                            output_key)
        model.tftransfer_text_preprocessing = text_preprocessing
        return model
    shape = input_shape or _hub_input_shape(layer)
    inputs = keras.Input(shape, name="image")
    outputs = layer(inputs)
    if isinstance(outputs, dict):  # A callable returning a dict: its only or "default" output.
        key = next(iter(outputs)) if len(outputs) == 1 else "default"
        if key not in outputs:
            raise ValueError(
                f"The SavedModel {handle!r} returns outputs {sorted(outputs)}; pass `output_key=` "
                "to choose the features. Received: output_key=None"
            )
        outputs = outputs[key]
    return keras.Model(inputs, outputs, name="hub_backbone")


def _hub_input_shape(layer):
    """Reads `(H, W, C)` (or `(H, W)`) from the loaded function's input signature."""
    fn = layer._endpoint
    concrete = (getattr(fn, "concrete_functions", None) or [fn])[0]
    args, kwargs = concrete.structured_input_signature
    spec = (list(args) + list(kwargs.values()))[0]
    if isinstance(spec, (dict, list, tuple)):  # named inputs
        names = sorted(spec) if isinstance(spec, dict) else f"{len(spec)} inputs"
        raise ValueError(
            f"`source` is a SavedModel whose function takes named inputs {names}, "
            "not one image tensor, so it cannot be an image backbone as it is. Wrap it in a "
            "tf.function taking the image alone (or pass `signature=` naming one that does). "
            f"Received: source={layer.handle!r}")
    shape = tuple(spec.shape[1:])
    if len(shape) not in (2, 3) or None in shape:
        raise ValueError(
            f"The SavedModel {layer.handle!r} takes images of shape {shape}; pass "
            f"`input_shape=(H, W, C)`. Received: input_shape=None"
        )
    return shape


def _from_application(name, input_shape, weights):
    constructor, preprocessing, size = APPLICATIONS[name]
    shape = tuple(input_shape) if input_shape else (size, size, 3)
    model = constructor(include_top=False, weights=weights, input_shape=shape, pooling=None)
    return model, preprocessing


def _is_subclassed(model):
    """A `keras.Model` subclass that defines `call` itself: Keras records no graph."""
    return not isinstance(model, keras.Sequential) and not _has_inputs(model)


def _ensure_input(model, input_shape):
    """Gives a model without a defined input (Keras 2 Sequential, a subclassed
    model) one; a subclassed model is wrapped whole behind `keras.Input`."""
    if not _has_inputs(model):
        if input_shape is None:
            raise ValueError(
                f"The model {model.name!r} has no defined input shape; pass "
                "`input_shape=(H, W, C)`. Received: input_shape=None"
            )
        if _is_subclassed(model):
            inputs = keras.Input(tuple(input_shape), name="image")
            return keras.Model(inputs, model(inputs), name=model.name)
        model.build((None, *input_shape))
    elif input_shape is not None and None not in model.input_shape[1:] and (
            tuple(model.input_shape[1:]) not in (tuple(input_shape), tuple(input_shape)[:-1])):
        raise ValueError(
            f"The backbone takes inputs of shape {tuple(model.input_shape[1:])}, "
            f"which does not match `input_shape`. Received: input_shape={tuple(input_shape)}"
        )
    if isinstance(model, keras.Sequential):
        # A functional view of the same layers: `.input`, `.output` and
        # `get_layer(...).output` work, so it can be cut and nested.
        model = keras.Model(model.inputs[0], model.outputs[0], name=model.name)
    return model


def _check_single_input(model, source):
    if len(model.inputs) > 1:
        names = [getattr(t, "name", "?") for t in model.inputs]
        raise ValueError(
            f"`source` is a model with {len(model.inputs)} inputs ({', '.join(names)}); a "
            "backbone takes one image input, so multi-input models (e.g. a GAN generator "
            f"taking latents and labels) cannot be fine-tuned as one. Received: source={source!r}"
        )


def _add_channel_axis(model):
    """A backbone on `(H, W)` inputs takes `(H, W, 1)` images, through one Reshape."""
    shape = tuple(model.input_shape[1:])
    if len(shape) != 2:
        return model
    inputs = keras.Input((*shape, 1), name="image")
    x = keras.layers.Reshape(shape, name="drop_channel_axis")(inputs)
    return keras.Model(inputs, model(x), name=f"{model.name}_with_channel_axis")


def _has_inputs(model):
    try:
        return bool(model.inputs)
    except (AttributeError, ValueError):
        return False


def _cut(model, layer_name, subclassed=False):
    if subclassed:
        raise ValueError(
            f"`output_layer` cannot cut inside {model.name!r}: it is a subclassed keras.Model, "
            "whose graph Keras does not record, so it is used whole. Build the cut as a "
            "functional model, or drop `output_layer`. Received: "
            f"output_layer={layer_name!r}")
    names = [layer.name for layer in model.layers]
    if layer_name not in names:
        matches = close_matches(layer_name, names)
        hint = f" Did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""
        raise ValueError(
            f"`output_layer` is not a layer of {model.name!r}.{hint} "
            f"Received: output_layer={layer_name!r}"
        )
    return keras.Model(model.inputs, _output_in(model, model.get_layer(layer_name)),
                       name=model.name)


def _output_in(model, layer):
    """The output of `layer` where `model` calls it: a layer first called in
    another model has its first output there, not connected to `model.inputs`."""
    # `_inbound_nodes` is private: Keras 3 has no public "output of this layer in
    # this model" (`layer.output` is its first call's), and this keeps the weights.
    for node in layer._inbound_nodes:
        outputs = node.output_tensors
        outputs = outputs[0] if len(outputs) == 1 else outputs
        try:
            keras.Model(model.inputs, outputs)
        except ValueError:  # "... is not connected to `inputs`": another model's call
            continue
        return outputs
    return layer.output

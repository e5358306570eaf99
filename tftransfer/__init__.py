"""tftransfer: Keras 3 transfer learning, from any pretrained backbone to TF Serving.

Example:

>>> from tftransfer import build_finetuner
>>> model = build_finetuner("saved_models/digits_cnn.keras", num_classes=5)
"""

__version__ = "0.1.0"

import importlib
import sys

# Public name -> module.
_PUBLIC = {
    "APPLICATIONS": "backbones",
    "FineTuner": "model",
    "HubLayer": "layers",
    "ImagePreprocessing": "layers",
    "build_finetuner": "finetuner",
    "describe_trainable": "freezing",
    "evaluate_classifier": "reports",
    "export_for_serving": "export",
    "fine_tune": "train",
    "format_report": "reports",
    "get_optimizer": "optim",
    "get_regularizer": "optim",
    "get_schedule": "optim",
    "interpret": "interpret",
    "load_backbone": "backbones",
    "lr_find": "lr_find",
    "predict": "predict",
    "to_onnx": "export",
    "to_tflite": "export",
}

__all__ = sorted(_PUBLIC)

# The command-line tools (`python -m tftransfer.search`, `.predict`, `.export`)
# import what they need themselves, so that `--help` and config errors answer
# without loading TensorFlow: while Python locates such a module, this package
# loads its public names on first use (PEP 562). Everywhere else they are
# imported now, which also registers tftransfer's Keras classes (`FineTuner`,
# `HubLayer`, ...) so that `keras.models.load_model` finds them after
# `import tftransfer`.
_CLI_TOOLS = ("tftransfer.search", "tftransfer.predict", "tftransfer.export")


def _running_a_tool():
    argv = getattr(sys, "orig_argv", [])
    if sys.argv[:1] != ["-m"] or "-m" not in argv[:-1]:
        return False
    return argv[argv.index("-m") + 1].startswith(_CLI_TOOLS)


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"tftransfer.{_PUBLIC[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tftransfer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


if not _running_a_tool():
    for _name in __all__:
        __getattr__(_name)
    del _name

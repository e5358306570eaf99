"""tftransfer: Keras 3 transfer learning, from any pretrained backbone to TF Serving.

Example:

>>> from tftransfer import build_finetuner
>>> model = build_finetuner("saved_models/digits_cnn.keras", num_classes=5)
"""

__version__ = "0.1.0"

import importlib

# Public name -> module. Imported on first use (PEP 562), so that importing a
# submodule (`python -m tftransfer.search --help`, a config check) does not
# load TensorFlow.
_LAZY = {
    "APPLICATIONS": "backbones",
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
    "load_backbone": "backbones",
}

__all__ = [
    "APPLICATIONS",
    "HubLayer",
    "ImagePreprocessing",
    "build_finetuner",
    "describe_trainable",
    "evaluate_classifier",
    "export_for_serving",
    "fine_tune",
    "format_report",
    "get_optimizer",
    "get_regularizer",
    "get_schedule",
    "load_backbone",
]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"tftransfer.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tftransfer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

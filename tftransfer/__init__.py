"""tftransfer: Keras 3 transfer learning, from any pretrained backbone to TF Serving.

Example:

>>> from tftransfer import build_finetuner
>>> model = build_finetuner("saved_models/digits_cnn.keras", num_classes=5)
"""

__version__ = "0.1.0"

from tftransfer.backbones import APPLICATIONS, load_backbone
from tftransfer.export import export_for_serving
from tftransfer.finetuner import build_finetuner
from tftransfer.freezing import describe_trainable
from tftransfer.layers import HubLayer, ImagePreprocessing
from tftransfer.model import FineTuner
from tftransfer.optim import get_optimizer, get_regularizer, get_schedule
from tftransfer.predict import predict
from tftransfer.reports import evaluate_classifier, format_report
from tftransfer.train import fine_tune

__all__ = [
    "APPLICATIONS",
    "FineTuner",
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
    "predict",
]


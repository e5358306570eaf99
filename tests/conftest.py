"""Shared fixtures: quiet TensorFlow, 2 logical CPUs, digits data, bundled backbones."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Split the CPU into two logical devices before TensorFlow initialises, as
# TensorFlow's own tests do, so MirroredStrategy can run 2 replicas here.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAVED = pathlib.Path(os.environ.get("TFTRANSFER_SAVED_MODELS", ROOT / "saved_models"))


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()


@pytest.fixture(scope="session")
def digits_target():
    """Digits 5-9 as 32x32x3 images in 0-255, labels 0-4."""
    from tftransfer.datasets import load_digits_images

    return load_digits_images(classes=(5, 6, 7, 8, 9))


@pytest.fixture(scope="session")
def small_batch(digits_target):
    x, y = digits_target
    return x[:32], y[:32]


def weights_of(layer):
    """Copies of all weights (trainable and not) of a layer, by path."""
    return {w.path: np.array(w) for w in layer.weights}


def changed(before, after, atol=0.0):
    """Paths of the weights that differ between two `weights_of` snapshots."""
    return {k for k in before if not np.allclose(before[k], after[k], atol=atol, rtol=0)}


class Crash(keras.callbacks.Callback):
    """Stands in for an interrupted process: raises `error` as epoch `at` begins."""

    def __init__(self, at, error=RuntimeError):
        super().__init__()
        self.at, self.error = at, error

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at:
            raise self.error("killed")


class EpochCount(keras.callbacks.Callback):
    """The epochs a `fit` ran, in order."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(epoch)

"""Models as packages ship them: subclassed, reused layers, custom objects, and
a custom normalization saved with the model (reloaded in a new process)."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import SAVED

from tftransfer import build_finetuner, load_backbone

DIGITS = str(SAVED / "digits_cnn.keras")


class Net(keras.Model):
    """A pretrained network the way most packages ship one: a subclass."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(4, 3, activation="relu")
        self.pool = keras.layers.GlobalAveragePooling2D()

    def call(self, x):
        return self.pool(self.conv(x))


def test_subclassed_model_is_used_whole_and_refused_when_cut():
    net = Net(name="net")
    model = build_finetuner(net, num_classes=2, input_shape=(16, 16, 3))
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    assert model.predict(x, verbose=0).shape == (2, 2)
    np.testing.assert_allclose(model.backbone(x), net(x), atol=1e-6)  # preprocessing "none"
    with pytest.raises(ValueError, match=r"`output_layer` cannot cut inside 'net': it is a "
                       r"subclassed keras.Model.*Received: output_layer='conv2d'"):
        build_finetuner(Net(name="net"), num_classes=2, input_shape=(16, 16, 3),
                        output_layer="conv2d")


def test_cut_of_reused_layers_equals_cutting_the_original():
    base = keras.models.load_model(DIGITS)
    x = inputs = keras.Input((32, 32, 3))
    for layer in base.layers[1:]:
        x = layer(x)
    cut = load_backbone(keras.Model(inputs, x), output_layer="relu2")
    original = load_backbone(base, output_layer="relu2")
    images = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(cut(images), original(images), atol=1e-6)
    assert build_finetuner(keras.Model(inputs, x), num_classes=2, output_layer="relu2")


class Scale(keras.layers.Layer):
    def call(self, x):
        return x * 0.5


def test_custom_object_keras_file_needs_custom_objects(tmp_path):
    inputs = keras.Input((8, 8, 3))
    path = str(tmp_path / "custom.keras")
    keras.Model(inputs, keras.layers.Flatten()(Scale(name="scale")(inputs))).save(path)
    with pytest.raises(ValueError, match=r"`source` refers to a custom class.*"
                       r"custom_objects=.*Received: source='.*custom\.keras'"):
        load_backbone(path)
    model = build_finetuner(path, num_classes=2, custom_objects={"Scale": Scale})
    assert model.backbone.get_layer("scale").__class__ is Scale


def test_custom_normalization_round_trips_through_model_keras(tmp_path):
    norm = {"mean": [120.0, 110.0, 100.0], "std": [60.0, 50.0, 40.0], "channel_order": "bgr"}
    model = build_finetuner(DIGITS, num_classes=2, preprocessing=norm)
    x = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = (x[..., ::-1] - norm["mean"]) / norm["std"]
    np.testing.assert_allclose(model.preprocessing(x), expected, rtol=1e-5, atol=1e-5)
    model.save(tmp_path / "m.keras")
    layer = keras.layers.Normalization(mean=[100.0] * 3, variance=[900.0] * 3)
    as_layer = build_finetuner(DIGITS, num_classes=2, preprocessing=layer)
    np.testing.assert_allclose(as_layer.preprocessing(x), (x - 100) / 30, rtol=1e-4, atol=1e-4)
    as_layer.save(tmp_path / "layer.keras")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    np.save(tmp_path / "z.npy", as_layer.predict(x, verbose=0))
    script = ("import sys, keras, numpy as np, tftransfer\n"
              "d = sys.argv[1]\n"
              "m = keras.models.load_model(d + '/m.keras')\n"
              "assert m.preprocessing.mode == {'mean': [120.0, 110.0, 100.0], 'std': "
              "[60.0, 50.0, 40.0], 'channel_order': 'bgr'}, m.preprocessing.mode\n"
              "np.testing.assert_allclose(m.predict(np.load(d + '/x.npy'), verbose=0), "
              "np.load(d + '/y.npy'), atol=1e-5)\n"
              "m = keras.models.load_model(d + '/layer.keras')\n"
              "assert isinstance(m.preprocessing.layer, keras.layers.Normalization)\n"
              "np.testing.assert_allclose(m.predict(np.load(d + '/x.npy'), verbose=0), "
              "np.load(d + '/z.npy'), atol=1e-5)\n")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with pytest.raises(ValueError, match=r"`preprocessing` as a dict takes .*std > 0.*"
                       r"Received: preprocessing="):
        build_finetuner(DIGITS, num_classes=2, preprocessing={"mean": 0, "std": [0, 1, 1]})

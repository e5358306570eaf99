"""The real remote-loading paths, exercised offline through their caches.

A TF-Hub URL goes through `tensorflow_hub`'s resolver, which finds it in
`TFHUB_CACHE_DIR` (keyed by the SHA-1 of the handle) exactly as after a
download; `weights="imagenet"` goes through Keras's `get_file`, which finds the
file in the Keras cache.
"""

import hashlib
import shutil

import h5py
import keras
import numpy as np
from conftest import SAVED

from tftransfer import build_finetuner, load_backbone

HANDLE = "https://tfhub.dev/tftransfer/digits_cnn/feature_vector/1"


def test_tfhub_url_resolves_through_tfhub_cache_dir(tmp_path, monkeypatch, digits_target):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    shutil.copytree(SAVED / "digits_cnn_hub", tmp_path / hashlib.sha1(HANDLE.encode()).hexdigest())
    model = build_finetuner(HANDLE, num_classes=5, trainable="all")
    assert model.source == HANDLE
    assert model.backbone.get_layer("hub").get_config()["handle"] == HANDLE
    x = digits_target[0][:8]
    reference = keras.saving.load_model(SAVED / "digits_cnn.keras")
    features = model.backbone(x)
    np.testing.assert_allclose(features, reference(x), atol=1e-4)


def test_imagenet_weights_come_from_the_keras_cache(tmp_path, monkeypatch):
    from keras.src.backend import config
    from keras.src.legacy.saving import legacy_h5_format

    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path))
    (tmp_path / "models").mkdir()
    published = keras.applications.MobileNetV2(include_top=False, weights=None,
                                                input_shape=(96, 96, 3))
    name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
    with h5py.File(tmp_path / "models" / name, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, published)
    backbone = load_backbone("mobilenet_v2", input_shape=(96, 96, 3))  # weights="imagenet"
    assert backbone.tftransfer_preprocessing == "tf"
    for a, b in zip(published.weights, backbone.weights):
        np.testing.assert_array_equal(np.array(a), np.array(b))

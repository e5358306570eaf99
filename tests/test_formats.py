"""Every backbone format: loads faithfully, freezes, fine-tunes, round-trips."""

import keras
import numpy as np
import pytest
from conftest import SAVED, changed, weights_of

from tftransfer import build_finetuner, fine_tune, load_backbone
from tftransfer.datasets import load_digits_images
from tftransfer.freezing import leaf_layers

# (id, source, extra build arguments, whether the backbone is one opaque HubLayer)
FORMATS = [
    ("keras", "digits_cnn.keras", {}, False),
    ("keras3_h5", "digits_cnn.h5", {}, False),
    ("keras3_export", "digits_cnn_export", {}, True),
    ("tf2_hub_savedmodel", "digits_cnn_hub", {}, True),
    ("tf1_signature", "digits_cnn_tf1",
     {"signature": "image_feature_vector", "output_key": "feature_vector"}, True),
    ("tf_keras2_savedmodel", "digits_cnn_tfkeras", {}, False),
    ("tf_keras2_h5_sequential", "digits_cnn_tfkeras.h5", {}, False),
    ("tf_keras_tf20_savedmodel", "digits_cnn_tf20", {}, False),  # metadata in the object graph
]
IDS = [f[0] for f in FORMATS]


def _source(name):
    return str(SAVED / name)


@pytest.fixture(scope="module")
def reference_features(digits_target):
    x, _ = digits_target
    reference = keras.saving.load_model(SAVED / "digits_cnn.keras")
    return x[:16], np.asarray(reference(x[:16], training=False))


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_each_format_gives_the_pretrained_features(fmt, reference_features):
    _, name, extra, _ = fmt
    x, expected = reference_features
    kwargs = {k: v for k, v in extra.items() if k in ("signature", "output_key", "input_shape")}
    backbone = load_backbone(_source(name), **kwargs)
    assert tuple(backbone.input_shape[1:]) == (32, 32, 3)
    assert tuple(backbone.input.shape) == (None, 32, 32, 3)  # a graph with a defined input
    np.testing.assert_allclose(np.asarray(backbone(x, training=False)), expected, atol=1e-4)


def _fit_once(model, batch):
    x, y = batch
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_frozen_backbone_keeps_weights_and_bn_statistics(fmt, small_batch):
    _, name, extra, _ = fmt
    model = build_finetuner(_source(name), num_classes=5, trainable="none", **extra)
    backbone, head = model.backbone, model.head.get_layer("predictions")
    before_backbone, before_head = weights_of(backbone), weights_of(head)
    assert len(before_backbone) > 0
    _fit_once(model, small_batch)
    assert changed(before_backbone, weights_of(backbone)) == set()
    assert changed(before_head, weights_of(head)) == set(before_head)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_trainable_all_changes_backbone(fmt, small_batch):
    _, name, extra, opaque = fmt
    model = build_finetuner(_source(name), num_classes=5, trainable="all",
                            freeze_batchnorm=False, **extra)
    backbone = model.backbone
    before = weights_of(backbone)
    _fit_once(model, small_batch)
    moved = changed(before, weights_of(backbone))
    kernels = {k for k in before if "kernel" in k}
    if fmt[0] in ("keras3_export", "tf1_signature"):
        # An inference-only function (`model.export()`, a TF1 signature):
        # BN statistics cannot update, the trainable weights still do.
        assert kernels and kernels <= moved
    elif opaque:
        assert moved == set(before)  # Every weight, BN statistics included.
    else:
        assert kernels <= moved and any("moving_mean" in k for k in moved)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_top_1_trains_only_the_last_weighted_layer(fmt, small_batch):
    _, name, extra, opaque = fmt
    model = build_finetuner(_source(name), num_classes=5, trainable="top:1", **extra)
    backbone = model.backbone
    before = weights_of(backbone)
    _fit_once(model, small_batch)
    moved = changed(before, weights_of(backbone))
    if opaque:
        # The whole SavedModel is one layer: "top:1" is all of it.
        assert {w.path for w in backbone.trainable_weights} <= moved
    else:
        # BatchNormalization stays frozen by default: the last layer that may
        # train is conv3.
        assert {k.split("/")[-2] for k in moved} == {"conv3"}


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f[0] in
                                 ("keras", "tf2_hub_savedmodel", "tf1_signature",
                                  "keras3_export", "tf_keras2_savedmodel")],
                         ids=lambda f: f[0])
def test_keras_save_and_reload_gives_identical_outputs(fmt, small_batch, tmp_path, monkeypatch):
    _, name, extra, _ = fmt
    model = build_finetuner(_source(name), num_classes=5, trainable="all", **extra)
    _fit_once(model, small_batch)
    path = tmp_path / "model.keras"
    model.save(path)
    monkeypatch.chdir(tmp_path)  # SavedModel handles are stored absolute
    reloaded = keras.saving.load_model(path)
    x = small_batch[0]
    np.testing.assert_array_equal(model.predict(x, verbose=0), reloaded.predict(x, verbose=0))
    assert len(reloaded.trainable_weights) == len(model.trainable_weights)


# The formats of issue 14: (source, layer to cut at, image size, channel axis in the data)
NEW_FORMATS = [
    ("digits_cnn_tf20", "relu3", 32, True),  # tf.keras SavedModel written the TF 2.0-2.4 way
    ("digits_mlp_hw.keras", "dense1", 8, False),  # input (8, 8): fed (n, 8, 8), no channel axis
]


@pytest.mark.parametrize("name,cut,size,channel_axis", NEW_FORMATS, ids=[f[0] for f in NEW_FORMATS])
def test_new_formats_cut_freeze_and_fine_tune(name, cut, size, channel_axis):
    x, y = load_digits_images(classes=(5, 6, 7, 8, 9), image_size=size, channels=3 if channel_axis else 1)
    x = x if channel_axis else x[..., 0]
    order = np.random.RandomState(0).permutation(len(x))
    train, val = (x[order[:400]], y[order[:400]]), (x[order[400:]], y[order[400:]])
    model = build_finetuner(_source(name), num_classes=5, output_layer=cut, learning_rate=3e-3)
    backbone = model.backbone
    assert leaf_layers(backbone)[-1].name == cut
    assert tuple(model.input_shape[1:]) == ((size, size, 3) if channel_axis else (size, size, 1))
    before = weights_of(backbone)
    fine_tune(model, train, val, head_epochs=6, fine_tune_epochs=0, verbose=0)
    assert changed(before, weights_of(backbone)) == set()  # Frozen in stage 1.
    assert model.evaluate(*val, verbose=0)[1] > 0.6  # Chance is 0.2.
    fine_tune(model, train, val, head_epochs=0, fine_tune_epochs=1, unfreeze="all", verbose=0)
    kernels = {k for k in before if "kernel" in k}
    assert kernels and kernels <= changed(before, weights_of(backbone))
    assert model.evaluate(*val, verbose=0)[1] > 0.6
    if not channel_axis:  # The same model takes (n, H, W, 1) too.
        np.testing.assert_allclose(model(val[0][:8]), model(val[0][:8, ..., None]), atol=1e-6)


def test_tf20_fixture_is_laid_out_as_tf_2_0_wrote_it():
    import tf_keras
    from tensorflow.core.protobuf import saved_model_pb2

    path = SAVED / "digits_cnn_tf20"
    assert not (path / "keras_metadata.pb").exists()
    proto = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    root = proto.meta_graphs[0].object_graph_def.nodes[0].user_object
    assert root.identifier == "_tf_keras_sequential"
    assert '"class_name": "Sequential"' in root.metadata
    legacy = tf_keras.models.load_model(path, compile=False)  # tf-keras reads it, layers and all
    assert [layer.name for layer in legacy.layers][-3:] == ["bn3", "relu3", "features"]
    backbone = load_backbone(str(path))
    assert [layer.name for layer in backbone.layers][-3:] == ["bn3", "relu3", "features"]

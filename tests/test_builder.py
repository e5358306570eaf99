"""build_finetuner: transfer is real, policies, heads, compile, bad input."""

import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SAVED, changed, weights_of

from tftransfer import build_finetuner, describe_trainable, load_backbone
from tftransfer.datasets import few_shot_split
from tftransfer.freezing import apply, trainable_rows
from tftransfer.heads import SparseCategoricalCrossentropy
from tftransfer.layers import HubLayer, ImagePreprocessing

DIGITS = str(SAVED / "digits_cnn.keras")


def test_pretrained_frozen_backbone_beats_training_from_scratch(digits_target):
    x, y = digits_target
    x_few, y_few, x_test, y_test = few_shot_split(x, y, per_class=10, seed=0)
    pretrained = build_finetuner(DIGITS, num_classes=5, trainable="none", learning_rate=1e-2)
    pretrained.fit(x_few, y_few, batch_size=10, epochs=40, verbose=0)
    scratch_backbone = keras.models.clone_model(keras.saving.load_model(DIGITS))
    scratch = build_finetuner(scratch_backbone, num_classes=5, trainable="all",
                              freeze_batchnorm=False, learning_rate=1e-2)
    scratch.fit(x_few, y_few, batch_size=10, epochs=40, verbose=0)
    acc_pretrained = pretrained.evaluate(x_test, y_test, verbose=0)[1]
    acc_scratch = scratch.evaluate(x_test, y_test, verbose=0)[1]
    assert acc_pretrained > 0.7, acc_pretrained  # chance is 0.2
    assert acc_pretrained > acc_scratch + 0.1, (acc_pretrained, acc_scratch)


POLICIES = [
    ("none", True, []),
    ("all", True, ["conv1", "conv2", "conv3"]),
    ("all", False, ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3"]),
    ("top:2", True, ["conv2", "conv3"]),
    ("top:1", False, ["bn3"]),
    ("fraction:0.34", True, ["conv3"]),
    ("conv[12]", True, ["conv1", "conv2"]),
    (["^conv1$", "bn"], False, ["conv1", "bn1", "bn2", "bn3"]),
    (lambda layer: layer.name.endswith("3"), True, ["conv3"]),
    (False, True, []),
]


@pytest.mark.parametrize("policy,freeze_bn,expected", POLICIES)
def test_freezing_policies(policy, freeze_bn, expected):
    backbone = load_backbone(DIGITS)
    apply(backbone, policy, freeze_batchnorm=freeze_bn)
    assert [name for name, _, _, flag in trainable_rows(backbone) if flag] == expected


def test_bad_freezing_policy_error():
    backbone = load_backbone(DIGITS)
    with pytest.raises(ValueError, match=re.escape("Received: trainable='top:x'")):
        apply(backbone, "top:x")
    with pytest.raises(ValueError, match=r"Received: trainable=3"):
        apply(backbone, 3)


def test_describe_trainable_table():
    model = build_finetuner(DIGITS, num_classes=5, trainable="top:1")
    lines = []
    table = describe_trainable(model.backbone, print_fn=lines.append)
    assert lines == [table]
    rows = {line.split()[0]: line.split()[-1] for line in table.splitlines()[2:-2]}
    assert rows == {"conv1": "no", "bn1": "no", "conv2": "no", "bn2": "no",
                    "conv3": "yes", "bn3": "no"}
    assert table.splitlines()[-1] == "trainable params: 18,432 of 23,920"


def test_batchnorm_statistics_update_only_when_unfrozen(small_batch):
    x, y = small_batch
    for freeze_bn, expect_moved in ((True, False), (False, True)):
        model = build_finetuner(DIGITS, num_classes=5, trainable="all", freeze_batchnorm=freeze_bn)
        bn = model.backbone.get_layer("bn1")
        before = np.array(bn.moving_mean)
        model.fit(x, y, epochs=1, verbose=0)
        assert (not np.allclose(before, np.array(bn.moving_mean))) == expect_moved


HEADS = [
    ("classification", 5, "softmax", ["accuracy"]),
    ("classification", 12, "softmax", ["accuracy", "top5_accuracy"]),
    ("multi_label", 4, "sigmoid", ["binary_accuracy", "auc"]),
    ("regression", None, "linear", ["mae"]),
]


@pytest.mark.parametrize("task,n,activation,metric_names", HEADS)
def test_heads_and_auto_metrics(task, n, activation, metric_names, small_batch):
    model = build_finetuner(DIGITS, num_classes=n, task=task, hidden_units=(16,), dropout=0.3)
    out = model.head.get_layer("predictions")
    assert out.activation.__name__ == activation
    assert out.units == (n or 1)
    assert [layer.name for layer in model.head.layers] == [
        "head_dropout_0", "head_dense_0", "head_dropout", "predictions"]
    x, labels = small_batch
    y = {"classification": labels, "multi_label": np.eye(4)[labels % 4],
         "regression": labels.astype("float32")}[task]
    history = model.fit(x, y, epochs=1, verbose=0)
    assert set(metric_names) <= set(history.history)


def test_regularizer_on_head_and_backbone():
    plain = build_finetuner(DIGITS, num_classes=5, trainable="all")
    head_only = build_finetuner(DIGITS, num_classes=5, trainable="all", regularizer="l2:1e-2")
    both = build_finetuner(DIGITS, num_classes=5, trainable="all", regularizer="l1_l2:1e-5,1e-2",
                           regularize_backbone=True)
    assert len(plain.losses) == 0
    assert len(head_only.losses) == 1
    assert len(both.losses) == 4  # the head and conv1..conv3


def test_label_smoothing_loss():
    probs = tf.constant([[0.97, 0.01, 0.01, 0.01]])
    plain = SparseCategoricalCrossentropy(4)(tf.constant([0]), probs)
    smooth = SparseCategoricalCrossentropy(4, label_smoothing=0.2)(tf.constant([0]), probs)
    assert float(smooth) > float(plain) + 0.1
    model = build_finetuner(DIGITS, num_classes=5, label_smoothing=0.1)
    assert model.loss.label_smoothing == 0.1


OPTIMIZERS = [
    ("sgd", {"momentum": 0.9, "nesterov": True}, keras.optimizers.SGD),
    ("adam", {}, keras.optimizers.Adam),
    ("adamw", {}, keras.optimizers.AdamW),
    ("rmsprop", {}, keras.optimizers.RMSprop),
    ("nadam", {}, keras.optimizers.Nadam),
    ("adagrad", {}, keras.optimizers.Adagrad),
    ("lion", {}, keras.optimizers.Lion),
]


@pytest.mark.parametrize("name,options,cls", OPTIMIZERS)
def test_optimizers_by_name_and_dict(name, options, cls):
    by_name = build_finetuner(DIGITS, num_classes=5, optimizer=name, optimizer_options=options,
                              learning_rate=3e-3)
    by_dict = build_finetuner(DIGITS, num_classes=5, learning_rate=3e-3,
                              optimizer={"class_name": name.upper(), "config": options})
    for model in (by_name, by_dict):
        assert type(model.optimizer) is cls
        assert float(model.optimizer.learning_rate) == pytest.approx(3e-3)
        for key, value in options.items():
            assert getattr(model.optimizer, key) == value
    instance = keras.optimizers.SGD(0.5)
    assert build_finetuner(DIGITS, num_classes=5, optimizer=instance).optimizer is instance


SCHEDULES = [
    ({"class_name": "cosine", "config": {"learning_rate": 1e-2, "decay_steps": 10}},
     {0: 1e-2, 10: 0.0}),
    ({"class_name": "exponential",
      "config": {"learning_rate": 1e-2, "decay_steps": 10, "decay_rate": 0.5}},
     {0: 1e-2, 10: 5e-3}),
    ({"class_name": "piecewise",
      "config": {"learning_rate": 1e-2, "boundaries": [5], "factors": [1.0, 0.1]}},
     {0: 1e-2, 6: 1e-3}),
    ({"class_name": "warmup_cosine",
      "config": {"learning_rate": 1e-2, "warmup_steps": 4, "decay_steps": 10}},
     {0: 0.0, 2: 5e-3, 4: 1e-2, 14: 0.0}),
    (keras.optimizers.schedules.CosineDecay(1e-2, 10), {0: 1e-2, 5: 5e-3}),
]


@pytest.mark.parametrize("schedule,values", SCHEDULES)
def test_learning_rate_schedules(schedule, values):
    model = build_finetuner(DIGITS, num_classes=5, learning_rate=schedule)
    lr = model.base_learning_rate  # the schedule object
    for step, expected in values.items():
        assert float(lr(step)) == pytest.approx(expected, abs=1e-7)


def test_weight_decay_and_strategy_scope_build(small_batch):
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
    model = build_finetuner(str(SAVED / "digits_cnn_hub"), num_classes=5, trainable="all",
                            optimizer="adamw", weight_decay=1e-3, strategy=strategy)
    assert model.distribute_strategy is strategy
    kernel = model.head.get_layer("predictions").kernel
    assert isinstance(kernel.value, tf.distribute.DistributedValues)
    before = weights_of(model.backbone)
    x, y = small_batch
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert changed(before, weights_of(model.backbone))


def test_serialization_round_trip_through_json():
    for layer in (ImagePreprocessing("rescale:1/255,-0.5"), ImagePreprocessing("caffe"),
                  HubLayer(str(SAVED / "digits_cnn_hub"), trainable=True)):
        config = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
        clone = keras.saving.deserialize_keras_object(config)
        assert clone.get_config() == layer.get_config()
    loss = SparseCategoricalCrossentropy(7, label_smoothing=0.1)
    clone = keras.losses.deserialize(json.loads(json.dumps(keras.losses.serialize(loss))))
    assert clone.get_config() == loss.get_config()


def test_preprocessing_modes_match_keras_applications():
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    for mode in ("tf", "torch", "caffe"):
        expected = keras.applications.imagenet_utils.preprocess_input(x.copy(), mode=mode)
        np.testing.assert_allclose(ImagePreprocessing(mode)(x), expected, rtol=1e-5, atol=1e-4)


def test_application_backbone_and_local_weights_file(tmp_path):
    reference = keras.applications.MobileNetV2(include_top=False, weights=None,
                                               input_shape=(32, 32, 3))
    path = tmp_path / "mnv2.weights.h5"
    reference.save_weights(path)
    backbone = load_backbone("mobilenet_v2", weights=str(path), input_shape=(32, 32, 3))
    model = build_finetuner(backbone, num_classes=3)  # keeps the recorded preprocessing
    assert model.preprocessing.mode == "tf"
    for a, b in zip(reference.weights, model.backbone.weights):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_output_layer_cut():
    backbone = load_backbone(DIGITS, output_layer="relu2")
    assert tuple(backbone.output_shape) == (None, 16, 16, 32)
    model = build_finetuner(DIGITS, num_classes=5, output_layer="relu2")
    assert model.head.get_layer("head_pool") is not None
    with pytest.raises(ValueError, match=r"Did you mean 'relu2'.*Received: output_layer='relu_2'"):
        load_backbone(DIGITS, output_layer="relu_2")


BAD_INPUT = [
    (dict(backbone="no/such/dir"), r"does not exist.*Received: source='no/such/dir'"),
    (dict(backbone="mobilenetv2"), r"Did you mean 'mobilenet_v2'.*Received: source='mobilenetv2'"),
    (dict(backbone=str(SAVED)), r"not a SavedModel \(no saved_model.pb.*Received: source="),
    (dict(optimizer="adamm"), r"Did you mean 'adam'.*Valid names are: .*adamw.*Received: optimizer='adamm'"),
    (dict(regularizer="l3:1e-4"), r"Unknown regularizer.*Valid names are: l1, l1_l2, l2.*Received: regularizer='l3'"),
    (dict(regularizer="l2:abc"), r"Received: regularizer='l2:abc'"),
    (dict(regularizer="l1_l2:1e-4"), r"takes 2 non-negative factor.*Received: regularizer='l1_l2:1e-4'"),
    (dict(num_classes=0), r"`num_classes` must be an integer >= 1.*Received: num_classes=0"),
    (dict(num_classes=None), r"Received: num_classes=None"),
    (dict(task="segmentation"), r"Valid names are: classification, multi_label, regression.*Received: task='segmentation'"),
    (dict(learning_rate=-1.0), r"Received: learning_rate=-1.0"),
    (dict(learning_rate={"class_name": "cosyne"}), r"Did you mean 'cosine'.*Received: learning_rate='cosyne'"),
    (dict(dropout=1.5), r"Received: dropout=1.5"),
    (dict(preprocessing="imagenet"), r"Received: preprocessing='imagenet'"),
    (dict(strategy="tpu"), r"Valid names are: auto, mirrored, multi_worker, none, one_device.*Received: strategy='tpu'"),
]


@pytest.mark.parametrize("kwargs,message", BAD_INPUT, ids=[str(k) for k, _ in BAD_INPUT])
def test_bad_input_errors(kwargs, message):
    kwargs = {"backbone": DIGITS, "num_classes": 5, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_finetuner(kwargs.pop("backbone"), **kwargs)


def test_lambda_keras_file_refused_unless_unsafe(tmp_path):
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.GlobalAveragePooling2D()(keras.layers.Lambda(lambda t: t * 2.0)(inputs))
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(ValueError, match="safe_mode"):
        build_finetuner(str(path), num_classes=2)
    model = build_finetuner(str(path), num_classes=2, safe_mode=False)
    assert model.output_shape == (None, 2)


def test_sequential_without_input_needs_and_takes_input_shape(tmp_path, small_batch):
    unbuilt = keras.Sequential([keras.layers.Conv2D(4, 3, name="c"),
                                keras.layers.GlobalAveragePooling2D(name="gap")])
    path = tmp_path / "seq.keras"
    unbuilt.save(path)
    with pytest.raises(ValueError, match=r"no defined input shape.*Received: input_shape=None"):
        load_backbone(str(path))
    backbone = load_backbone(str(path), input_shape=(32, 32, 3))
    assert tuple(backbone.input.shape) == (None, 32, 32, 3)
    assert tuple(load_backbone(str(path), input_shape=(32, 32, 3), output_layer="c").output_shape) \
        == (None, 30, 30, 4)
    with pytest.raises(ValueError, match=r"\(32, 32, 3\).*Received: input_shape=\(16, 16, 3\)"):
        load_backbone(DIGITS, input_shape=(16, 16, 3))

"""Bad input is refused before anything trains, with the package's one error format.

Each row of `BAD` is one input a user or an adversary may pass, the exception it
must raise and a fragment of its message (the argument in backticks, what is
allowed, `Received: arg=value`, and for data the first bad index). The models
are built once per module and their state is snapshotted before the first row
runs (every row requests `untouched`): every refused call fails before it
trains, and `test_refused_calls_left_the_model_untouched` checks that.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SAVED, changed, weights_of

from tftransfer import build_finetuner, fine_tune
from tftransfer import data as tfdata
from tftransfer._checks import check_batch
from tftransfer.datasets import load_digits_images
from tftransfer.freezing import trainable_rows

DIGITS = str(SAVED / "digits_cnn.keras")
NAN = float("nan")


@pytest.fixture(autouse=True)
def _seeded():
    """Overrides conftest's: a refused call builds nothing, so no session clearing per row
    (it costs over a second a test); the session is cleared once, after the module."""
    keras.utils.set_random_seed(0)
    yield


@pytest.fixture(scope="module", autouse=True)
def _clear_after_module():
    yield
    keras.backend.clear_session()


@pytest.fixture(scope="module")
def digits():
    """30 digits 0-2 as 32x32x3 images in 0-255, labels 0-2."""
    x, y = load_digits_images(classes=(0, 1, 2))
    return x[:30], y[:30]


@pytest.fixture(scope="module")
def models():
    """One model per task (3 outputs), built once; refused calls never train them."""
    keras.utils.set_random_seed(0)
    return {
        "classification": build_finetuner(DIGITS, num_classes=3),
        "smoothed": build_finetuner(DIGITS, num_classes=3, label_smoothing=0.1),
        "multi_label": build_finetuner(DIGITS, num_classes=3, task="multi_label"),
        "regression": build_finetuner(DIGITS, num_classes=1, task="regression"),
    }


@pytest.fixture(scope="module")
def untouched(models):
    """The models' state before the first refused call (every row requests it)."""
    return {name: _state(model) for name, model in models.items()}


def _state(model):
    """Weights, which layers train, and the recipe: what a refused call must leave alone."""
    trainable = {layer.name: layer.trainable for layer in model.backbone.layers}
    return weights_of(model), trainable, model.recipe


def build(**kwargs):
    return lambda ctx: build_finetuner(DIGITS, **{"num_classes": 3, **kwargs})


def tune(model="classification", train=None, **kwargs):
    """`fine_tune` on `models[model]` with `train` (a function of `(x, y)`)."""
    def call(ctx):
        x, y = ctx["data"]
        data = train(x.copy(), y.copy()) if train else (x, y)
        settings = {"head_epochs": 1, "fine_tune_epochs": 1, "verbose": 0, **kwargs}
        return fine_tune(ctx["models"][model], data, **settings)
    return call


def with_nan(x, y, index=7, value=NAN):
    x[index, 3, 4, 1] = value
    return x, y


def labels(values):
    return lambda x, y: (x[:len(values)], np.asarray(values))


def dataset(x, y, batch=8):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def change(index, value, dtype=None):
    """Sets label `index` to `value` (labels cast to `dtype` first)."""
    def edit(x, y):
        y = y.astype(dtype) if dtype else y
        y[index] = value
        return x, y
    return edit


def schedule(name, **config):
    return build(learning_rate={"class_name": name, "config": config})


def from_arrays(**kwargs):
    def call(ctx):
        x, y = ctx["data"]
        values = {"x": x.copy(), "y": y.copy(), "image_size": (32, 32), **kwargs}
        if callable(values["x"]):
            values["x"], values["y"] = values["x"](x.copy(), y.copy())
        return tfdata.from_arrays(values.pop("x"), values.pop("y"), **values)
    return call


E = re.escape
BAD = [
    # build_finetuner: numbers.
    ("lr_nan", build(learning_rate=NAN),
     E("`learning_rate` must be a finite float > 0. Received: learning_rate=nan")),
    ("lr_inf", build(learning_rate=float("inf")), E("Received: learning_rate=inf")),
    ("lr_zero", build(learning_rate=0.0), E("must be a finite float > 0. Received: learning_rate=0.0")),
    ("lr_np_nan", build(learning_rate=np.float32("nan")), E("Received: learning_rate=np.float32(nan)")),
    ("weight_decay_neg", build(weight_decay=-1),
     E("`weight_decay` must be a finite float >= 0 or None. Received: weight_decay=-1")),
    ("weight_decay_nan", build(weight_decay=NAN), E("Received: weight_decay=nan")),
    ("momentum_neg", build(optimizer="sgd", optimizer_options={"momentum": -0.5}),
     E("`momentum` must be a finite float >= 0. Received: momentum=-0.5")),
    ("pooling_sum", build(pooling="sum"),
     E("`pooling` must be one of 'avg', 'max'. Received: pooling='sum'")),
    ("dropout_str", build(dropout="0.2"),
     E("`dropout` must be a finite float in [0, 1). Received: dropout='0.2'")),
    ("dropout_one", build(dropout=1.0), E("Received: dropout=1.0")),
    ("dropout_nan", build(dropout=NAN), E("Received: dropout=nan")),
    ("label_smoothing_one", build(label_smoothing=1.0),
     E("`label_smoothing` must be a finite float in [0, 1). Received: label_smoothing=1.0")),
    ("label_smoothing_str", build(label_smoothing="0.1"), E("Received: label_smoothing='0.1'")),
    ("hidden_units_zero", build(hidden_units=(64, 0)),
     E("`hidden_units` must be an integer >= 1 or a list of them (one per layer). Received: "
       "hidden_units=(64, 0)")),
    ("hidden_units_str", build(hidden_units="64"), E("Received: hidden_units='64'")),
    ("hidden_units_float", build(hidden_units=[32.5]), E("Received: hidden_units=[32.5]")),
    ("input_shape_int", build(input_shape=32),
     E("`input_shape` must be a tuple (height, width, channels) of positive integers, e.g. "
       "(224, 224, 3) or None. Received: input_shape=32")),
    ("input_shape_2d", build(input_shape=(32, 32)), E("Received: input_shape=(32, 32)")),
    ("input_shape_negative", build(input_shape=(32, -32, 3)), E("Received: input_shape=(32, -32, 3)")),
    ("num_classes_one", build(num_classes=1),
     r"`num_classes` must be >= 2 for task='classification'.*task=\"multi_label\" with "
     r"num_classes=1.*Received: num_classes=1$"),
    ("num_classes_float", build(num_classes=2.0),
     E("`num_classes` must be an integer >= 1. Received: num_classes=2.0")),
    ("num_classes_bool", build(num_classes=True), E("Received: num_classes=True")),
    ("num_classes_str", build(num_classes="3"), E("Received: num_classes='3'")),
    # build_finetuner: schedules.
    ("schedule_steps_str", schedule("cosine", decay_steps="100"),
     E("`learning_rate.config.decay_steps` must be an integer >= 1. Received: "
       "learning_rate.config.decay_steps='100'")),
    ("schedule_alpha", schedule("cosine", decay_steps=100, alpha=2),
     E("`learning_rate.config.alpha` must be a finite float in [0, 1]. Received: "
       "learning_rate.config.alpha=2")),
    ("schedule_base_nan", schedule("cosine", decay_steps=9, learning_rate=NAN),
     E("Received: learning_rate=nan")),
    ("schedule_boundaries", schedule("piecewise", boundaries=[10, 5], values=[1e-3, 1e-4, 1e-5]),
     E("`learning_rate.config.boundaries` must be a list of increasing step numbers. Received: "
       "learning_rate.config.boundaries=[10, 5]")),
    ("schedule_values_nan", schedule("piecewise", boundaries=[10], values=[1e-3, NAN]),
     E("Received: learning_rate.config.values=[0.001, nan]")),
    # Freezing policies that select nothing, or malformed.
    ("trainable_regex_none", build(trainable="conv9"),
     E("`trainable` must be a policy that selects at least one backbone layer with weights "
       "(regexes are searched in layer names). Layers with weights: 'conv1', 'conv2', 'conv3'. "
       "Received: trainable='conv9'")),
    ("trainable_list_none", build(trainable=["^nope$", "zzz"]), E("Received: trainable=['^nope$', 'zzz']")),
    ("trainable_callable_none", build(trainable=lambda layer: False),
     r"Layers with weights: 'conv1'.*Received: trainable=<function"),
    ("trainable_weightless_only", build(trainable="relu"),
     E("Layers with weights: 'conv1', 'conv2', 'conv3'. Received: trainable='relu'")),
    ("trainable_bn_only", build(trainable="^bn"),
     E("It matches only BatchNormalization layers, kept frozen by freeze_batchnorm=True. "
       "Received: trainable='^bn'")),
    ("trainable_typo", build(trainable="al"),
     E("Layers with weights: 'conv1', 'conv2', 'conv3'. Did you mean 'all'? Received: trainable='al'")),
    ("trainable_prefix_typo", build(trainable="tops:2"),
     E("Did you mean 'top:N'? Received: trainable='tops:2'")),
    ("trainable_top_negative", build(trainable="Top:-1"),
     E("`trainable` must be \"top:N\" with N >= 0. Received: trainable='Top:-1'")),
    ("trainable_fraction", build(trainable="fraction:1.5"), E("Received: trainable='fraction:1.5'")),
    ("trainable_bad_regex", build(trainable="conv("),
     E("(any case), a regex or list of regexes on layer names, or a callable `layer -> bool`. "
       "Received: trainable='conv('")),
    # fine_tune: arguments.
    ("batch_size_zero", tune(batch_size=0),
     E("`batch_size` must be an integer >= 1. Received: batch_size=0")),
    ("batch_size_float", tune(batch_size=2.5), E("Received: batch_size=2.5")),
    ("lr_factor_str", tune(lr_factor="0.1"),
     E("`lr_factor` must be a finite float in (0, 1]. Received: lr_factor='0.1'")),
    ("lr_factor_zero", tune(lr_factor=0), E("Received: lr_factor=0")),
    ("head_epochs_float", tune(head_epochs=1.5),
     E("`head_epochs` must be an integer >= 0. Received: head_epochs=1.5")),
    ("fine_tune_epochs_neg", tune(fine_tune_epochs=-1), E("Received: fine_tune_epochs=-1")),
    ("early_stopping_neg", tune(early_stopping=-1),
     E("`early_stopping` must be an integer patience >= 0, or None (or False) to turn it off. "
       "Received: early_stopping=-1")),
    ("early_stopping_true", tune(early_stopping=True), E("Received: early_stopping=True")),
    ("layerwise_decay_nan", tune(layerwise_lr_decay=NAN),
     E("`layerwise_lr_decay` must be a finite float in (0, 1], \"auto\" or None. Received: "
       "layerwise_lr_decay=nan")),
    ("fine_tune_lr_nan", tune(fine_tune_learning_rate=NAN), E("Received: fine_tune_learning_rate=nan")),
    ("initial_epoch_past_end", tune(initial_epoch=2), E("(here 1). Received: initial_epoch=2")),
    ("shuffle_str", tune(shuffle="yes"), E("`shuffle` must be True or False. Received: shuffle='yes'")),
    ("unfreeze_regex_none", tune(unfreeze="conv9"),
     E("Layers with weights: 'conv1', 'conv2', 'conv3'. Received: unfreeze='conv9'")),
    ("unfreeze_callable_none", tune(unfreeze=lambda layer: False),
     r"`unfreeze` must be a policy that selects.*Received: unfreeze=<function"),
    ("unfreeze_malformed", tune(unfreeze="top:many"), E("Received: unfreeze='top:many'")),
    ("train_str", tune(train=lambda x, y: "images/"),
     E("`train` must be a batched tf.data.Dataset, a tuple (x, y) of arrays or an ImageData. "
       "For a folder of images: tftransfer.data.from_directory('images/', model=model). "
       "Received: train='images/'")),
    # fine_tune: data.
    ("labels_out_of_range", tune(train=change(5, 3)),
     E("`train` must hold labels that are integer class ids in [0, 3) (num_classes=3). The "
       "first bad label is at index 5: 3.")),
    ("labels_out_of_range_smoothed", tune("smoothed", train=change(4, 5)),
     E("The first bad label is at index 4: 5. Received: train=(array(shape=(30, 32, 32, 3), "
       "dtype=float32), array(shape=(30,), dtype=int32))")),
    ("labels_negative", tune(train=change(2, -1)), E("The first bad label is at index 2: -1.")),
    ("labels_float", tune(train=labels([0.0, 1.0, 0.5, 2.0])), E("The first bad label is at index 2: 0.5.")),
    ("labels_nan", tune(train=labels([0.0, NAN])), E("The first bad label is at index 1: nan.")),
    ("labels_one_hot", tune(train=lambda x, y: (x, np.eye(3)[y])),
     E("of shape [n] (one-hot labels? pass np.argmax(y, axis=-1)).")),
    ("labels_text", tune(train=lambda x, y: (x, y.astype(str))),
     E("`train` must hold numeric arrays with one row per example.")),
    ("xy_lengths", tune(train=lambda x, y: (x, y[:-1])),
     E("`train` must hold one label per image. Got 30 images and 29 labels.")),
    ("empty_arrays", tune(train=lambda x, y: (x[:0], y[:0])),
     E("`train` must hold non-empty arrays (at least one example). Received: "
       "train=(array(shape=(0, 32, 32, 3), dtype=float32), array(shape=(0,), dtype=int32))")),
    ("nan_pixel", tune(train=with_nan),
     E("`train` must hold finite images (no NaN or infinity). The first bad image is at index 7 "
       "(it holds nan).")),
    ("inf_pixel_validation", tune(validation=with_nan(*load_digits_images(classes=(0, 1, 2)), 11, np.inf)),
     E("`validation` must hold finite images (no NaN or infinity). The first bad image is at "
       "index 11 (it holds inf).")),
    ("class_weight_partial", tune(class_weight={0: 1.0, 1: 2.0}),
     E("`class_weight` must be None or a dict {class_id: weight >= 0} for every class 0..2. "
       "Missing classes: 2. Received: class_weight={0: 1.0, 1: 2.0}")),
    ("class_weight_extra", tune(class_weight={0: 1, 1: 1, 2: 1, 7: 1}), E("Unknown classes: 7.")),
    ("class_weight_nan", tune(class_weight={0: 1.0, 1: NAN, 2: 1.0}),
     E("Received: class_weight={0: 1.0, 1: nan, 2: 1.0}")),
    ("class_weight_regression", tune("regression", train=lambda x, y: (x, y * 0.5), class_weight={0: 1.0}),
     E("`class_weight` must be None for task='regression'")),
    ("validation_list", tune(validation=[1, 2, 3]),
     E("Received: validation=[1, 2, 3]")),
    ("dataset_empty", tune(train=lambda x, y: dataset(x[:0], y[:0])),
     r"`train` must be a dataset holding at least one batch \(it is empty\). Received: train=<"),
    ("dataset_label_second_batch", tune(train=lambda x, y: dataset(*change(10, 4)(x, y))),
     E("The first bad label is at index 10: 4.")),
    ("dataset_nan_second_batch", tune(train=lambda x, y: dataset(*with_nan(x, y, 9))),
     E("The first bad image is at index 9 (it holds nan).")),
    ("image_size_arrays", tune(train=lambda x, y: (x[:, :28, :28], y)),
     E("`train` must hold images of shape [n, 32, 32, 3], the model's input. Got shape (30, 28, 28, 3).")),
    ("image_channels_dataset", tune(train=lambda x, y: dataset(x[..., :1], y)),
     E("`train` must hold images of shape [n, 32, 32, 3], the model's input. Got shape (None, 32, 32, 1).")),
    ("image_data_more_classes", tune(train=lambda x, y: tfdata.from_arrays(
        x, np.arange(30) % 5, image_size=(32, 32), validation_split=0.0)),
     E("`train` must be data with at most 3 classes, the model's num_classes. It has 5 classes: "
       "'0', '1', '2', '3', '4'.")),
    ("multi_label_not_binary", tune("multi_label", train=lambda x, y: (x, np.eye(3)[y] * 2)),
     E("`train` must hold labels that are 0/1 vectors of shape [n, 3] (task='multi_label'). The "
       "first bad label is at index 0: [2.0, 0.0, 0.0].")),
    ("multi_label_ids", tune("multi_label", train=lambda x, y: (x, y)), E("Got shape (30,).")),
    ("regression_nan_target", tune("regression", train=change(6, NAN, dtype="float64")),
     E("`train` must hold finite regression targets (no NaN or infinity). The first bad target "
       "is at index 6.")),
    # tftransfer.data.from_arrays.
    ("from_arrays_nan", from_arrays(x=with_nan),
     E("`x` must be finite images (no NaN or infinity). The first bad image is at index 7 (it "
       "holds nan). Received: x=array(shape=(30, 32, 32, 3), dtype=float32)")),
    ("from_arrays_inf", from_arrays(x=lambda x, y: with_nan(x, y, 29, np.inf)),
     E("The first bad image is at index 29 (it holds inf).")),
    ("from_arrays_bool", from_arrays(x=lambda x, y: (x > 100, y)),
     E("`x` must hold numeric pixels (uint8, or integers / floats in 0-255). bool masks are not "
       "images: pass `x.astype('uint8') * 255`. Received: x=array(shape=(30, 32, 32, 3), "
       "dtype=bool)")),
    ("from_arrays_uint16", from_arrays(x=lambda x, y: ((x * 257).astype("uint16"), y)),
     E("`x` must hold integer pixels in 0-255. They span 0 to 65535; for 16-bit images pass "
       "`(x // 257).astype('uint8')`. Received: x=array(shape=(30, 32, 32, 3), dtype=uint16)")),
]


@pytest.mark.parametrize("call,message", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_input_is_refused_with_a_clear_error(call, message, digits, models, untouched):
    with pytest.raises(ValueError, match=message):
        call({"data": digits, "models": models})


def test_refused_calls_left_the_model_untouched(models, untouched):
    for name, model in models.items():
        weights, trainable, recipe = untouched[name]
        now_weights, now_trainable, now_recipe = _state(model)
        assert not changed(weights, now_weights), name
        assert (now_trainable, now_recipe) == (trainable, recipe), name


# Inputs that used to be refused or silently ignored, and now work. ------------------

@pytest.mark.parametrize("policy,expected", [
    ("ALL", ["conv1", "conv2", "conv3"]),
    ("Top:1", ["conv3"]),
    (" top:2 ", ["conv2", "conv3"]),
    ("FRACTION:0.34", ["conv3"]),
    ("None", []),
])
def test_keyword_policies_ignore_case(policy, expected):
    model = build_finetuner(DIGITS, num_classes=3, trainable=policy)
    assert [name for name, _, _, flag in trainable_rows(model.backbone) if flag] == expected


def test_numpy_integers_and_a_single_hidden_width_are_accepted(digits):
    model = build_finetuner(DIGITS, num_classes=np.int64(3), hidden_units=np.int32(16),
                            input_shape=(np.int64(32), 32, 3))
    assert model.output_shape == (None, 3)
    assert model.head.get_layer("head_dense_0").units == 16
    x, y = digits
    history = fine_tune(model, (x, y.astype("float64")), head_epochs=np.int64(1),
                        fine_tune_epochs=np.int64(0), batch_size=np.int64(10),
                        class_weight={np.int64(c): 1.0 for c in range(3)}, verbose=0)
    assert len(history.history["loss"]) == 1


def test_unfreeze_keyword_in_any_case_trains_the_top_layer_only(digits):
    model = build_finetuner(DIGITS, num_classes=3)
    backbone = model.backbone
    before = weights_of(backbone)
    fine_tune(model, digits, head_epochs=0, fine_tune_epochs=1, unfreeze="Top:1", verbose=0,
              early_stopping=None, batch_size=10)
    moved = {path.split("/")[-2] for path in changed(before, weights_of(backbone))}
    assert moved == {"conv3"}, moved


def test_check_batch_names_the_index_in_the_whole_dataset():
    images = np.zeros((4, 2, 2, 3), "float32")
    with pytest.raises(ValueError, match=E("The first bad label is at index 66: 9.")):
        check_batch(images, np.array([0, 1, 9, 0]), num_classes=3, task="classification",
                    index_offset=64)

"""HubLayer against tensorflow_hub's own `keras_layer_test.py`, case by case.

Every behavioural case of `hub.KerasLayer`'s test file, in Keras 3 terms, on
fixtures built by `hub_fixtures` (the same functions as the peer's helpers).
Cases that HubLayer does differently on purpose assert HubLayer's behaviour
and are listed in docs/hub.md with the reason; the peer's Estimator cases
have no Keras 3 counterpart (tf.estimator is gone from TensorFlow 2.16+).
"""

import json
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from hub_fixtures import SavedModels, array, batch_norm_variables

from tftransfer.layers import HubLayer

BOTH = pytest.mark.parametrize("kind", ["", "_keras"], ids=["saved_raw", "saved_from_keras"])


@pytest.fixture(autouse=True)
def _seeded():
    """Seeded as everywhere, but without conftest's per-test `clear_session()`.

    Its garbage collection over the loaded SavedModels took 1-2 s per test here;
    these tests share no layer names or global state that it would reset.
    """
    keras.utils.set_random_seed(0)
    yield


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    return SavedModels(str(tmp_path_factory.mktemp("hub_parity")))


def _json_cycle(config):
    return json.loads(json.dumps(config))


def _functional(layer, shape=(1,), dtype="float32"):
    inputs = keras.Input(shape, dtype=dtype)
    return keras.Model(inputs, layer(inputs))


def _fit_steps(model, x, y, steps):
    """`steps` gradient steps on the same full batch (the peer's epochs), in one epoch."""
    model.fit(np.tile(x, (steps, 1)), np.tile(y, (steps, 1)), batch_size=len(x), epochs=1,
              shuffle=False, verbose=0)


def _total_loss(model, x):
    model(x)  # Keras 3: `losses` holds what the last call added.
    return float(sum(np.asarray(loss) for loss in model.losses))


# ---------------------------------------------------------------- KerasTest


@BOTH
def test_half_plus_one_retraining(saved, kind):
    layer = HubLayer(saved["half_plus_one" + kind], trainable=True)
    model = _functional(layer)
    np.testing.assert_array_equal(model(array([[0], [8], [10], [12]])), array([[1], [5], [6], [7]]))
    np.testing.assert_allclose([np.asarray(v) for v in model.losses], [0.0025], rtol=1e-6)
    assert [len(w.shape) for w in model.trainable_weights] == [2]  # The kernel w.
    assert sorted(len(w.shape) for w in model.non_trainable_weights) == [1, 2]
    assert not {w.path for w in model.trainable_weights} & {w.path for w in model.non_trainable_weights}
    model.compile(keras.optimizers.SGD(0.002), "mean_squared_error")
    x = array([[9.0], [10.0], [11.0]] * 10)
    _fit_steps(model, x, x / 2 + 6, steps=10)
    np.testing.assert_array_equal(model(array([[0.0]])), array([[1.0]]))  # frozen bias
    np.testing.assert_allclose(model(array([[10.0]])), array([[11.0]]), rtol=0.03)
    np.testing.assert_allclose([np.asarray(v) for v in model.losses], [0.01], rtol=0.06)


@BOTH
def test_regularization_loss_only_while_trainable(saved, kind):
    layer = HubLayer(saved["half_plus_one" + kind], trainable=False)
    model = _functional(layer)
    x = array([[1.0]])
    assert _total_loss(model, x) == 0.0
    for trainable, expected in ((True, 0.0025), (False, 0.0), (True, 0.0025)):
        layer.trainable = trainable
        assert _total_loss(model, x) == pytest.approx(expected, rel=1e-6)


def test_regularization_loss_trains_the_weight(saved):
    # fit minimises the penalty too: with a zero data loss, w decays towards 0.
    layer = HubLayer(saved["half_plus_one"], trainable=True)
    model = _functional(layer)
    model.compile(keras.optimizers.SGD(10.0), "mean_squared_error")
    x = array([[0.0]])
    _fit_steps(model, x, array([[1.0]]), steps=5)  # y = w*0 + 1 fits exactly.
    w = next(np.asarray(v) for v in model.trainable_weights)
    np.testing.assert_allclose(w, [[0.5 * 0.8**5]], rtol=1e-5)  # w -= 10 * 0.02 * w, 5 times.


@BOTH
def test_batch_norm_retraining(saved, kind):
    layer = HubLayer(saved["batch_norm" + kind], trainable=True)
    beta, _, mean, _ = batch_norm_variables(layer)
    model = _functional(layer)
    model.compile(keras.optimizers.SGD(0.1), "mean_squared_error")
    x = array([[11.0], [12.0], [13.0]])
    _fit_steps(model, x, 2 * x, steps=100)
    np.testing.assert_allclose(mean.numpy(), [12.0], rtol=1e-5)
    np.testing.assert_allclose(beta.numpy(), [24.0], rtol=1e-5)
    np.testing.assert_allclose(model(x), 2 * x, rtol=1e-5)
    for _ in range(10):  # Inference: moving statistics, no updates.
        np.testing.assert_allclose(model(array([[10.0], [20.0], [30.0]])),
                                   array([[20.0], [40.0], [60.0]]), rtol=1e-5)
    np.testing.assert_allclose(mean.numpy(), [12.0], rtol=1e-5)
    np.testing.assert_allclose(beta.numpy(), [24.0], rtol=1e-5)


@BOTH
def test_batch_norm_freezing(saved, kind):
    layer = HubLayer(saved["batch_norm" + kind], trainable=False)
    variables = batch_norm_variables(layer)
    inputs = keras.Input((1,))
    dense = keras.layers.Dense(1, use_bias=False, kernel_initializer=keras.initializers.Constant(1.5))
    model = keras.Model(inputs, dense(layer(inputs)))
    expected = [[0.0], [1.0], [0.0], [1.0]]  # beta, gamma, mean, variance
    np.testing.assert_allclose([v.numpy() for v in variables], expected)
    model.compile(keras.optimizers.SGD(0.1), "mean_squared_error")
    x = array([[1.0], [2.0], [3.0]])
    _fit_steps(model, x, 2 * x, steps=20)
    np.testing.assert_allclose([v.numpy() for v in variables], expected)
    np.testing.assert_allclose(model(x), 2 * x, atol=1e-3)


@BOTH
def test_custom_attributes(saved, kind):
    layer = HubLayer(saved["custom_attributes" + kind])
    expected = layer.resolved_object.sample_output.numpy()
    with open(layer.resolved_object.sample_input.asset_path.numpy(), "rb") as f:
        inputs = tf.constant([[f.read()]])
    np.testing.assert_array_equal(layer(inputs), expected)


@pytest.mark.parametrize("output_shape", [None, {"sigma": (2,), "delta": (1,)}],
                         ids=["no_output_shapes", "with_output_shapes"])
def test_input_output_dict(saved, output_shape):
    layer = HubLayer(saved["dict_io"], arguments={"return_dict": True}, output_shape=output_shape)
    inputs = {"x": keras.Input((1,), name="x"), "y": keras.Input((1,), name="y")}
    outputs = layer(inputs)
    concat = keras.layers.Concatenate()([outputs["delta"], outputs["sigma"]])
    model = keras.Model(inputs, [outputs["delta"], outputs["sigma"], concat])
    delta, sigma, both = model({"x": array([[11], [22], [33]]), "y": array([[1], [2], [3]])})
    np.testing.assert_allclose(delta, [[10], [20], [30]])
    np.testing.assert_allclose(sigma, [[12, 13], [24, 26], [36, 39]])
    np.testing.assert_allclose(both, [[10, 12, 13], [20, 24, 26], [30, 36, 39]])
    clone = HubLayer.from_config(_json_cycle(layer.get_config()))
    assert clone.get_config()["output_shape"] == layer.get_config()["output_shape"]
    assert (clone.get_config()["output_shape"] is None) == (output_shape is None)


@pytest.mark.parametrize("output_shape", [None, [[1], [2, 2], [3, 3, 3]]],
                         ids=["no_output_shapes", "with_output_shapes"])
def test_output_shape_list(saved, output_shape):
    layer = HubLayer(saved["obscure_list"], output_shape=output_shape)
    model = _functional(layer)
    if output_shape:
        assert [tuple(t.shape) for t in model.outputs] == [(None, 1), (None, 2, 2), (None, 3, 3, 3)]
    single, double, triple = model(array([[1.0], [10.0]]))
    np.testing.assert_allclose(single, [[1.0], [10.0]])
    np.testing.assert_allclose(double, np.broadcast_to(array([2, 20]).reshape(2, 1, 1), (2, 2, 2)))
    np.testing.assert_allclose(triple, np.broadcast_to(array([3, 30]).reshape(2, 1, 1, 1), (2, 3, 3, 3)))
    clone = HubLayer.from_config(_json_cycle(layer.get_config()))
    assert clone.get_config()["output_shape"] == output_shape


@BOTH
def test_compute_output_shape(saved, kind):
    layer = HubLayer(saved["half_plus_one" + kind])
    assert layer.compute_output_shape((10, 1)) == (10, 1)
    layer.get_config()


@BOTH
def test_compute_output_shape_different_dtypes(saved, kind):
    layer = HubLayer(saved["text_embedding" + kind], output_shape=(2,))
    assert layer.compute_output_shape((None, 1)) == (None, 2)
    assert layer.compute_output_shape((3, 1)) == (3, 2)
    inferred = HubLayer(saved["text_embedding" + kind])  # String input dtype read from the function.
    assert inferred.compute_output_shape((3, 1)) == (3, 2)


@BOTH
def test_resave_with_mixed_precision(saved, kind, tmp_path):
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        layer = HubLayer(saved["text_embedding" + kind], trainable=True)
        model = _functional(layer, dtype="string")
        model.compile(keras.optimizers.SGD(0.002, momentum=0.001), "mean_squared_error")
        x = tf.constant([["a"], ["aa"], ["aaa"]])
        before = np.asarray(model.trainable_weights[0]).copy()
        model.fit(x, array([[1, 1], [2, 2], [3, 3]]), verbose=0)
        assert not np.array_equal(before, np.asarray(model.trainable_weights[0]))
        model.save(tmp_path / "mixed.keras")
        reloaded = keras.saving.load_model(tmp_path / "mixed.keras")
        np.testing.assert_array_equal(reloaded(x), model(x))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_compute_output_shape_without_running_the_model(saved):
    # The peer's "non-eager" case: shapes come from tracing, not from data.
    layer = HubLayer(saved["half_plus_one_tf1_hub"], output_shape=(1,))
    assert layer.compute_output_shape((None, 1)) == (None, 1)
    assert layer.compute_output_shape((3, 1)) == (3, 1)
    assert HubLayer(saved["half_plus_one_tf1_hub"]).compute_output_shape((3, 1)) == (3, 1)


@BOTH
def test_get_config_from_config(saved, kind):
    layer = HubLayer(saved["half_plus_one" + kind])
    x = array([[10.0]])
    clone = HubLayer.from_config(_json_cycle(layer.get_config()))
    np.testing.assert_array_equal(clone(x), layer(x))


def test_get_config_from_config_with_hparams(saved):
    layer = HubLayer(saved["hparams"], arguments={"a": 10.0})  # b stays 0.
    x = array([[1.0], [2.0], [3.0]])
    np.testing.assert_array_equal(layer(x), 10 * x)
    clone = HubLayer.from_config(_json_cycle(layer.get_config()))
    np.testing.assert_array_equal(clone(x), 10 * x)


@BOTH
def test_save_model_config(saved, kind):
    model = keras.Sequential([keras.Input((1,)), HubLayer(saved["half_plus_one" + kind])])
    x = array([[10.0]])
    clone = keras.models.model_from_json(model.to_json())
    np.testing.assert_array_equal(clone(x), model(x))


# ---------------------------------------------------------------- KerasLayerTest


@pytest.mark.parametrize("name", ["plus_one_tf1_hub", "plus_one"])
def test_load_with_defaults(saved, name):
    assert float(HubLayer(saved[name])(tf.constant(10.0))) == 11.0


@pytest.mark.parametrize("signature,output_key,as_dict", [
    (None, None, True), (None, None, False), ("default", None, True),
    (None, "default", False), ("default", "default", False)])
def test_load_legacy_hub_module_v1_with_signature(saved, signature, output_key, as_dict):
    layer = HubLayer(saved["plus_one_tf1_hub"], signature=signature, output_key=output_key,
                     signature_outputs_as_dict=as_dict)
    output = layer(tf.constant(10.0))
    assert ({k: float(v) for k, v in output.items()} if as_dict else float(output)) == (
        {"default": 11.0} if as_dict else 11.0)


@pytest.mark.parametrize("signature,output_key,as_dict", [
    (None, None, False), ("serving_default", None, True), ("serving_default", "output_0", False)])
def test_load_callable_saved_model_v2_with_signature(saved, signature, output_key, as_dict):
    layer = HubLayer(saved["plus_one"], signature=signature, output_key=output_key,
                     signature_outputs_as_dict=as_dict)
    output = layer(tf.constant(10.0))
    assert float(output["output_0"] if as_dict else output) == 11.0


def test_load_callable_keras_default_saved_model_v2_with_signature(saved):
    layer = HubLayer(saved["plus_one_keras_default"], signature="plus_one",
                     signature_outputs_as_dict=True)
    output = layer(tf.constant(10.0))
    assert isinstance(output, dict) and float(output["output_0"]) == 11.0


@pytest.mark.parametrize("name,signature,output_key,as_dict", [
    ("plus_one_tf1_hub", None, None, True), ("plus_one_tf1_hub", None, None, False),
    ("plus_one_tf1_hub", "default", None, True), ("plus_one_tf1_hub", None, "default", False),
    ("plus_one_tf1_hub", "default", "default", False), ("plus_one", None, None, False),
    ("plus_one", "serving_default", None, True), ("plus_one", "serving_default", "output_0", False)])
def test_keras_layer_get_config(saved, name, signature, output_key, as_dict):
    layer = HubLayer(saved[name], signature=signature, output_key=output_key,
                     signature_outputs_as_dict=as_dict)
    clone = HubLayer.from_config(_json_cycle(layer.get_config()))
    x = tf.constant(10.0)
    assert keras.tree.map_structure(float, clone(x)) == keras.tree.map_structure(float, layer(x))


def test_signature_output_taken_when_unambiguous_refused_when_not(saved, tmp_path):
    # Deliberate difference: hub.KerasLayer demands `output_key` even for one output.
    layer = HubLayer(saved["plus_one"], signature="serving_default")
    assert float(layer(tf.constant(10.0))) == 11.0

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)])
    def two_outputs(x):
        return {"plus": x + 1, "minus": x - 1}

    root = tf.train.Checkpoint()
    tf.saved_model.save(root, str(tmp_path / "two"), signatures={"serving_default": two_outputs})
    with pytest.raises(ValueError, match=r"outputs \['minus', 'plus'\]: pass `output_key="):
        HubLayer(str(tmp_path / "two"), signature="serving_default")


def test_fails_if_with_outputs_as_dict_but_no_signature(saved):
    with pytest.raises(ValueError, match="`signature_outputs_as_dict=True` returns the outputs of a"):
        HubLayer(saved["plus_one"], signature_outputs_as_dict=True)


def test_fails_if_saved_model_v2_with_tags(saved):
    with pytest.raises(ValueError, match=r"no MetaGraph with tags \['train'\]"):
        HubLayer(saved["plus_one"], tags=["train"])


def test_fails_if_setting_both_output_key_and_as_dict(saved):
    with pytest.raises(ValueError, match="either `output_key` .* not both"):
        HubLayer(saved["plus_one"], signature="serving_default", signature_outputs_as_dict=True,
                 output_key="output")


def test_fails_if_output_is_not_dict(saved):
    layer = HubLayer(saved["plus_one"], output_key="output_0")
    with pytest.raises(ValueError, match="returns a .*Tensor: leave `output_key` unset"):
        layer(tf.constant(10.0))
    with pytest.raises(ValueError, match="leave `output_key` unset"):  # in a functional model too
        _functional(HubLayer(saved["half_plus_one"], output_key="output_0"))


def test_fails_if_output_key_not_in_layer_outputs(saved):
    with pytest.raises(ValueError, match=r"`output_key` must be one of \['default'\]"):
        HubLayer(saved["plus_one_tf1_hub"], output_key="unknown")(tf.constant(10.0))


@pytest.mark.parametrize("name,signature", [("half_plus_one_tf1_hub", None),
                                            ("half_plus_one_tf1_hub", "default")])
def test_signatures_and_tf1_hub_modules_fine_tune(saved, name, signature):
    # Deliberate difference: hub.KerasLayer refuses trainable=True here; HubLayer
    # trains the variables a TF1 / signature SavedModel exposes (no update ops).
    layer = HubLayer(saved[name], trainable=True, signature=signature)
    assert len(layer.trainable_weights) == 1
    model = _functional(layer)
    model.compile(keras.optimizers.SGD(0.002), "mean_squared_error")
    x = array([[9.0], [10.0], [11.0]])
    _fit_steps(model, x, x + 1, steps=20)  # Learns y = 1 * x + 1.
    np.testing.assert_allclose(model(array([[10.0]])), [[11.0]], rtol=0.03)


def test_warns_once_if_training_zero_variables(saved):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = HubLayer(saved["hparams"], trainable=True)
        layer(array([[10.0]]))
        layer(array([[10.0]]))
    messages = [str(w.message) for w in caught if "zero trainable weights" in str(w.message)]
    assert len(messages) == 1


# ---------------------------------------------------------------- beyond the peer


@pytest.mark.filterwarnings("ignore:HubLayer is trainable but has zero trainable weights")
def test_training_passed_only_where_traced(saved):
    # `a` and `b` are hyperparameters, not `training`: inference and fit both work.
    layer = HubLayer(saved["hparams"], trainable=True, arguments={"a": 2.0, "b": 1.0})
    np.testing.assert_array_equal(layer(array([[1.0]]), training=True), [[3.0]])
    keras_default = HubLayer(saved["plus_one_keras_default"], trainable=True)
    assert float(keras_default(tf.constant(1.0), training=True)) == 2.0
    assert float(keras_default(tf.constant(1.0), training=False)) == 1.0
    keras_default.trainable = False  # A frozen layer runs in inference mode.
    assert float(keras_default(tf.constant(1.0), training=True)) == 1.0


def test_nested_layer_saves_and_reloads_as_keras(saved, tmp_path):
    layer = HubLayer(saved["dict_io"], arguments={"return_dict": True}, output_key="sigma")
    inputs = {"x": keras.Input((1,), name="x"), "y": keras.Input((1,), name="y")}
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    data = {"x": array([[1.0], [2.0]]), "y": array([[3.0], [4.0]])}
    model.save(tmp_path / "nested.keras")
    reloaded = keras.saving.load_model(tmp_path / "nested.keras")
    np.testing.assert_array_equal(reloaded(data), model(data))
    assert reloaded.layers[-2].get_config() == layer.get_config()


def test_bad_output_shape_and_arguments_are_refused(saved):
    with pytest.raises(ValueError, match="`output_shape` must be a shape"):
        HubLayer(saved["plus_one"], output_shape="2")
    layer = HubLayer(saved["hparams"], arguments={"a": tf.constant(2.0)})
    with pytest.raises(ValueError, match="`arguments` must hold JSON-serializable values"):
        layer.get_config()


@pytest.mark.parametrize("signature", [None, "default"])
def test_load_backbone_reads_the_legacy_tf1_hub_format(saved, signature):
    from tftransfer import load_backbone

    backbone = load_backbone(f"hub:{saved['half_plus_one_tf1_hub']}", signature=signature,
                             input_shape=(1,))
    np.testing.assert_allclose(backbone(array([[2.0], [4.0]])), [[2.0], [3.0]])

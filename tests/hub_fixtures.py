"""Small SavedModels in the shapes TF-Hub publishers write, for the HubLayer parity tests.

Each builder mirrors one helper of tensorflow_hub's `keras_layer_test.py`
(same function, same weights, same attributes), written with our own code:
"raw" ones save a `tf.train.Checkpoint` root holding `__call__`, `variables`,
`trainable_variables` and `regularization_losses`; "keras" ones save a tf.keras
(tf_keras) model with `tf.saved_model.save`, as Keras 2 users did; the legacy
TF1 Hub format is a TF1 SavedModel with the empty tag set, a `default`
signature and a `tfhub_module.pb` marker, as `hub.Module.export` wrote it.
"""

import os

import numpy as np
import tensorflow as tf

TF1_HUB_MODULE_DEF = b"\x08\x03"  # ModuleDef(format=FORMAT_V3), what hub.Module wrote.


def _tf_keras():
    import tf_keras  # Fixtures only: the Keras 2 way of writing SavedModels.

    return tf_keras


def _raw_root(call_fn, variables, trainable, losses=()):
    root = tf.train.Checkpoint()
    root.__call__ = call_fn
    root.variables = list(variables)
    root.trainable_variables = list(trainable)
    root.regularization_losses = [tf.function(fn, input_signature=[]) for fn in losses]
    return root


def save_half_plus_one(path, from_keras=False):
    """y = w * x + 1 with w = 0.5 trainable, an L2(0.01) penalty on w, 1 frozen."""
    k = _tf_keras()
    inputs = k.Input((1,), dtype=tf.float32)
    times_w = k.layers.Dense(1, use_bias=False, kernel_regularizer=k.regularizers.l2(0.01),
                             kernel_initializer=k.initializers.Constant([[0.5]]))
    plus_1 = k.layers.Dense(1, kernel_initializer=k.initializers.Constant([[1.0]]),
                            bias_initializer=k.initializers.Constant([1.0]), trainable=False)
    model = k.Model(inputs, plus_1(times_w(inputs)))
    if from_keras:
        tf.saved_model.save(model, path)
        return

    @tf.function(input_signature=[tf.TensorSpec((None, 1), tf.float32)])
    def call_fn(x):
        return model(x, training=False)

    variables = model.trainable_variables + model.non_trainable_variables
    root = _raw_root(call_fn, variables, [times_w.kernel], [lambda: model.losses[0]])
    tf.saved_model.save(root, path)


def save_batch_norm(path, from_keras=False):
    """One BatchNormalization(momentum=0.8), traced for training True and False."""
    k = _tf_keras()
    inputs = k.Input((1,), dtype=tf.float32)
    bn = k.layers.BatchNormalization(momentum=0.8)
    model = k.Model(inputs, bn(inputs))
    if from_keras:
        tf.saved_model.save(model, path)
        return

    @tf.function
    def call_fn(x, training=False):
        return model(x, training=training)

    for training in (True, False):
        call_fn.get_concrete_function(tf.TensorSpec((None, 1), tf.float32), training=training)
    variables = [bn.beta, bn.gamma, bn.moving_mean, bn.moving_variance]
    tf.saved_model.save(_raw_root(call_fn, variables, [bn.beta, bn.gamma]), path)


def batch_norm_variables(layer):
    """beta, gamma, moving_mean, moving_variance of a loaded batch-norm model."""
    variables = sorted(layer.resolved_object.variables, key=lambda v: v.name)
    suffixes = ("beta", "gamma", "moving_mean", "moving_variance")
    assert [v.name.split(":")[0].endswith(s) for v, s in zip(variables, suffixes)] == [True] * 4
    return variables


def save_with_hparams(path):
    """y = a * x + b, with hyperparameters a=1, b=0 and no variables."""
    @tf.function(input_signature=[tf.TensorSpec((None, 1), tf.float32),
                                  tf.TensorSpec((), tf.float32), tf.TensorSpec((), tf.float32)])
    def call_fn(x, a=1.0, b=0.0):
        return a * x + b

    root = tf.train.Checkpoint()
    root.__call__ = call_fn
    tf.saved_model.save(root, path)


def save_custom_attributes(path, scratch, from_keras=False):
    """Parses a string to int64; carries an Asset and a Variable as attributes."""
    def parse(text):
        return tf.strings.to_number(text, tf.int64)

    if from_keras:
        k = _tf_keras()
        inputs = k.Input((1,), dtype=tf.string)
        root = k.Model(inputs, k.layers.Lambda(parse)(inputs))
    else:
        root = tf.train.Checkpoint()
        root.__call__ = tf.function(parse, input_signature=[tf.TensorSpec((None, 1), tf.string)])
    os.makedirs(scratch, exist_ok=True)
    source = os.path.join(scratch, "number.txt")
    with open(source, "w") as f:
        f.write("12345\n")
    root.sample_input = tf.saved_model.Asset(source)
    root.sample_output = tf.Variable([[12345]], dtype=tf.int64)
    tf.saved_model.save(root, path)
    os.remove(source)  # The SavedModel must carry its own copy.


def save_dict_input_output(path):
    """Takes {x, y}; returns x+y, x+2y concatenated, or a dict with `delta` too."""
    @tf.function
    def call_fn(d, return_dict=False):
        sigma = tf.concat([d["x"] + d["y"], d["x"] + 2 * d["y"]], axis=-1)
        return {"sigma": sigma, "delta": d["x"] - d["y"]} if return_dict else sigma

    spec = {"x": tf.TensorSpec((None, 1), tf.float32), "y": tf.TensorSpec((None, 1), tf.float32)}
    for return_dict in (False, True):
        call_fn.get_concrete_function(spec, return_dict=return_dict)
    root = tf.train.Checkpoint()
    root.__call__ = call_fn
    tf.saved_model.save(root, path)


def save_obscure_list_output(path):
    """Returns [x, 2x, 3x] broadcast to (1,), (2, 2), (3, 3, 3): shapes hidden from tracing."""
    def broadcast_obscurely(x, shape):
        noise = 0.1 * tf.sin(tf.random.uniform((), -3, 3)) + 0.3
        return tf.broadcast_to(x, tf.cast(tf.cast(shape, tf.float32) + noise, tf.int32))

    @tf.function(input_signature=[tf.TensorSpec((None, 1), tf.float32)])
    def call_fn(x):
        batch = tf.shape(x)[0]
        return [broadcast_obscurely(tf.reshape(i * x, [batch] + [1] * i),
                                    tf.concat([[batch], [i] * i], axis=0)) for i in (1, 2, 3)]

    root = tf.train.Checkpoint()
    root.__call__ = call_fn
    tf.saved_model.save(root, path)


def save_plus_one(path):
    """x + 1 for any shape, as `__call__` (and the `serving_default` signature)."""
    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)])
    def plus_one(x):
        return x + 1

    root = tf.train.Checkpoint()
    root.__call__ = plus_one
    tf.saved_model.save(root, path)


def save_plus_one_keras_default(path):
    """`__call__(x, training)` adds 1 only in training; signature `plus_one` always does."""
    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)])
    def plus_one(x):
        return x + 1

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32), tf.TensorSpec((), tf.bool)])
    def keras_default(x, training=False):
        return tf.cond(training, lambda: x + 1, lambda: x)

    root = tf.train.Checkpoint()
    root.__call__ = keras_default
    root.plus_one = plus_one
    tf.saved_model.save(root, path, signatures={"plus_one": plus_one})


def save_tf1_hub_module(path, half_plus_one=False):
    """Legacy TF1 Hub format: `default` signature, empty tags, tfhub_module.pb.

    `half_plus_one=False` gives y = x + 1 (no variables, any shape);
    `True` gives y = w * x + 1 with a trainable resource variable w = 0.5.
    """
    graph = tf.Graph()
    with graph.as_default():
        shape = (None, 1) if half_plus_one else None
        x = tf.compat.v1.placeholder(tf.float32, shape, name="x")
        if half_plus_one:
            w = tf.compat.v1.get_variable("w", initializer=[[0.5]], use_resource=True)
            y = tf.matmul(x, w) + 1.0
        else:
            y = x + 1.0
        signature = tf.compat.v1.saved_model.predict_signature_def({"default": x}, {"default": y})
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(path)
            builder.add_meta_graph_and_variables(session, [], signature_def_map={"default": signature})
            builder.save()
    with open(os.path.join(path, "tfhub_module.pb"), "wb") as f:
        f.write(TF1_HUB_MODULE_DEF)


def save_text_embedding(path, from_keras=False):
    """y = len(text) * [0.1, 0.3], w trainable with an L2(0.01) penalty."""
    k = _tf_keras()

    class StringLength(k.layers.Layer):
        def call(self, inputs):
            return tf.strings.length(inputs)

    inputs = k.Input((1,), dtype=tf.string)
    times_w = k.layers.Dense(2, use_bias=False, kernel_regularizer=k.regularizers.l2(0.01),
                             kernel_initializer=k.initializers.Constant([0.1, 0.3]))
    model = k.Model(inputs, times_w(StringLength()(inputs)))
    if from_keras:
        tf.saved_model.save(model, path)
        return

    @tf.function(input_signature=[tf.TensorSpec((None, 1), tf.string)])
    def call_fn(x):
        return model(x, training=False)

    root = _raw_root(call_fn, model.variables, [times_w.kernel], [lambda: model.losses[0]])
    tf.saved_model.save(root, path)


BUILDERS = {
    "half_plus_one": save_half_plus_one,
    "half_plus_one_keras": lambda p: save_half_plus_one(p, from_keras=True),
    "batch_norm": save_batch_norm,
    "batch_norm_keras": lambda p: save_batch_norm(p, from_keras=True),
    "hparams": save_with_hparams,
    "custom_attributes": lambda p: save_custom_attributes(p, p + "_scratch"),
    "custom_attributes_keras": lambda p: save_custom_attributes(p, p + "_scratch", True),
    "dict_io": save_dict_input_output,
    "obscure_list": save_obscure_list_output,
    "plus_one": save_plus_one,
    "plus_one_keras_default": save_plus_one_keras_default,
    "plus_one_tf1_hub": save_tf1_hub_module,
    "half_plus_one_tf1_hub": lambda p: save_tf1_hub_module(p, half_plus_one=True),
    "text_embedding": save_text_embedding,
    "text_embedding_keras": lambda p: save_text_embedding(p, from_keras=True),
}


class SavedModels:
    """Builds each fixture SavedModel once, on first use, under `root`."""

    def __init__(self, root):
        self.root = root
        self.built = {}

    def __getitem__(self, name):
        if name not in self.built:
            path = os.path.join(self.root, name)
            BUILDERS[name](path)
            self.built[name] = path
        return self.built[name]


def array(values):
    return np.array(values, dtype=np.float32)

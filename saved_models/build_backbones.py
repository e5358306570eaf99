"""Pretrains a small digits CNN and saves its feature extractor in every format.

Source task: scikit-learn digits, classes 0-4, 32x32x3 float images in 0-255
(`tftransfer.datasets.load_digits_images`). The trained feature extractor
(image -> 64-d features) is written in the formats users bring to
`tftransfer`:

    digits_cnn.keras         Keras 3 native `.keras` archive
    digits_cnn.h5            Keras 3 `model.save("...h5")` (legacy HDF5)
    digits_cnn_export/       Keras 3 `model.export()` (TF SavedModel, `serve`)
    digits_cnn_hub/          TF2 "Reusable SavedModel" (TF-Hub style)
    digits_cnn_tf1/          TF1 SavedModel with signatures only
    digits_cnn_tfkeras/      tf_keras (Keras 2) SavedModel (keras_metadata.pb)
    digits_cnn_tfkeras.h5    tf_keras (Keras 2) HDF5
    digits_cnn_tf20/         tf.keras SavedModel as TF 2.0-2.4 wrote it (Keras
                             metadata in the object graph, no keras_metadata.pb)
    digits_mlp_hw.keras      Keras 3 MLP on (8, 8) images, no channel axis

Every artifact is checked against the Keras model (max abs feature difference
<= 1e-4 on 16 images, each loaded with its native loader) before it is moved
into place, and `MANIFEST.json` records what was built.

The last two ("extras") derive from the committed `digits_cnn.keras` (the
TF 2.0 artifact) or train in seconds (the MLP), so they can be added without
rebuilding the others: `--extras-only`.

Usage:
    python saved_models/build_backbones.py [--overwrite] [--out-dir DIR] [--extras-only]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

try:
    from tftransfer.datasets import load_digits_images
except ImportError:  # Running from a checkout without installing the package.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tftransfer.datasets import load_digits_images

SEED = 0
SOURCE_CLASSES = (0, 1, 2, 3, 4)
INPUT_SHAPE = (32, 32, 3)
FEATURE_DIM = 64
FILTERS = (16, 32, 64)
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
TOLERANCE = 1e-4
EPOCHS = 20
BATCH_SIZE = 16
TF1_SIGNATURE = "image_feature_vector"
REBUILD_COMMAND = "python saved_models/build_backbones.py --overwrite"

ARTIFACTS = {
    "digits_cnn.keras": "Keras 3 native .keras archive (keras.saving.save_model)",
    "digits_cnn.h5": "Keras 3 legacy HDF5 (model.save('digits_cnn.h5'))",
    "digits_cnn_export": "Keras 3 model.export() TF SavedModel, endpoint 'serve'",
    "digits_cnn_hub": "TF2 Reusable SavedModel (TF-Hub style, tf.Module)",
    "digits_cnn_tf1": "TF1 SavedModel, signature-only ('image_feature_vector')",
    "digits_cnn_tfkeras": "tf_keras (Keras 2) SavedModel, Sequential without Input",
    "digits_cnn_tfkeras.h5": "tf_keras (Keras 2) HDF5, Sequential without Input",
}
MANIFEST = "MANIFEST.json"


# --------------------------------------------------------------------------
# Keras 3 model and pretraining.
# --------------------------------------------------------------------------


def build_digits_cnn():
    """Returns the untrained Keras 3 feature extractor (image -> 64-d)."""
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    for i, filters in enumerate(FILTERS, start=1):
        x = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=False, name=f"conv{i}"
        )(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        if i < len(FILTERS):
            x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    outputs = keras.layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def load_source_split():
    """Returns the stratified 80/20 split of the source task (digits 0-4)."""
    from sklearn.model_selection import train_test_split

    x, y = load_digits_images(classes=SOURCE_CLASSES, image_size=32, channels=3)
    return train_test_split(x, y, test_size=0.2, stratify=y, random_state=SEED)


def pretrain(epochs=EPOCHS):
    """Trains the CNN plus a softmax head on digits 0-4.

    Returns:
        `(feature_extractor, held_out_accuracy, x_held_out)`.
    """
    keras.utils.set_random_seed(SEED)
    x_train, x_test, y_train, y_test = load_source_split()
    extractor = build_digits_cnn()
    head = keras.layers.Dense(
        len(SOURCE_CLASSES), activation="softmax", name="source_head"
    )
    model = keras.Model(extractor.input, head(extractor.output), name="source")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=epochs, verbose=2)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    return extractor, float(accuracy), x_test


def named_weights(extractor):
    """Returns `{name: np.ndarray}` of the extractor's weights (tf.nn layout)."""
    params = {}
    for i in range(1, len(FILTERS) + 1):
        params[f"conv{i}/kernel"] = extractor.get_layer(f"conv{i}").get_weights()[0]
        gamma, beta, mean, var = extractor.get_layer(f"bn{i}").get_weights()
        params[f"bn{i}/gamma"], params[f"bn{i}/beta"] = gamma, beta
        params[f"bn{i}/moving_mean"], params[f"bn{i}/moving_variance"] = mean, var
    return params


def is_trainable(name):
    """Moving statistics are non-trainable, like in Keras."""
    return "moving" not in name


# --------------------------------------------------------------------------
# Plain TensorFlow forward pass shared by the hub and TF1 artifacts.
# --------------------------------------------------------------------------


def _batch_norm(x, params, scope, training):
    """Batch normalization; in training, uses and records batch statistics."""
    mean, variance = params[f"{scope}/moving_mean"], params[f"{scope}/moving_variance"]
    if training:
        batch_mean, batch_var = tf.nn.moments(x, axes=[0, 1, 2])
        mean.assign(mean * BN_MOMENTUM + batch_mean * (1.0 - BN_MOMENTUM))
        variance.assign(variance * BN_MOMENTUM + batch_var * (1.0 - BN_MOMENTUM))
        mean, variance = batch_mean, batch_var
    return tf.nn.batch_normalization(
        x, mean, variance, params[f"{scope}/beta"], params[f"{scope}/gamma"],
        BN_EPSILON,
    )


def tf_forward(images, params, training=False):
    """The digits CNN with tf.nn ops: images in 0-255 -> `[batch, 64]`."""
    x = images * (1.0 / 255)
    for i in range(1, len(FILTERS) + 1):
        x = tf.nn.conv2d(x, params[f"conv{i}/kernel"], strides=1, padding="SAME")
        x = tf.nn.relu(_batch_norm(x, params, f"bn{i}", training))
        if i < len(FILTERS):
            x = tf.nn.max_pool2d(x, ksize=2, strides=2, padding="VALID")
    return tf.reduce_mean(x, axis=[1, 2])


# --------------------------------------------------------------------------
# Writers, one per format.
# --------------------------------------------------------------------------


def save_keras3(extractor, out_dir):
    """Writes `digits_cnn.keras`, `digits_cnn.h5` and `digits_cnn_export/`."""
    extractor.save(os.path.join(out_dir, "digits_cnn.keras"))
    extractor.save(os.path.join(out_dir, "digits_cnn.h5"))
    extractor.export(os.path.join(out_dir, "digits_cnn_export"), verbose=False)


class DigitsHubModule(tf.Module):
    """TF-Hub style Reusable SavedModel of the digits CNN.

    After `tf.saved_model.load`, the object is callable as
    `obj(images, training=False|True)` and has `.variables`,
    `.trainable_variables` and `.regularization_losses` (saved attributes:
    the class-level `None`s shadow the `tf.Module` properties so the lists
    can be assigned and saved).
    """

    variables = None
    trainable_variables = None

    def __init__(self, weights):
        super().__init__(name="digits_cnn")
        self.params = {
            name: tf.Variable(value, trainable=is_trainable(name), name=name)
            for name, value in weights.items()
        }
        ordered = [self.params[name] for name in weights]
        self.variables = ordered
        self.trainable_variables = [v for v in ordered if v.trainable]
        self.regularization_losses = []

    @tf.function
    def __call__(self, images, training=False):
        """Maps `[batch, 32, 32, 3]` images in 0-255 to `[batch, 64]`."""
        return tf_forward(images, self.params, training=training)


def save_hub(weights, path):
    """Writes the TF2 Reusable SavedModel, traced for both training values."""
    module = DigitsHubModule(weights)
    spec = tf.TensorSpec([None, *INPUT_SHAPE], tf.float32)
    for training in (False, True):
        module.__call__.get_concrete_function(spec, training=training)
    tf.saved_model.save(module, path)


def save_tf1(weights, path, use_resource=True):
    """Writes a TF1 graph-mode SavedModel exposing only a signature.

    Args:
        weights: `{name: array}` from `named_weights`.
        path: Output directory.
        use_resource: True (the committed artifact; what `tf.compat.v1` makes
            under TF2) gives resource variables, reachable after loading as
            `loaded.signatures[...].variables`. False gives the reference
            variables of TensorFlow 1.x exports, which TF2 loads as graph
            internals without Python `tf.Variable` objects (not fine-tunable).
    """
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, [None, *INPUT_SHAPE], "images")
        params = {
            name: tf.compat.v1.get_variable(
                name, shape=value.shape, trainable=is_trainable(name),
                initializer=tf.compat.v1.zeros_initializer(),
                use_resource=use_resource,
            )
            for name, value in weights.items()
        }
        features = tf.identity(tf_forward(images, params), name="feature_vector")
        signature = tf.compat.v1.saved_model.predict_signature_def(
            inputs={"images": images},
            outputs={"feature_vector": features, "default": features},
        )
        with tf.compat.v1.Session(graph=graph) as sess:
            for name, variable in params.items():  # Keeps values out of the graph.
                sess.run(variable.initializer, {variable.initial_value: weights[name]})
            builder = tf.compat.v1.saved_model.Builder(path)
            builder.add_meta_graph_and_variables(
                sess, ["serve"], signature_def_map={TF1_SIGNATURE: signature}
            )
            builder.save()


def build_tf_keras(extractor):
    """Returns a tf_keras Sequential copy (no Input layer) of the extractor."""
    import tf_keras

    layers = [tf_keras.layers.Rescaling(1.0 / 255, name="rescale")]
    for i, filters in enumerate(FILTERS, start=1):
        layers += [
            tf_keras.layers.Conv2D(
                filters, 3, padding="same", use_bias=False, name=f"conv{i}"
            ),
            tf_keras.layers.BatchNormalization(name=f"bn{i}"),
            tf_keras.layers.ReLU(name=f"relu{i}"),
        ]
        if i < len(FILTERS):
            layers.append(tf_keras.layers.MaxPooling2D(name=f"pool{i}"))
    layers.append(tf_keras.layers.GlobalAveragePooling2D(name="features"))
    model = tf_keras.Sequential(layers, name="digits_cnn")
    model.build((None, *INPUT_SHAPE))
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(extractor.get_layer(layer.name).get_weights())
    return model


def save_tf_keras(extractor, out_dir):
    """Writes `digits_cnn_tfkeras/` (Keras 2 SavedModel) and the `.h5`."""
    model = build_tf_keras(extractor)
    model.save(os.path.join(out_dir, "digits_cnn_tfkeras"), save_format="tf")
    model.save(os.path.join(out_dir, "digits_cnn_tfkeras.h5"), save_format="h5")


# --------------------------------------------------------------------------
# Native loaders and checks.
# --------------------------------------------------------------------------


def _features_keras3(path, x):
    return keras.models.load_model(path).predict(x, verbose=0)


def _features_export(path, x):
    loaded = tf.saved_model.load(path)  # Keep a reference: owns the variables.
    return loaded.serve(tf.constant(x)).numpy()


def _features_hub(path, x):
    loaded = tf.saved_model.load(path)
    return loaded(tf.constant(x), training=False).numpy()


def _features_tf1(path, x):
    loaded = tf.saved_model.load(path, tags=["serve"])
    outputs = loaded.signatures[TF1_SIGNATURE](images=tf.constant(x))
    np.testing.assert_array_equal(outputs["default"], outputs["feature_vector"])
    return outputs["feature_vector"].numpy()


def _features_tf_keras(path, x):
    import tf_keras

    return tf_keras.models.load_model(path).predict(x, verbose=0)


NATIVE_LOADERS = {
    "digits_cnn.keras": ("keras.models.load_model", _features_keras3),
    "digits_cnn.h5": ("keras.models.load_model", _features_keras3),
    "digits_cnn_export": ("tf.saved_model.load(...).serve", _features_export),
    "digits_cnn_hub": ("tf.saved_model.load(...)(x, training=False)", _features_hub),
    "digits_cnn_tf1": ("tf.saved_model.load(...).signatures", _features_tf1),
    "digits_cnn_tfkeras": ("tf_keras.models.load_model", _features_tf_keras),
    "digits_cnn_tfkeras.h5": ("tf_keras.models.load_model", _features_tf_keras),
}


def check_parity(out_dir, reference, x):
    """Returns `{artifact: max abs diff}`; raises if any exceeds TOLERANCE."""
    diffs = {}
    for name, (_, load_features) in NATIVE_LOADERS.items():
        features = load_features(os.path.join(out_dir, name), x)
        diffs[name] = float(np.max(np.abs(features - reference)))
    bad = {k: v for k, v in diffs.items() if not v <= TOLERANCE}
    if bad:
        raise RuntimeError(f"Artifacts differ from the Keras model: {bad}")
    return diffs


def check_hub_reusable(path, x):
    """Checks the Reusable SavedModel API, gradients and BN updates."""
    obj = tf.saved_model.load(path)
    assert all(isinstance(v, tf.Variable) for v in obj.variables)
    assert all(isinstance(v, tf.Variable) for v in obj.trainable_variables)
    assert len(obj.trainable_variables) == 9 and len(obj.variables) == 15
    assert list(obj.regularization_losses) == []
    moving = [v for v in obj.variables if not v.trainable]
    before = [v.numpy().copy() for v in moving]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(obj(tf.constant(x), training=True) ** 2)
    grads = tape.gradient(loss, obj.trainable_variables)
    assert all(g is not None and np.any(g.numpy() != 0) for g in grads)
    assert all(np.any(b != v.numpy()) for b, v in zip(before, moving))


def check_tf1_fine_tunable(path, x):
    """Checks that the TF1 signature exposes its variables and gradients."""
    loaded = tf.saved_model.load(path, tags=["serve"])
    signature = loaded.signatures[TF1_SIGNATURE]
    assert len(signature.variables) == 15 and len(loaded.variables) == 15
    assert len(signature.trainable_variables) == 9
    with tf.GradientTape() as tape:
        features = signature(images=tf.constant(x))["feature_vector"]
        loss = tf.reduce_sum(features**2)
    grads = tape.gradient(loss, signature.trainable_variables)
    assert all(g is not None and np.any(g.numpy() != 0) for g in grads)


# --------------------------------------------------------------------------
# Output handling.
# --------------------------------------------------------------------------


def path_size(path):
    """Returns the size in bytes of a file or of all files under a directory."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(root, f))
        for root, _, files in os.walk(path)
        for f in files
    )


def existing_outputs(out_dir, extras_only=False):
    """Returns the artifacts (and manifest) already present in `out_dir`."""
    names = list(EXTRA_ARTIFACTS) if extras_only else [*ARTIFACTS, *EXTRA_ARTIFACTS, MANIFEST]
    return [n for n in names if os.path.lexists(os.path.join(out_dir, n))]


def move_into_place(tmp_dir, out_dir):
    """Moves every built output from `tmp_dir` to `out_dir`, replacing old ones."""
    for name in [*ARTIFACTS, MANIFEST]:
        target = os.path.join(out_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        elif os.path.lexists(target):
            os.remove(target)
        shutil.move(os.path.join(tmp_dir, name), target)


def build_manifest(tmp_dir, accuracy, diffs):
    """Returns the MANIFEST.json content."""
    import sklearn
    import tf_keras

    files = {
        name: {
            "format": ARTIFACTS[name],
            "type": "dir" if os.path.isdir(os.path.join(tmp_dir, name)) else "file",
            "size_bytes": path_size(os.path.join(tmp_dir, name)),
            "native_loader": NATIVE_LOADERS[name][0],
            "max_abs_feature_diff": diffs[name],
        }
        for name in ARTIFACTS
    }
    return {
        "model": "digits_cnn feature extractor (3x conv-bn-relu, global avg pool)",
        "files": files,
        "source_task": {
            "dataset": "sklearn.datasets.load_digits via "
            "tftransfer.datasets.load_digits_images",
            "classes": list(SOURCE_CLASSES),
            "held_out_fraction": 0.2,
            "held_out_accuracy": accuracy,
            "epochs": EPOCHS,
            "batch_size": BATCH_SIZE,
        },
        "feature_dim": FEATURE_DIM,
        "input_shape": list(INPUT_SHAPE),
        "input_dtype": "float32",
        "input_range": [0.0, 255.0],
        "tf1_signature": {
            "name": TF1_SIGNATURE, "tags": ["serve"], "inputs": ["images"],
            "outputs": ["feature_vector", "default"],
        },
        "parity_tolerance": TOLERANCE,
        "seed": SEED,
        "rebuild_command": REBUILD_COMMAND,
        "versions": {
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "tf_keras": tf_keras.__version__, "scikit-learn": sklearn.__version__,
        },
    }


def print_table(tmp_dir, out_dir, diffs):
    """Prints format, path, size and parity of every artifact."""
    print(f"\n{'format':<56} {'path':<40} {'KB':>7} {'max abs diff':>13}")
    for name, description in ARTIFACTS.items():
        size_kb = path_size(os.path.join(tmp_dir, name)) / 1024
        path = os.path.join(os.path.basename(out_dir), name)
        print(f"{description:<56} {path:<40} {size_kb:7.1f} {diffs[name]:13.2e}")


def build_all(out_dir):
    """Pretrains, writes and checks every artifact, then moves them in place."""
    tf.config.experimental.enable_op_determinism()
    extractor, accuracy, x_test = pretrain()
    print(f"Source (digits 0-4) held-out accuracy: {accuracy:.4f}")
    x = x_test[:16]
    reference = extractor.predict(x, verbose=0)
    weights = named_weights(extractor)
    with tempfile.TemporaryDirectory(prefix="build_backbones_") as tmp_dir:
        save_keras3(extractor, tmp_dir)
        save_hub(weights, os.path.join(tmp_dir, "digits_cnn_hub"))
        save_tf1(weights, os.path.join(tmp_dir, "digits_cnn_tf1"))
        save_tf_keras(extractor, tmp_dir)
        diffs = check_parity(tmp_dir, reference, x)
        check_hub_reusable(os.path.join(tmp_dir, "digits_cnn_hub"), x)
        check_tf1_fine_tunable(os.path.join(tmp_dir, "digits_cnn_tf1"), x)
        manifest = build_manifest(tmp_dir, accuracy, diffs)
        with open(os.path.join(tmp_dir, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        print_table(tmp_dir, out_dir, diffs)
        move_into_place(tmp_dir, out_dir)
    print(f"\nWrote {len(ARTIFACTS)} artifacts and {MANIFEST} to {out_dir}")


# --------------------------------------------------------------------------
# Extras: formats added later, built without retraining the CNN.
# --------------------------------------------------------------------------

TF20_DIR = "digits_cnn_tf20"
MLP_FILE = "digits_mlp_hw.keras"
MLP_INPUT_SHAPE = (8, 8)
MLP_FEATURE_DIM = 16
MLP_EPOCHS = 40
TF_KERAS_IDENTIFIERS = ("_tf_keras_sequential", "_tf_keras_model", "_tf_keras_network")
EXTRA_ARTIFACTS = {
    TF20_DIR: "tf.keras SavedModel as TF 2.0-2.4 wrote it (metadata in the object graph)",
    MLP_FILE: "Keras 3 MLP on (8, 8) images without a channel axis (Flatten input)",
}


def move_keras_metadata_into_object_graph(path):
    """Rewrites a tf.keras SavedModel the way TF 2.0-2.4 wrote it.

    From TF 2.5, tf.keras writes each object's Keras metadata (the JSON
    config) to `keras_metadata.pb`; before, it lived in the object graph of
    `saved_model.pb`, in `user_object.metadata`. This moves it back, deletes
    `keras_metadata.pb`, and deletes `fingerprint.pb` (added in TF 2.12, and
    a checksum of the old `saved_model.pb`).
    """
    from tensorflow.core.protobuf import saved_model_pb2
    from tf_keras.protobuf import saved_metadata_pb2

    pb_path = os.path.join(path, "saved_model.pb")
    saved_model = saved_model_pb2.SavedModel()
    with open(pb_path, "rb") as f:
        saved_model.ParseFromString(f.read())
    metadata = saved_metadata_pb2.SavedMetadata()
    with open(os.path.join(path, "keras_metadata.pb"), "rb") as f:
        metadata.ParseFromString(f.read())
    nodes = saved_model.meta_graphs[0].object_graph_def.nodes
    for node in metadata.nodes:
        user_object = nodes[node.node_id].user_object
        assert user_object.identifier == node.identifier, (node.node_path, node.identifier)
        user_object.metadata = node.metadata
    assert nodes[0].user_object.identifier in TF_KERAS_IDENTIFIERS
    with open(pb_path, "wb") as f:
        f.write(saved_model.SerializeToString())
    os.remove(os.path.join(path, "keras_metadata.pb"))
    os.remove(os.path.join(path, "fingerprint.pb"))


def save_tf20_keras(extractor, path):
    """Writes `digits_cnn_tf20/`: the tf_keras Sequential, TF 2.0-2.4 layout."""
    build_tf_keras(extractor).save(path, save_format="tf")
    move_keras_metadata_into_object_graph(path)


def check_tf20(path, extractor, x):
    """tf_keras still reads it, with its layers, and matches the Keras model."""
    import tf_keras

    assert not os.path.exists(os.path.join(path, "keras_metadata.pb"))
    legacy = tf_keras.models.load_model(path)
    names = [layer.name for layer in legacy.layers]
    assert names == [layer.name for layer in extractor.layers[1:]], names
    diff = float(np.max(np.abs(legacy.predict(x, verbose=0) - extractor.predict(x, verbose=0))))
    assert diff <= TOLERANCE, diff
    return diff


def build_digits_mlp():
    """An MNIST-style MLP on `(8, 8)` images: no channel axis, Flatten input."""
    inputs = keras.Input(MLP_INPUT_SHAPE, name="image")
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(32, activation="relu", name="dense1")(x)
    outputs = keras.layers.Dense(MLP_FEATURE_DIM, activation="relu", name="features")(x)
    return keras.Model(inputs, outputs, name="digits_mlp")


def pretrain_mlp(epochs=MLP_EPOCHS):
    """Trains the MLP with a softmax head on digits 0-4 (8x8, gray, no channel axis).

    Returns:
        `(feature_extractor, held_out_accuracy, x_held_out)`.
    """
    from sklearn.model_selection import train_test_split

    keras.utils.set_random_seed(SEED)
    x, y = load_digits_images(classes=SOURCE_CLASSES, image_size=8, channels=1)
    x_train, x_test, y_train, y_test = train_test_split(
        x[..., 0], y, test_size=0.2, stratify=y, random_state=SEED)
    extractor = build_digits_mlp()
    head = keras.layers.Dense(len(SOURCE_CLASSES), activation="softmax", name="source_head")
    model = keras.Model(extractor.input, head(extractor.output), name="source_mlp")
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    return extractor, float(accuracy), x_test


def _extra_entry(tmp_dir, name, loader, diff):
    return {
        "format": EXTRA_ARTIFACTS[name],
        "type": "dir" if os.path.isdir(os.path.join(tmp_dir, name)) else "file",
        "size_bytes": path_size(os.path.join(tmp_dir, name)),
        "native_loader": loader,
        "max_abs_feature_diff": diff,
    }


def update_manifest(out_dir, entries, mlp_accuracy):
    """Adds the extras to MANIFEST.json, leaving every other entry as it is."""
    path = os.path.join(out_dir, MANIFEST)
    manifest = {"files": {}}
    if os.path.exists(path):
        with open(path) as f:
            manifest = json.load(f)
    manifest["files"].update(entries)
    manifest["mlp_hw"] = {
        "input_shape": list(MLP_INPUT_SHAPE), "feature_dim": MLP_FEATURE_DIM,
        "source_classes": list(SOURCE_CLASSES), "held_out_accuracy": mlp_accuracy,
        "epochs": MLP_EPOCHS, "rebuild_command": REBUILD_COMMAND + " --extras-only",
    }
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


def build_extras(out_dir):
    """Writes and checks the extras from `out_dir/digits_cnn.keras`, then moves them in."""
    tf.config.experimental.enable_op_determinism()
    extractor = keras.saving.load_model(os.path.join(out_dir, "digits_cnn.keras"))
    x = load_source_split()[1][:16]
    with tempfile.TemporaryDirectory(prefix="build_extras_") as tmp_dir:
        save_tf20_keras(extractor, os.path.join(tmp_dir, TF20_DIR))
        tf20_diff = check_tf20(os.path.join(tmp_dir, TF20_DIR), extractor, x)
        mlp, accuracy, x_mlp = pretrain_mlp()
        print(f"MLP (digits 0-4, 8x8, no channel axis) held-out accuracy: {accuracy:.4f}")
        mlp.save(os.path.join(tmp_dir, MLP_FILE))
        mlp_diff = float(np.max(np.abs(
            _features_keras3(os.path.join(tmp_dir, MLP_FILE), x_mlp) - mlp.predict(x_mlp, verbose=0))))
        assert mlp_diff <= TOLERANCE, mlp_diff
        entries = {
            TF20_DIR: _extra_entry(tmp_dir, TF20_DIR, "tf_keras.models.load_model", tf20_diff),
            MLP_FILE: _extra_entry(tmp_dir, MLP_FILE, "keras.models.load_model", mlp_diff),
        }
        for name in EXTRA_ARTIFACTS:
            target = os.path.join(out_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):
                os.remove(target)
            shutil.move(os.path.join(tmp_dir, name), target)
    update_manifest(out_dir, entries, accuracy)
    print(f"Wrote {', '.join(EXTRA_ARTIFACTS)} to {out_dir}")


def parse_args(argv=None):
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace existing artifacts."
    )
    parser.add_argument(
        "--out-dir",
        default=os.path.dirname(os.path.abspath(__file__)),
        help="Where to write the artifacts (default: next to this script).",
    )
    parser.add_argument(
        "--with-gan", action="store_true",
        help="also pretrain the digits GAN (saved_models/build_gan.py, about 3 minutes)",
    )
    parser.add_argument(
        "--extras-only", action="store_true",
        help=f"build only {', '.join(EXTRA_ARTIFACTS)} (from the committed digits_cnn.keras)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    """Command line entry point."""
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    existing = existing_outputs(args.out_dir, extras_only=args.extras_only)
    if existing and not args.overwrite:
        sys.exit(
            f"Refusing to overwrite existing artifacts in {args.out_dir}: "
            f"{', '.join(existing)}. Rerun with --overwrite to replace them."
        )
    if not args.extras_only:
        build_all(args.out_dir)
    build_extras(args.out_dir)
    if args.with_gan:  # the GAN's discriminator starts from the backbone just built
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import build_gan

        build_gan.main(["--out-dir", args.out_dir] + (["--overwrite"] if args.overwrite else []))


if __name__ == "__main__":
    main()

"""GAN fine-tuning: pretrained backbones as discriminators (FreezeD), generative augmentation.

* `build_generator` makes a DCGAN-style generator (optionally class-conditional)
  whose images are in the 0-255 range every tftransfer backbone takes.
* `discriminator_from_backbone` turns any `load_backbone` source into a
  discriminator: backbone -> `Dense(1)` real/fake logit, plus a projection term
  `<embed(y), features>` when conditional. The freezing policies of
  `tftransfer.freezing` apply: `trainable="top:1"` is FreezeD (Mo et al., 2020).
* `GAN` is a `keras.Model` whose `train_step` trains both with two optimizers,
  so `fit`, callbacks and distribution strategies work, and keeps an EMA copy
  of the generator for sampling.

Example:

>>> generator = build_generator((32, 32, 3), latent_dim=64, num_classes=5)
>>> discriminator = discriminator_from_backbone(
...     "saved_models/digits_cnn.keras", trainable="top:1", num_classes=5)
>>> gan = GAN(generator, discriminator)
>>> gan.compile(loss="hinge")
>>> gan.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=10)
>>> images = gan.generate(labels=[0, 1, 2, 3, 4])
"""

import math

import keras
import numpy as np
import tensorflow as tf

from tftransfer import freezing
from tftransfer.backbones import APPLICATIONS, load_backbone
from tftransfer.layers import ImagePreprocessing

LOSSES = ("non_saturating", "hinge")
_R1_SCALE = 127.5  # R1 is taken w.r.t. images in [-1, 1], so the usual gammas apply.


def _check_image_shape(image_shape):
    shape = tuple(int(d) for d in image_shape)
    ok = len(shape) == 3 and shape[0] == shape[1] and shape[0] >= 8 and shape[2] >= 1
    if not ok or 2 ** round(math.log2(shape[0] / 4)) != shape[0] / 4:
        raise ValueError(
            "`image_shape` must be (S, S, C) with S = 4 * 2**k >= 8 (8, 16, 32, 64, ...). "
            f"Received: image_shape={image_shape!r}"
        )
    return shape


def build_generator(image_shape=(32, 32, 3), latent_dim=64, num_classes=None, width=128,
                    name="generator"):
    """Builds a DCGAN-style generator with outputs in 0-255.

    Dense projection to 4x4 -> [Conv2DTranspose(stride 2) + BN + ReLU] until
    `image_shape` -> Conv2D + tanh -> `(tanh + 1) * 127.5`.

    Args:
        image_shape: `(S, S, C)`, S a power of two >= 8.
        latent_dim: Size of the latent vector.
        num_classes: Optional number of classes; the generator then takes
            `[latents, labels]` and concatenates a label embedding to the latents.
        width: Channels of the 4x4 feature map, halved at each upsampling.
        name: Model name.

    Returns:
        A functional `keras.Model` from `latents` (or `[latents, labels]`) to
        float images `[batch, *image_shape]` in [0, 255].
    """
    size, _, channels = _check_image_shape(image_shape)
    latents = keras.Input((latent_dim,), name="latents")
    inputs, x = latents, latents
    if num_classes:
        labels = keras.Input((), dtype="int32", name="labels")
        embedded = keras.layers.Embedding(num_classes, latent_dim, name="label_embedding")(labels)
        x = keras.layers.Concatenate(name="latents_and_labels")([latents, embedded])
        inputs = [latents, labels]
    x = keras.layers.Dense(4 * 4 * width, use_bias=False, name="project")(x)
    x = keras.layers.Reshape((4, 4, width), name="reshape")(x)
    x = keras.layers.ReLU(name="project_relu")(keras.layers.BatchNormalization(name="project_bn")(x))
    for i in range(round(math.log2(size / 4))):
        x = keras.layers.Conv2DTranspose(max(width // 2 ** (i + 1), 16), 4, strides=2,
                                         padding="same", use_bias=False, name=f"up{i + 1}")(x)
        x = keras.layers.BatchNormalization(name=f"up{i + 1}_bn")(x)
        x = keras.layers.ReLU(name=f"up{i + 1}_relu")(x)
    x = keras.layers.Conv2D(channels, 3, padding="same", activation="tanh", name="to_image")(x)
    outputs = keras.layers.Rescaling(127.5, offset=127.5, name="to_0_255")(x)
    return keras.Model(inputs, outputs, name=name)


def _load(source, input_shape):
    if isinstance(source, str) and source.lower() in APPLICATIONS:
        return load_backbone(source, input_shape=input_shape)
    try:
        return load_backbone(source)
    except ValueError:
        if input_shape is None:
            raise
        return load_backbone(source, input_shape=input_shape)  # Hub / Keras 2 without input.


def _image_shape(backbone, input_shape):
    accepts = tuple(backbone.input_shape[1:])
    if input_shape is None:
        if None in accepts:
            raise ValueError(
                f"The backbone takes images of shape {accepts}; pass the generator's "
                "`input_shape=(H, W, C)`. Received: input_shape=None"
            )
        return accepts
    wanted = tuple(int(d) for d in input_shape)
    _check_fits(accepts, wanted, "input_shape")
    return wanted


def _check_fits(accepts, wanted, argument):
    if len(accepts) != len(wanted) or any(a not in (None, w) for a, w in zip(accepts, wanted)):
        raise ValueError(
            f"The discriminator takes images of shape {accepts}, which cannot take the "
            f"generator's images of shape {wanted}. Build the generator with "
            f"image_shape={accepts} or choose a backbone for {wanted}. "
            f"Received: {argument}={wanted}"
        )


def discriminator_from_backbone(source, *, trainable="all", num_classes=None, input_shape=None,
                                freeze_batchnorm=False, name="discriminator"):
    """Builds a GAN discriminator on a pretrained backbone.

    Args:
        source: Any `load_backbone` source (`keras.Model`, `.keras`/`.h5`
            path, SavedModel, TF-Hub handle, application name).
        trainable: Freezing policy of the backbone (`"all"`, `"none"`,
            `"top:N"`, `"fraction:F"`, regexes, callable). FreezeD freezes
            the lower layers: `"top:2"` (last conv and its BN) here, or
            `"top:1"` with `freeze_batchnorm=True`. The head always trains.
        num_classes: Optional number of classes: the model then takes
            `[images, labels]` and adds the projection term `<embed(y), features>`.
        input_shape: The generator's image shape `(H, W, C)`; defaults to the
            backbone's input shape.
        freeze_batchnorm: Keep all the backbone's BatchNormalization layers
            frozen (inference mode, pretrained statistics). Defaults to
            `False`: BN layers in the trainable part use batch statistics,
            which kept the digits GANs from collapsing; BN layers in the
            frozen part always stay in inference mode.
        name: Model name.

    Returns:
        A functional `keras.Model` from images in 0-255 (and labels) to one
        real/fake logit per image; its backbone is the layer `"backbone"`.

    Raises:
        ValueError: If the backbone cannot take images of `input_shape`, or
            `trainable` is not a valid policy.
    """
    backbone = _load(source, input_shape)
    shape = _image_shape(backbone, input_shape)
    freezing.apply(backbone, trainable, freeze_batchnorm=freeze_batchnorm)
    images = keras.Input(shape, name="images")
    mode = getattr(backbone, "tftransfer_preprocessing", "none")
    x = ImagePreprocessing(mode, name="preprocessing")(images)
    backbone.name = "backbone"
    features = backbone(x)
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    elif len(features.shape) != 2:
        features = keras.layers.Flatten(name="flatten")(features)
    logit = keras.layers.Dense(1, name="real_fake")(features)
    if not num_classes:
        return keras.Model(images, logit, name=name)
    labels = keras.Input((), dtype="int32", name="labels")
    embedded = keras.layers.Embedding(num_classes, features.shape[-1], name="class_embedding")(labels)
    projection = keras.layers.Dot(axes=1, name="projection")([embedded, features])
    logit = keras.layers.Add(name="logit")([logit, projection])
    return keras.Model([images, labels], logit, name=name)


def load_discriminator(source, *, trainable="all", freeze_batchnorm=False):
    """Loads a saved discriminator (from `discriminator_from_backbone`) to fine-tune it.

    Args:
        source: A `.keras` path or a discriminator `keras.Model`.
        trainable: Freezing policy of its `"backbone"` layer; the head trains.
        freeze_batchnorm: Keep all the backbone's BatchNormalization frozen
            (see `discriminator_from_backbone`).

    Returns:
        The discriminator `keras.Model`.
    """
    model = source if isinstance(source, keras.Model) else keras.saving.load_model(
        source, compile=False)
    freezing.apply(discriminator_backbone(model), trainable, freeze_batchnorm=freeze_batchnorm)
    return model


def discriminator_backbone(discriminator):
    """The pretrained backbone inside a discriminator: its nested model."""
    for layer in discriminator.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise ValueError(
        "`discriminator` must come from `discriminator_from_backbone` (a model that holds its "
        f"backbone as a nested model). Received: discriminator={discriminator.name!r}"
    )


def _d_loss(kind, real, fake):
    if kind == "hinge":
        return tf.reduce_mean(tf.nn.relu(1.0 - real)) + tf.reduce_mean(tf.nn.relu(1.0 + fake))
    return tf.reduce_mean(tf.nn.softplus(-real)) + tf.reduce_mean(tf.nn.softplus(fake))


def _g_loss(kind, fake):
    return -tf.reduce_mean(fake) if kind == "hinge" else tf.reduce_mean(tf.nn.softplus(-fake))


def _adam():
    return keras.optimizers.Adam(2e-4, beta_1=0.5, beta_2=0.999)


class GAN(keras.Model):
    """A generator and a discriminator trained together by `fit`.

    Args:
        generator: A model from latents (or `[latents, labels]`) to images.
        discriminator: A model from images (or `[images, labels]`) to logits.
        ema_decay: Decay of the exponential moving average of the generator
            weights (`ema_generator`), used by `generate()`. The effective
            decay is `min(ema_decay, (1 + t) / (10 + t))` at step t, so short
            runs are not dominated by the initial weights.
        seed: Optional seed of the latent sampling.

    Data for `fit`: batches of real images, or `(images, labels)` when
    conditional. Metrics: `d_loss` and `g_loss`.
    """

    def __init__(self, generator, discriminator, *, ema_decay=0.999, seed=None, **kwargs):
        super().__init__(**kwargs)
        _check_pair(generator, discriminator)
        self.generator = generator
        self.discriminator = discriminator
        self.latent_dim = int(generator.inputs[0].shape[-1])
        self.conditional = len(generator.inputs) > 1
        self.ema_decay = float(ema_decay)
        self.ema_generator = keras.models.clone_model(generator)
        self.ema_generator.set_weights(generator.get_weights())
        self.ema_generator.trainable = False
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
        self.built = True  # Its parts are built; there is no `call` to trace.

    @property
    def metrics(self):
        return [self.d_loss_tracker, self.g_loss_tracker]

    def compile(self, d_optimizer=None, g_optimizer=None, loss="non_saturating", r1_gamma=0.0,
                **kwargs):
        """Configures training.

        Args:
            d_optimizer: Discriminator optimizer (instance or identifier);
                defaults to `Adam(2e-4, beta_1=0.5, beta_2=0.999)`.
            g_optimizer: Generator optimizer; same default.
            loss: `"non_saturating"` (logistic) or `"hinge"`.
            r1_gamma: Float >= 0, weight of the R1 penalty
                `gamma / 2 * E||grad_x D(x_real)||^2`, with `x` the real
                images scaled to [-1, 1] (as in the literature, so gammas of
                0.1-10 are the usual range). 0 turns it off.
            **kwargs: Passed to `keras.Model.compile` (e.g. `steps_per_execution`).
        """
        if loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}. Received: loss={loss!r}")
        if not isinstance(r1_gamma, (int, float)) or isinstance(r1_gamma, bool) or r1_gamma < 0:
            raise ValueError(f"`r1_gamma` must be a float >= 0. Received: r1_gamma={r1_gamma!r}")
        kwargs.setdefault("jit_compile", False)
        super().compile(optimizer=None, **kwargs)  # The two below do the work.
        self.d_optimizer = keras.optimizers.get(d_optimizer) if d_optimizer else _adam()
        self.g_optimizer = keras.optimizers.get(g_optimizer) if g_optimizer else _adam()
        for optimizer, model in ((self.d_optimizer, self.discriminator), (self.g_optimizer, self.generator)):
            if not optimizer.built:  # Built now, so BackupAndRestore can restore its state.
                optimizer.build(model.trainable_variables)
        self.gan_loss = loss
        self.r1_gamma = float(r1_gamma)

    def _inputs(self, images_or_latents, labels):
        return [images_or_latents, labels] if self.conditional else images_or_latents

    def _unpack(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        if isinstance(images, (tuple, list)):  # A dataset of `(images, labels)` passed as x.
            images, labels = images
        if self.conditional and labels is None:
            raise ValueError("A conditional GAN trains on `(images, labels)`; the data has no labels.")
        labels = tf.cast(labels, "int32") if self.conditional else None
        return tf.cast(images, "float32"), labels

    def train_step(self, data):
        images, labels = self._unpack(data)
        latents = keras.random.normal((tf.shape(images)[0], self.latent_dim), seed=self.seed_generator)
        scale = 1.0 / tf.distribute.get_strategy().num_replicas_in_sync
        fake = self.generator(self._inputs(latents, labels), training=True)
        with tf.GradientTape() as tape:
            d_loss = self._discriminator_loss(images, fake, labels)
            scaled = d_loss * scale
        variables = self.discriminator.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.d_optimizer.apply_gradients(zip(grads, variables))
        latents = keras.random.normal((tf.shape(images)[0], self.latent_dim), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            fake = self.generator(self._inputs(latents, labels), training=True)
            fake_logits = self.discriminator(self._inputs(fake, labels), training=True)
            g_loss = _g_loss(self.gan_loss, fake_logits)
            scaled = g_loss * scale
        variables = self.generator.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.g_optimizer.apply_gradients(zip(grads, variables))
        self._update_ema()
        self.d_loss_tracker.update_state(d_loss)
        self.g_loss_tracker.update_state(g_loss)
        return {m.name: m.result() for m in self.metrics}

    def _discriminator_loss(self, images, fake, labels):
        if self.r1_gamma <= 0:
            real_logits = self.discriminator(self._inputs(images, labels), training=True)
        else:
            with tf.GradientTape() as r1_tape:
                r1_tape.watch(images)
                real_logits = self.discriminator(self._inputs(images, labels), training=True)
                total = tf.reduce_sum(real_logits)
            grads = r1_tape.gradient(total, images) * _R1_SCALE  # d/d(images in [-1, 1])
            penalty = tf.reduce_mean(tf.reduce_sum(tf.square(grads), axis=[1, 2, 3]))
        fake_logits = self.discriminator(self._inputs(fake, labels), training=True)
        loss = _d_loss(self.gan_loss, real_logits, fake_logits)
        return loss + 0.5 * self.r1_gamma * penalty if self.r1_gamma > 0 else loss

    def _update_ema(self):
        context = tf.distribute.get_replica_context()
        if context is not None and tf.distribute.has_strategy():
            context.merge_call(lambda _: self._assign_ema())  # Cross-replica: once per variable.
        else:
            self._assign_ema()

    def _assign_ema(self):
        step = tf.cast(self.g_optimizer.iterations, "float32")
        decay = tf.minimum(self.ema_decay, (1.0 + step) / (10.0 + step))
        for ema, weight in zip(self.ema_generator.weights, self.generator.weights):
            ema.assign(decay * ema + (1.0 - decay) * weight)

    def export_generator(self, use_ema=True):
        """Returns a trainable standalone copy of the EMA (or raw) generator, to save."""
        source = self.ema_generator if use_ema else self.generator
        copy = keras.models.clone_model(source)
        copy.set_weights(source.get_weights())
        for layer in [copy, *copy.layers]:
            layer.trainable = True
        copy.name = self.generator.name
        return copy

    def generate(self, num_images=None, labels=None, *, latents=None, seed=0, use_ema=True):
        """Samples images in 0-255 (numpy) from the EMA (or raw) generator; see `sample`."""
        generator = self.ema_generator if use_ema else self.generator
        return sample(generator, num_images, labels, latents=latents, seed=seed)


def _check_pair(generator, discriminator):
    _check_fits(tuple(discriminator.inputs[0].shape[1:]), tuple(generator.output_shape[1:]),
                "generator.output_shape")
    if (len(generator.inputs) > 1) != (len(discriminator.inputs) > 1):
        raise ValueError(
            "The generator and the discriminator must both be class-conditional or both "
            f"not. Received: generator inputs={len(generator.inputs)}, "
            f"discriminator inputs={len(discriminator.inputs)}"
        )


def sample(generator, num_images=None, labels=None, *, latents=None, seed=0, batch_size=256):
    """Generates images with `generator` from seeded (or given) latent vectors.

    Args:
        generator: A generator model (conditional ones need `labels`).
        num_images: Number of images; defaults to `len(labels)` or `len(latents)`.
        labels: Integer class labels, one per image (conditional generators).
        latents: Optional array `[n, latent_dim]`; else standard normal with `seed`.
        seed: Seed of the latent vectors.
        batch_size: Batch size of inference.

    Returns:
        A float32 numpy array `[n, H, W, C]` with values in [0, 255].
    """
    conditional = len(generator.inputs) > 1
    if conditional and labels is None:
        raise ValueError("A conditional generator needs `labels`. Received: labels=None")
    n = num_images or (len(labels) if labels is not None else len(latents))
    if latents is None:
        dim = int(generator.inputs[0].shape[-1])
        latents = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    inputs = [np.asarray(latents, np.float32)]
    if conditional:
        inputs.append(np.asarray(labels, np.int32).reshape(-1))
    out = []
    for i in range(0, n, batch_size):
        batch = [x[i:i + batch_size] for x in inputs]
        out.append(generator(batch if conditional else batch[0], training=False))
    return np.clip(np.concatenate([np.asarray(o) for o in out]), 0.0, 255.0)


def augment_with_generator(generator, x, y, per_class=100, *, num_classes=None, seed=0):
    """Adds `per_class` generated, labelled images of every class to `(x, y)`.

    Args:
        generator: A class-conditional generator (images in 0-255).
        x: Real images `[n, H, W, C]` in 0-255.
        y: Integer labels `[n]`.
        per_class: Generated images per class.
        num_classes: Number of classes; defaults to `max(y) + 1`.
        seed: Seed of the latent vectors.

    Returns:
        `(x_mixed, y_mixed)`: float32 and int32 numpy arrays (real first,
        then generated), ready for `fine_tune(model, (x_mixed, y_mixed))`.
    """
    if len(generator.inputs) < 2:
        raise ValueError("`augment_with_generator` needs a class-conditional generator.")
    y = np.asarray(y, np.int32)
    labels = np.repeat(np.arange(num_classes or int(y.max()) + 1, dtype=np.int32), per_class)
    fake = sample(generator, labels=labels, seed=seed)
    return (np.concatenate([np.asarray(x, np.float32), fake]).astype(np.float32),
            np.concatenate([y, labels]))

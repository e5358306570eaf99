"""GAN fine-tuning: generator, backbone discriminators (FreezeD), GAN.fit, EMA, Fréchet distance."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SAVED, changed, weights_of

from tftransfer.fid import fid_from_images, frechet_distance, frechet_distance_from_stats
from tftransfer.gan import (
    GAN,
    augment_with_generator,
    build_generator,
    discriminator_backbone,
    discriminator_from_backbone,
    load_discriminator,
    sample,
)

DIGITS_CNN = str(SAVED / "digits_cnn.keras")


def tiny_backbone(shape=(16, 16, 3)):
    """A small conv feature extractor for 16x16 images in 0-255."""
    return keras.Sequential([
        keras.Input(shape),
        keras.layers.Rescaling(1 / 255.0),
        keras.layers.Conv2D(8, 3, strides=2, name="c1"),
        keras.layers.BatchNormalization(name="b1"),
        keras.layers.ReLU(),
        keras.layers.Conv2D(8, 3, name="c2"),
        keras.layers.GlobalAveragePooling2D(),
    ], name="tiny")


def tiny_gan(num_classes=None, shape=(16, 16, 3), **kwargs):
    generator = build_generator(shape, latent_dim=8, num_classes=num_classes, width=32)
    discriminator = discriminator_from_backbone(tiny_backbone(shape), num_classes=num_classes)
    return GAN(generator, discriminator, seed=0, **kwargs)


def batches(x, y=None, batch_size=8):
    data = (x, y) if y is not None else x
    return tf.data.Dataset.from_tensor_slices(data).batch(batch_size, drop_remainder=True)


def test_freezed_step_updates_generator_and_top_only(small_batch):
    x, y = small_batch
    generator = build_generator((32, 32, 3), latent_dim=16, num_classes=5, width=32)
    discriminator = discriminator_from_backbone(DIGITS_CNN, trainable="top:2", num_classes=5)
    gan = GAN(generator, discriminator, seed=0)
    gan.compile()
    backbone = discriminator_backbone(discriminator)
    before_b, before_d, before_g = (weights_of(m) for m in (backbone, discriminator, generator))
    gan.fit(batches(x, y, 16), epochs=1, steps_per_epoch=1, verbose=0)
    bn3 = {f"bn3/{n}" for n in ("gamma", "beta", "moving_mean", "moving_variance")}
    assert changed(before_b, weights_of(backbone)) == {"conv3/kernel"} | bn3
    moved = changed(before_d, weights_of(discriminator))
    assert {"real_fake/kernel", "class_embedding/embeddings"} <= moved
    assert not any(p.startswith(("bn1", "bn2", "conv1", "conv2")) for p in moved)  # + BN statistics
    assert {"project/kernel", "up1/kernel", "to_image/kernel"} <= changed(before_g, weights_of(generator))


def test_freezed_top1_with_frozen_batchnorm(small_batch):
    x, _ = small_batch
    generator = build_generator((32, 32, 3), latent_dim=16, width=32)
    discriminator = discriminator_from_backbone(DIGITS_CNN, trainable="top:1", freeze_batchnorm=True)
    gan = GAN(generator, discriminator, seed=0)
    gan.compile()
    backbone = discriminator_backbone(discriminator)
    before = weights_of(backbone)
    gan.fit(x[:16], batch_size=16, epochs=1, verbose=0)
    assert changed(before, weights_of(backbone)) == {"conv3/kernel"}


def test_frechet_distance_same_gaussian_near_zero_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4000, 4)), rng.normal(size=(4000, 4))
    assert frechet_distance(a, b) < 0.02
    shifts = [frechet_distance(a, b + s) for s in (0.5, 1.0, 2.0)]
    assert shifts == sorted(shifts)
    np.testing.assert_allclose(shifts, [4 * 0.25, 4 * 1.0, 4 * 4.0], rtol=0.05)


def test_frechet_distance_matches_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 0.5])
    cov = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]])
    expected = float(np.sum((mu1 - mu2) ** 2))
    assert frechet_distance_from_stats(mu1, cov, mu2, cov) == pytest.approx(expected, abs=1e-8)
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    trace_term = np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)  # Tr(S1+S2-2(S1S2)^1/2), diagonal
    got = frechet_distance_from_stats(mu1, np.diag(d1), mu2, np.diag(d2))
    assert got == pytest.approx(expected + trace_term, abs=1e-8)


def test_frechet_distance_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same feature size"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"features_a.shape=\(5,\)"):
        frechet_distance(np.zeros(5), np.zeros((5, 4)))


def test_fid_from_images_with_digits_features(digits_target):
    x, _ = digits_target
    model = keras.saving.load_model(DIGITS_CNN)
    same = fid_from_images(x[:200], x[200:400], model)
    noise = np.random.default_rng(0).uniform(0, 255, x[:200].shape).astype("float32")
    assert same < fid_from_images(noise, x[200:400], model) / 5


@pytest.mark.parametrize("num_classes", [None, 3])
def test_generated_images_shape_range_and_save_reload(tmp_path, num_classes):
    generator = build_generator((16, 16, 1), latent_dim=8, num_classes=num_classes, width=32)
    labels = [0, 1, 2, 0] if num_classes else None
    latents = np.random.default_rng(1).normal(size=(4, 8)).astype("float32") * 50  # saturate tanh
    images = sample(generator, labels=labels, latents=latents)
    assert images.shape == (4, 16, 16, 1)
    assert images.min() >= 0.0 and images.max() <= 255.0
    assert images.max() - images.min() > 100  # really spans the range
    path = tmp_path / "generator.keras"
    generator.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(sample(reloaded, labels=labels, latents=latents), images)


def test_generator_rejects_bad_image_shape():
    with pytest.raises(ValueError, match=r"Received: image_shape=\(24, 24, 3\)"):
        build_generator((24, 24, 3))


def test_ema_equals_generator_at_init_and_differs_after_steps(tmp_path):
    gan = tiny_gan()
    gan.compile()
    z = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    np.testing.assert_array_equal(gan.generate(latents=z), gan.generate(latents=z, use_ema=False))
    x = np.random.default_rng(0).uniform(0, 255, (16, 16, 16, 3)).astype("float32")
    start = [np.array(w) for w in gan.generator.weights]
    gan.fit(batches(x), epochs=1, steps_per_epoch=1, verbose=0)
    decay = min(0.999, 2 / 11)  # min(ema_decay, (1 + t) / (10 + t)) after step t = 1
    for ema_w, w0, w1 in zip(gan.ema_generator.weights, start, gan.generator.weights):
        np.testing.assert_allclose(ema_w, decay * w0 + (1 - decay) * np.array(w1), atol=1e-6)
    gan.fit(batches(x), epochs=1, steps_per_epoch=1, verbose=0)
    ema, raw = gan.generate(latents=z), gan.generate(latents=z, use_ema=False)
    assert np.abs(ema - raw).max() > 1e-3
    np.testing.assert_array_equal(ema, sample(gan.ema_generator, latents=z))
    path = tmp_path / "g.keras"
    gan.export_generator().save(path)
    exported = keras.saving.load_model(path)
    assert len(exported.trainable_weights) == len(gan.generator.trainable_weights)
    assert not gan.ema_generator.trainable_weights
    np.testing.assert_array_equal(sample(exported, latents=z), ema)


@pytest.mark.parametrize("loss", ["non_saturating", "hinge"])
@pytest.mark.parametrize("r1_gamma", [0.0, 10.0])
def test_losses_train_a_step(loss, r1_gamma):
    gan = tiny_gan(num_classes=2)
    gan.compile(loss=loss, r1_gamma=r1_gamma)
    x = np.random.default_rng(0).uniform(0, 255, (16, 16, 16, 3)).astype("float32")
    y = np.arange(16) % 2
    before = weights_of(gan.discriminator)
    history = gan.fit(batches(x, y), epochs=1, steps_per_epoch=2, verbose=0).history
    assert set(history) == {"d_loss", "g_loss"}
    assert all(np.isfinite(v[-1]) for v in history.values())
    assert changed(before, weights_of(gan.discriminator))


def test_loss_values():
    from tftransfer.gan import _d_loss, _g_loss

    zero, two = tf.zeros([4, 1]), tf.fill([4, 1], 2.0)
    assert float(_d_loss("non_saturating", zero, zero)) == pytest.approx(2 * np.log(2))
    assert float(_d_loss("non_saturating", 10 * two, -10 * two)) < 1e-6
    assert float(_g_loss("non_saturating", zero)) == pytest.approx(np.log(2))
    assert float(_d_loss("hinge", two, -two)) == 0.0
    assert float(_d_loss("hinge", zero, zero)) == pytest.approx(2.0)
    assert float(_g_loss("hinge", two)) == pytest.approx(-2.0)


def test_r1_penalty_raises_discriminator_loss():
    x = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype("float32")
    losses = []
    for gamma in (0.0, 10.0):
        keras.utils.set_random_seed(0)
        gan = tiny_gan()
        gan.compile(r1_gamma=gamma)
        losses.append(gan.fit(batches(x), epochs=1, verbose=0).history["d_loss"][0])
    assert losses[1] > losses[0] + 1e-3


def test_discriminator_that_cannot_take_generator_images():
    with pytest.raises(ValueError, match=r"\(32, 32, 3\).*\(16, 16, 3\)"):
        discriminator_from_backbone(DIGITS_CNN, input_shape=(16, 16, 3))
    generator = build_generator((16, 16, 3), latent_dim=8, width=32)
    discriminator = discriminator_from_backbone(DIGITS_CNN)
    with pytest.raises(ValueError, match=r"\(32, 32, 3\).*\(16, 16, 3\)"):
        GAN(generator, discriminator)


def test_conditional_mismatch_and_unknown_loss():
    generator = build_generator((16, 16, 3), latent_dim=8, num_classes=2, width=32)
    with pytest.raises(ValueError, match="both be class-conditional"):
        GAN(generator, discriminator_from_backbone(tiny_backbone()))
    gan = tiny_gan()
    with pytest.raises(ValueError, match=r"non_saturating.*hinge.*Received: loss='wgan'"):
        gan.compile(loss="wgan")
    with pytest.raises(ValueError, match="Received: r1_gamma=-1"):
        gan.compile(r1_gamma=-1)


def test_discriminator_saves_and_reloads_with_a_new_freezing_policy(tmp_path, small_batch):
    x, y = small_batch
    discriminator = discriminator_from_backbone(DIGITS_CNN, num_classes=5)
    path = tmp_path / "d.keras"
    discriminator.save(path)
    reloaded = load_discriminator(str(path), trainable="top:1", freeze_batchnorm=True)
    np.testing.assert_allclose(reloaded([x[:4], y[:4]]), discriminator([x[:4], y[:4]]), atol=1e-5)
    backbone = discriminator_backbone(reloaded)
    assert [w.path for w in backbone.trainable_weights] == ["conv3/kernel"]


def test_augment_with_generator_adds_labelled_samples():
    generator = build_generator((16, 16, 3), latent_dim=8, num_classes=3, width=32)
    x = np.zeros((6, 16, 16, 3), "float32")
    y = np.array([0, 0, 1, 1, 2, 2])
    x_mix, y_mix = augment_with_generator(generator, x, y, per_class=4)
    assert x_mix.shape == (18, 16, 16, 3) and x_mix.dtype == np.float32
    assert np.bincount(y_mix).tolist() == [6, 6, 6]
    assert np.array_equal(x_mix[:6], x) and x_mix[6:].max() > 0
    with pytest.raises(ValueError, match="class-conditional"):
        augment_with_generator(build_generator((16, 16, 3), latent_dim=8, width=32), x, y)


def test_mirrored_strategy_fit():
    # One-device reduction: collective ops of several CPU mirrored strategies in
    # one process clash in their instance keys.
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
    with strategy.scope():
        gan = tiny_gan(num_classes=2)
        gan.compile(loss="hinge")
    x = np.random.default_rng(0).uniform(0, 255, (16, 16, 16, 3)).astype("float32")
    before = weights_of(gan.ema_generator)
    history = gan.fit(batches(x, np.arange(16) % 2), epochs=1, verbose=0).history
    assert np.isfinite(history["d_loss"][0])
    assert changed(before, weights_of(gan.ema_generator))


def test_backup_and_restore_resumes(tmp_path):
    x = np.random.default_rng(0).uniform(0, 255, (16, 16, 16, 3)).astype("float32")

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("killed")

    gan = tiny_gan()
    gan.compile()
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError):
        gan.fit(batches(x), epochs=4, callbacks=[backup, Stop()], verbose=0)
    saved = weights_of(gan.generator)
    resumed = tiny_gan()
    resumed.compile()
    history = resumed.fit(batches(x), epochs=4, callbacks=[backup], verbose=0)
    assert len(history.epoch) == 2  # epochs 2 and 3 only
    assert int(resumed.g_optimizer.iterations) == 8
    assert saved.keys() == weights_of(resumed.generator).keys()

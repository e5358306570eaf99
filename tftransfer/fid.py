"""Fréchet distance between feature sets, and an FID analogue for any domain.

The Fréchet Inception Distance compares two image sets by the Fréchet (2-
Wasserstein) distance between Gaussians fitted to their features:
`||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`. Inception features mean
little on 32x32 digits, so `fid_from_images` takes any feature extractor, e.g.
the project's pretrained digits classifier (64-d features).

Example:

>>> from tftransfer.fid import fid_from_images
>>> fid_from_images(fake, real, "saved_models/digits_cnn.keras")
"""

import keras
import numpy as np
import scipy.linalg

from tftransfer.backbones import load_backbone


def _as_features(features, name):
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or len(array) < 2:
        raise ValueError(
            f"`{name}` must be a 2-D array `[num_samples >= 2, dims]`. "
            f"Received: {name}.shape={array.shape}"
        )
    return array


def gaussian_stats(features):
    """Returns the mean and covariance of `features` (`[n, d]`, rows are samples)."""
    features = _as_features(features, "features")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Fréchet distance between the Gaussians `N(mu1, sigma1)` and `N(mu2, sigma2)`.

    Args:
        mu1, mu2: Mean vectors of length `d`.
        sigma1, sigma2: Covariance matrices `[d, d]`.
        eps: Diagonal offset added when the product of covariances is
            singular and its square root is not finite.

    Returns:
        A non-negative Python float.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def frechet_distance(features_a, features_b):
    """Fréchet distance between Gaussians fitted to two feature sets.

    Args:
        features_a: Array `[n_a, d]`, one row per sample.
        features_b: Array `[n_b, d]`.

    Returns:
        A non-negative Python float; about 0 for two samples of one
        distribution.

    Raises:
        ValueError: If an input is not 2-D with at least 2 rows, or the
            feature sizes differ.
    """
    a = _as_features(features_a, "features_a")
    b = _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            "`features_a` and `features_b` need the same feature size. "
            f"Received: features_a.shape={a.shape}, features_b.shape={b.shape}"
        )
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))


def fid_from_images(images_a, images_b, feature_model, batch_size=256):
    """FID analogue: Fréchet distance between `feature_model` features of two image sets.

    Args:
        images_a: Images `[n, H, W, C]` in the feature model's input range
            (0-255 for tftransfer backbones).
        images_b: Images like `images_a`.
        feature_model: A `keras.Model` mapping images to feature vectors, or
            any `load_backbone` source, e.g. `"saved_models/digits_cnn.keras"`.
        batch_size: Batch size of feature extraction.

    Returns:
        A non-negative Python float.
    """
    if not isinstance(feature_model, keras.Model):
        feature_model = load_backbone(feature_model)
    features = [_features(feature_model, x, batch_size) for x in (images_a, images_b)]
    return frechet_distance(*features)


def _features(model, images, batch_size):
    out = model.predict(np.asarray(images, np.float32), batch_size=batch_size, verbose=0)
    return out.reshape(len(out), -1)

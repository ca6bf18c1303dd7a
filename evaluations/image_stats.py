"""A Frechet distance on 30 hand-made image statistics, for where FID's Inception network is unavailable.

The quickstart scores toy samples offline, with no pretrained weights and with fewer images than
Inception's 2048 features need; these statistics (colour, texture energy per direction, coarse
layout) separate the toy classes and keep the Gaussian fits well conditioned at a few dozen images.
"""
from pathlib import Path

import numpy as np
from PIL import Image

NUM_STATISTICS = 30


def image_statistics(images):
    """Statistics of each image, 30 numbers in grey levels 0..255:

    - per channel mean and standard deviation (6): global colour;
    - per channel mean |difference| of horizontal, vertical, diagonal and anti-diagonal neighbours (12):
      texture energy and orientation (the toy classes differ in stripe direction);
    - 2x2 average-pooled RGB (12): coarse layout (odd sides drop their last row / column).

    images: (N, H, W, 3) uint8 -> (N, 30) float64.
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < 2:
        raise ValueError(f"image_statistics expects (N, H, W, 3) RGB images of at least 2x2, got shape {x.shape}")
    n, h, w, _ = x.shape
    mean, std = x.mean(axis=(1, 2)), x.std(axis=(1, 2))
    grads = [np.abs(np.diff(x, axis=2)).mean(axis=(1, 2)), np.abs(np.diff(x, axis=1)).mean(axis=(1, 2)),
             np.abs(x[:, 1:, 1:] - x[:, :-1, :-1]).mean(axis=(1, 2)),
             np.abs(x[:, 1:, :-1] - x[:, :-1, 1:]).mean(axis=(1, 2))]
    pooled = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, 2, h // 2, 2, w // 2, 3).mean(axis=(2, 4)).reshape(n, -1)
    return np.concatenate([mean, std, *grads, pooled], axis=1)


def load_images(folder, names=None):
    """The RGB images `<folder>/<name>.png` as one (N, H, W, 3) uint8 array (all PNGs, sorted, by default)."""
    folder = Path(folder)
    if names is None:
        names = sorted(p.stem for p in folder.glob("*.png"))
    if not names:
        raise FileNotFoundError(f"no PNG images in {folder}")
    return np.stack([np.asarray(Image.open(folder / f"{n}.png").convert("RGB")) for n in names])


def gaussian_fit(features):
    """Mean and (unbiased) covariance of (N, D) features."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def distribution_distance(sample_features, reference_features):
    """Frechet distance between Gaussian fits of two sets of features (pytorch-fid's formula, as FID)."""
    from .fid import frechet_distance
    mu1, s1 = gaussian_fit(sample_features)
    mu2, s2 = gaussian_fit(reference_features)
    # Fewer images than features give singular covariances, whose matrix square root can make the
    # distance slightly negative; it is a distance, so it is clipped at 0.
    return max(0.0, float(frechet_distance(mu1, s1, mu2, s2)))

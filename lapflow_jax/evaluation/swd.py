"""Sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018, Progressive GAN).

As in ProGAN's metrics/sliced_wasserstein.py: each image set is decomposed into a Laplacian
pyramid (5x5 binomial filter, mirror borders, like cv2.pyrDown / pyrUp) with one level per
resolution from the image size down to 16; at every level, 128 random 7x7 patches per image are
cut out; the patches of one set are normalised per channel (mean and std over all its patches
and pixels); the distance between the two sets of flattened patches is the sliced Wasserstein
distance: 4 repeats of 128 random unit directions, the mean absolute difference of the sorted
projections. The per-level values are reported multiplied by 1e3 (ProGAN's "SWDx1e3") together
with their average.

Deviations, all deterministic: randomness comes from `seed` instead of numpy's global state, and
both sets use the same patch positions (positions do not depend on content), so a set compared
with itself gives exactly 0. Channels may be any number (ProGAN required RGB).

API:
  laplacian_pyramid(images, num_levels) -> list of [N, H/2^k, W/2^k, C] float32, finest first
  sliced_wasserstein(a, b, num_repeats=4, dirs_per_repeat=128, rng=None) -> float
  swd(images_a, images_b, seed=0, ...) -> {"swd_<res>": float, ..., "swd_avg": float}
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

_BINOMIAL = np.array([1.0, 4.0, 6.0, 4.0, 1.0], np.float32) / 16.0  # outer product: ProGAN's 5x5 / 256


def _blur(x: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """Separable 5x5 binomial blur over H and W with mirror borders ("dcb|abcd|cba")."""
    x = scipy.ndimage.convolve1d(x, _BINOMIAL * gain, axis=1, mode="mirror")
    return scipy.ndimage.convolve1d(x, _BINOMIAL * gain, axis=2, mode="mirror")


def _pyr_down(x: np.ndarray) -> np.ndarray:
    return _blur(x)[:, ::2, ::2]


def _pyr_up(x: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    up = np.zeros((n, 2 * h, 2 * w, c), x.dtype)
    up[:, ::2, ::2] = x
    return _blur(up, gain=2.0)  # 2 per axis = ProGAN's 4x kernel, restoring the zeroed energy


def laplacian_pyramid(images, num_levels: int) -> list[np.ndarray]:
    """ProGAN's Laplacian pyramid of NHWC images.

    Args:
      images: [N, H, W, C]; H and W divisible by 2^(num_levels - 1).
      num_levels: number of levels (>= 1).
    Returns:
      num_levels float32 arrays, finest first: band-pass residuals [N, H/2^k, W/2^k, C] and,
      last, the low-pass image. Summing back (`level_k + pyr_up(level_{k+1})`) restores the input.
    """
    x = np.asarray(images, np.float32)
    if x.ndim != 4:
        raise ValueError(f"laplacian_pyramid: images must be [N, H, W, C], got shape {x.shape}")
    if num_levels < 1:
        raise ValueError(f"laplacian_pyramid: num_levels must be >= 1, got {num_levels}")
    factor = 2 ** (num_levels - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
        raise ValueError(
            f"laplacian_pyramid: image size {x.shape[1:3]} must be divisible by {factor} for"
            f" {num_levels} levels"
        )
    pyramid = [x]
    for _ in range(1, num_levels):
        pyramid.append(_pyr_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - _pyr_up(pyramid[-1])
    return pyramid


def _patches(level: np.ndarray, centres_y: np.ndarray, centres_x: np.ndarray, size: int) -> np.ndarray:
    """[N * P, size, size, C] patches around the given centres (each [N, P])."""
    half = size // 2
    offsets = np.arange(-half, half + 1)
    n, p = centres_y.shape
    images = np.repeat(np.arange(n), p)[:, None, None]
    ys = centres_y.reshape(-1)[:, None, None] + offsets[None, :, None]
    xs = centres_x.reshape(-1)[:, None, None] + offsets[None, None, :]
    return level[images, ys, xs]


def _normalise(desc: np.ndarray) -> np.ndarray:
    """Per-channel zero mean / unit std over all patches and pixels, then flatten each patch."""
    desc = desc - desc.mean(axis=(0, 1, 2), keepdims=True)
    std = desc.std(axis=(0, 1, 2), keepdims=True)
    desc = desc / np.where(std > 0, std, 1.0)  # a constant channel stays all-zero, not NaN
    return desc.reshape(desc.shape[0], -1)


def sliced_wasserstein(
    a, b, num_repeats: int = 4, dirs_per_repeat: int = 128, rng: np.random.Generator | None = None
) -> float:
    """Sliced Wasserstein-1 distance between two equally sized point sets.

    Args:
      a, b: [M, D] descriptors (same M: the 1-D transport between sorted projections pairs
        points one to one).
      num_repeats, dirs_per_repeat: random unit directions drawn in num_repeats batches.
      rng: numpy Generator for the directions (default: seed 0).
    Returns:
      mean over directions of the mean |sorted(a @ u) - sorted(b @ u)|. For D = 1 this is the
      exact Wasserstein-1 distance between the two empirical distributions.
    """
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein: a and b must both be [M, D], got {a.shape} and {b.shape}")
    rng = np.random.default_rng(0) if rng is None else rng
    results = []
    for _ in range(num_repeats):
        dirs = rng.standard_normal((a.shape[1], dirs_per_repeat))
        dirs = (dirs / np.linalg.norm(dirs, axis=0, keepdims=True)).astype(np.float32)
        proj_a = np.sort(a @ dirs, axis=0)
        proj_b = np.sort(b @ dirs, axis=0)
        results.append(np.mean(np.abs(proj_a - proj_b), dtype=np.float64))
    return float(np.mean(results))


def swd(
    images_a,
    images_b,
    seed: int = 0,
    patch_size: int = 7,
    patches_per_image: int = 128,
    num_repeats: int = 4,
    dirs_per_repeat: int = 128,
    min_resolution: int = 16,
) -> dict[str, float]:
    """ProGAN's multi-scale sliced Wasserstein distance between two image sets.

    Args:
      images_a, images_b: [N, H, W, C] with the same shape; any value range (each set is
        normalised per channel). H and W must be divisible by 2^(levels - 1).
      seed: makes the patch positions and projection directions reproducible.
      patch_size: odd patch side (ProGAN: 7).
      patches_per_image, num_repeats, dirs_per_repeat: ProGAN's 128, 4, 128.
      min_resolution: the coarsest level has min(H, W) / 2^k >= this (ProGAN: 16); images smaller
        than it get a single level.
    Returns:
      {"swd_<res>": SWD x 1e3 at pyramid level of size <res>, finest first, ..., "swd_avg": mean}.
    """
    a = np.asarray(images_a, np.float32)
    b = np.asarray(images_b, np.float32)
    if a.ndim != 4 or a.shape != b.shape:
        raise ValueError(f"swd: images_a and images_b must be [N, H, W, C] of one shape, got {a.shape} and {b.shape}")
    if patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"swd: patch_size must be odd and positive, got {patch_size}")
    resolutions = []
    res = min(a.shape[1], a.shape[2])
    while res >= min_resolution or not resolutions:
        resolutions.append(res)
        res //= 2
    if resolutions[-1] < patch_size:
        raise ValueError(
            f"swd: the coarsest level ({resolutions[-1]} px) is smaller than patch_size {patch_size}"
        )
    pyramid_a = laplacian_pyramid(a, len(resolutions))
    pyramid_b = laplacian_pyramid(b, len(resolutions))
    half = patch_size // 2
    out = {}
    for level, (res, level_a, level_b) in enumerate(zip(resolutions, pyramid_a, pyramid_b)):
        rng = np.random.default_rng([seed, level])
        n, h, w, _ = level_a.shape
        ys = rng.integers(half, h - half, size=(n, patches_per_image))
        xs = rng.integers(half, w - half, size=(n, patches_per_image))
        desc_a = _normalise(_patches(level_a, ys, xs, patch_size))
        desc_b = _normalise(_patches(level_b, ys, xs, patch_size))
        distance = sliced_wasserstein(desc_a, desc_b, num_repeats, dirs_per_repeat, rng)
        out[f"swd_{res}"] = 1e3 * distance
    out["swd_avg"] = float(np.mean(list(out.values())))
    return out

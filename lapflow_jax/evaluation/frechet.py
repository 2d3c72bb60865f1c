"""Fréchet distance between Gaussians fitted to feature sets (FID when the features are
InceptionV3 pool3, see `inception.fid_features`; any other features work the same way).

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)

The standard code (pytorch-fid, TTUR) takes tr sqrtm(S1 S2) with scipy.linalg.sqrtm, adding
eps * I to both covariances when the result is not finite, and drops a small imaginary part.
S1 S2 is not symmetric, which is what makes that route fragile. Here the trace comes from the
symmetric matrix sqrt(S1) S2 sqrt(S1), which has the same eigenvalues as S1 S2: two `eigh`
calls in float64, negative round-off eigenvalues clipped to zero. It agrees with the standard
value to float64 round-off on well-conditioned inputs and stays real and finite on singular
ones (fewer samples than dimensions). `method="sqrtm"` runs the standard algorithm instead.

Reference statistics are stored as .npz with arrays `mu` [D] and `sigma` [D, D], the layout
pytorch-fid and TTUR use, so their precomputed files load here too.

API:
  feature_stats(features) -> (mu, sigma)
  RunningStats(dim): .add(features [n, D]) in any order and pieces; .stats() -> (mu, sigma)
  frechet_distance(mu1, sigma1, mu2, sigma2, method="eigh", eps=1e-6) -> float
  fid_from_features(features_a, features_b) -> float
  save_stats(path, mu, sigma); load_stats(path, suffix="") -> (mu, sigma); has_stats(path, suffix="")
"""

from __future__ import annotations

import os

import numpy as np
import scipy.linalg
from etils import epath


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature set.

    Args:
      features: [N, D] with N >= 2.
    Returns:
      mu [D] and sigma [D, D] (unbiased, ddof = 1, as np.cov), both float64.
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_stats: features must be [N, D] with N >= 2, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("feature_stats: features contain NaN or inf")
    return features.mean(axis=0), np.cov(features, rowvar=False)


class RunningStats:
    """Mean and covariance of a feature set seen in pieces: sums in float64, so the result equals
    `feature_stats` of all rows to float64 rounding, whatever the order or the split.

    Memory is D + D^2 float64 (32 MB for pool3's 2048), never the rows.
    """

    def __init__(self, dim: int):
        self.count = 0
        self.sum = np.zeros((dim,), np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def add(self, features) -> None:
        """features: [n, D] (n may be 0)."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.sum.shape[0]:
            raise ValueError(f"RunningStats: features must be [n, {self.sum.shape[0]}], got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("RunningStats: features contain NaN or inf")
        self.count += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """mu [D] and the unbiased covariance sigma [D, D] (ddof = 1, as np.cov)."""
        if self.count < 2:
            raise ValueError(f"RunningStats: need at least 2 rows, got {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, (sigma + sigma.T) / 2.0


def _check_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"frechet_distance: {name} must be mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"frechet_distance: {name} contains NaN or inf")
    return mu, sigma


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((sigma + sigma.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    values = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """pytorch-fid's calculate_frechet_distance trace term, step for step."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                "frechet_distance: sqrtm(sigma1 @ sigma2) has a large imaginary part"
                f" ({np.max(np.abs(covmean.imag)):.3g}); try method='eigh'"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "eigh", eps: float = 1e-6) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
      mu1, mu2: [D] means.
      sigma1, sigma2: [D, D] covariances.
      method: "eigh" (symmetric eigen form, default) or "sqrtm" (pytorch-fid's algorithm).
      eps: diagonal offset for the "sqrtm" fallback when its first result is not finite.
    Returns:
      the distance as a Python float, clipped at 0 (round-off can make identical sets
      come out at -1e-12).
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "the first (mu1, sigma1)")
    mu2, sigma2 = _check_stats(mu2, sigma2, "the second (mu2, sigma2)")
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: feature sizes differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    if method == "eigh":
        trace_sqrt = _trace_sqrt_product_eigh(sigma1, sigma2)
    elif method == "sqrtm":
        trace_sqrt = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        raise ValueError(f"frechet_distance: method must be 'eigh' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return max(float(value), 0.0)


def fid_from_features(features_a, features_b, method: str = "eigh") -> float:
    """Fréchet distance between two feature sets [Na, D] and [Nb, D] (FID for pool3 features)."""
    mu_a, sigma_a = feature_stats(features_a)
    mu_b, sigma_b = feature_stats(features_b)
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b, method=method)


def save_stats(path: str | os.PathLike, mu, sigma) -> None:
    """Writes reference statistics as .npz with `mu` [D] and `sigma` [D, D] (float64), atomically
    (a temporary name beside it, then replace: a reader never sees half a file)."""
    mu, sigma = _check_stats(mu, sigma, "the statistics to save")
    path = epath.Path(path)  # the cache may live in a gs:// workdir
    tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
    # An open file also keeps np.savez from appending ".npz".
    with tmp.open("wb") as f:
        np.savez(f, mu=mu, sigma=sigma)
    tmp.replace(path)


def has_stats(path: str | os.PathLike, suffix: str = "") -> bool:
    """Whether an .npz stores `mu<suffix>` and `sigma<suffix>` (ADM's reference batches: "" for
    pool3, "_s" for the spatial features of sFID)."""
    with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as data:
        return {f"mu{suffix}", f"sigma{suffix}"} <= set(data.files)


def load_stats(path: str | os.PathLike, suffix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Reads `mu<suffix>` [D] and `sigma<suffix>` [D, D] from an .npz (ours, pytorch-fid's, TTUR's
    or ADM's, whose reference batches also hold `mu_s`, `sigma_s`)."""
    if not epath.Path(path).is_file():
        raise FileNotFoundError(f"load_stats: no statistics file at {os.fspath(path)!r}")
    keys = [f"mu{suffix}", f"sigma{suffix}"]
    with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as data:
        missing = sorted(set(keys) - set(data.files))
        if missing:
            raise ValueError(f"load_stats: {os.fspath(path)!r} lacks {missing}; has {data.files}")
        mu, sigma = data[keys[0]], data[keys[1]]
    return _check_stats(mu, sigma, f"the statistics in {os.fspath(path)!r}")

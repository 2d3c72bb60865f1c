"""The flow math end to end without a network, on Gaussian data.

For x ~ N(mu, Sigma) the pyramid is linear (y = A x), the noisy multi-scale state is jointly
Gaussian with the data and the noise, so the exact marginal velocity E[target | x_t = z] is closed
form. Integrating it with our segment-wise sampler from the windows' entry noise must give samples
whose mean and covariance are the data's. Any mistake in the windows, the entry noise scales, the
targets or the segment hand-over shows up as a wrong mean or covariance.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lapflow_jax import pyramid, sampling
from lapflow_jax.paths import MultiScalePath

SIDE = 8
NUM_SAMPLES = 10_000
# With 10k samples the covariance estimate's own error is about 0.03 relative (Frobenius; measured
# 0.04 at 4k samples with 30 or 120 steps alike), so 0.08 leaves room for the solver's error too.
COV_REL_TOL = 0.08
# Largest of 64 per-pixel mean errors, in standard errors: 5 is far in the tail of pure chance.
MEAN_MAX_STD_ERRORS = 5.0


def gaussian_data():
    """A smooth, non-diagonal covariance over an 8x8 one-channel image, and a non-zero mean."""
    ii, jj = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij")
    pos = np.stack([ii.ravel(), jj.ravel()], 1).astype(np.float64)
    dist2 = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    sigma = np.exp(-dist2 / (2 * 2.0 ** 2)) + 0.05 * np.eye(SIDE * SIDE)
    mu = np.sin(pos[:, 0] / 3.0) + 0.5 * np.cos(pos[:, 1] / 2.0)
    return mu, sigma


def pyramid_matrices(levels):
    """Per-scale linear maps A_k (finest first) with y_k = A_k x, from decompose on a basis."""
    basis = jnp.eye(SIDE * SIDE, dtype=jnp.float64).reshape(-1, SIDE, SIDE, 1)
    scales = pyramid.decompose(basis, levels)
    return [np.asarray(s).reshape(SIDE * SIDE, -1).T for s in scales]


def exact_velocity(path, args, states, t):
    """E[velocity target | x_t = states] for Gaussian data, for the active scales."""
    means, covs = args  # per active-suffix: joint mean and covariance of y over all scales
    first = path.num_scales - len(states)
    sizes = [int(np.prod(s.shape[1:])) for s in states]
    mean, cov = means[first], covs[first]
    alpha, noise, d_alpha, d_noise = [], [], [], []
    for k, n in zip(range(first, path.num_scales), sizes):
        start = path.window_starts[k]
        alpha.append(jnp.full((n,), path.alpha(t[0], k)))
        noise.append(jnp.full((n,), path.noise_coeff(t[0], k)))
        d_alpha.append(jnp.full((n,), 1.0 / (1.0 - start)))
        d_noise.append(jnp.full((n,), -1.0 if path.kind == "global" else -1.0 / (1.0 - start)))
    a, s, da, ds = (jnp.concatenate(v) for v in (alpha, noise, d_alpha, d_noise))
    z = jnp.concatenate([x.reshape(x.shape[0], -1) for x in states], axis=1)
    cov_z = a[:, None] * cov * a[None] + jnp.diag(s ** 2)
    # cov_z is positive definite while noise remains (t < 1); the last Heun evaluation sits at
    # t = 1, where it is the rank-deficient pyramid covariance, so keep a floor of noise there.
    cov_z = cov_z + jnp.diag(jnp.full_like(s, 1e-8))
    resid = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(cov_z), (z - a * mean).T).T
    expected_y = mean + resid @ (a[:, None] * cov)
    expected_eps = resid * s
    v = da * expected_y + ds * expected_eps
    return [c.reshape(x.shape) for c, x in zip(jnp.split(v, np.cumsum(sizes)[:-1], axis=1), states)]


def sample_gaussian(path, method, *, wrong_entry=False):
    """Samples NUM_SAMPLES images with the exact velocity; returns (samples [N, 64], nfe)."""
    levels = path.num_scales
    mu, sigma = gaussian_data()
    mats = pyramid_matrices(levels)
    # Joint law of the active suffix of scales f..L-1, for each f.
    means, covs = [], []
    for f in range(levels):
        a = np.concatenate(mats[f:], axis=0)
        means.append(jnp.asarray(a @ mu))
        covs.append(jnp.asarray(a @ sigma @ a.T))
    shapes = pyramid.scale_shapes(SIDE, SIDE, levels)
    keys = jax.random.split(jax.random.key(0), levels)
    noise = [jax.random.normal(kk, (NUM_SAMPLES, h, w, 1), jnp.float64) for kk, (h, w) in zip(keys, shapes)]
    if wrong_entry:
        # Undo the path's entry scale of the finest scale: it then enters as plain eps.
        noise[0] = noise[0] / path.entry_noise_scale(0)
    result = sampling.sample(functools.partial(exact_velocity, path), (tuple(means), tuple(covs)), path, noise,
                             method=method, steps=40, rtol=1e-5, atol=1e-5)
    x = np.asarray(pyramid.reconstruct(result.residuals)).reshape(NUM_SAMPLES, -1)
    return x, result.nfe_per_segment


def errors(x):
    """(largest |mean error| in standard errors, relative Frobenius error of the covariance)."""
    mu, sigma = gaussian_data()
    mean_z = np.abs(x.mean(0) - mu) / np.sqrt(np.diag(sigma) / x.shape[0])
    cov_err = np.linalg.norm(np.cov(x, rowvar=False) - sigma) / np.linalg.norm(sigma)
    return mean_z.max(), cov_err


@pytest.mark.parametrize("kind,starts,method", [
    ("global", (0.5, 0.0), "heun"),
    ("local", (0.5, 0.0), "heun"),
    ("global", (2 / 3, 1 / 3, 0.0), "heun"),
    ("local", (2 / 3, 1 / 3, 0.0), "heun"),
    ("global", (0.5, 0.0), "dopri5"),
])
def test_exact_velocity_transports_noise_to_data(kind, starts, method):
    with jax.enable_x64(True):
        x, nfe = sample_gaussian(MultiScalePath(starts, kind), method)
    mean_z, cov_err = errors(x)
    print(f"{kind} {starts} {method}: mean err {mean_z:.2f} s.e., cov rel err {cov_err:.4f}, NFE {nfe}")
    assert mean_z < MEAN_MAX_STD_ERRORS
    assert cov_err < COV_REL_TOL
    assert len(nfe) == len(starts)


def test_wrong_entry_noise_is_detected():
    """The check above is able to fail: entering the fine scale with unit noise under the global
    path (the local path's entry) gives a clearly wrong covariance."""
    with jax.enable_x64(True):
        x, _ = sample_gaussian(MultiScalePath((0.5, 0.0), "global"), "heun", wrong_entry=True)
    assert errors(x)[1] > 2 * COV_REL_TOL

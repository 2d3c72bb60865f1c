"""Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's evaluator computes them.

ADM (guided-diffusion evaluations/evaluator.py, ManifoldEstimator): on Inception pool3 features,
each set's manifold is the union of balls around its points, the radius of a point being its
squared distance to its k-th nearest neighbour in its own set, k = 3, the point itself counted
as the 0-th (numpy.partition index 3). Precision: the fraction of samples inside the reference
manifold (some reference point r with |s - r|^2 <= radius_r); recall: the fraction of reference
points inside the samples' manifold. ADM's reference is the 10,000 images of its reference batch.

Squared distances are |a|^2 - 2 a.b + |b|^2 clipped at 0, as ADM; here in float32 with the full
float32 matmul precision on any backend, in blocks on one device. ADM computes each distance
block in float16 first and uses float32 only where that overflows, so a point within float16
rounding of a ball's edge can fall on the other side (docs/evaluation.md).

API:
  precision_recall(reference [M, D], samples [N, D], k=3, block=4096) -> (precision, recall)
  manifold_radii(features [N, D], k=3, block=4096) -> [N] squared k-NN radii
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

NEIGHBOURS = 3  # ADM: nhood_sizes=(3,)
_HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """[n, D], [m, D] -> [n, m] squared Euclidean distances (ADM's _batch_pairwise_distances)."""
    na = jnp.sum(jnp.square(a), axis=1)[:, None]
    nb = jnp.sum(jnp.square(b), axis=1)[None, :]
    return jnp.maximum(na - 2.0 * jnp.matmul(a, b.T, precision=_HIGHEST) + nb, 0.0)


@functools.partial(jax.jit, static_argnames=("count",))
def _smallest(a: jax.Array, b: jax.Array, *, count: int) -> jax.Array:
    """The `count` smallest squared distances from each row of a to the rows of b, ascending."""
    return -jax.lax.top_k(-_squared_distances(a, b), count)[0]


@jax.jit
def _inside_any(a: jax.Array, b: jax.Array, radii_b: jax.Array) -> jax.Array:
    """[n] bool: row i of a lies within radius_j of some row j of b."""
    return jnp.any(_squared_distances(a, b) <= radii_b[None, :], axis=1)


def _blocks(n: int, block: int):
    return [(s, min(s + block, n)) for s in range(0, n, block)]


def manifold_radii(features, k: int = NEIGHBOURS, block: int = 4096) -> np.ndarray:
    """[N] squared distance of each row to its k-th nearest row (itself the 0-th): ADM's radii."""
    x = jnp.asarray(np.asarray(features, np.float32))
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"precision/recall: {n} feature rows cannot give a {k}-th nearest neighbour; need > {k}.")
    radii = []
    for r0, r1 in _blocks(n, block):
        candidates = [_smallest(x[r0:r1], x[c0:c1], count=min(k + 1, c1 - c0)) for c0, c1 in _blocks(n, block)]
        merged = jnp.sort(jnp.concatenate(candidates, axis=1), axis=1)
        radii.append(np.asarray(merged[:, k]))
    return np.concatenate(radii)


def _fraction_inside(queries: jax.Array, points: jax.Array, radii: jax.Array, block: int) -> float:
    inside = []
    for q0, q1 in _blocks(queries.shape[0], block):
        hit = jnp.zeros((q1 - q0,), bool)
        for p0, p1 in _blocks(points.shape[0], block):
            hit = hit | _inside_any(queries[q0:q1], points[p0:p1], radii[p0:p1])
        inside.append(np.asarray(hit))
    return float(np.mean(np.concatenate(inside)))


def precision_recall(reference, samples, k: int = NEIGHBOURS, block: int = 4096) -> tuple[float, float]:
    """(precision, recall) of samples [N, D] against reference [M, D] features, ADM's way."""
    reference = np.asarray(reference, np.float32)
    samples = np.asarray(samples, np.float32)
    if reference.ndim != 2 or samples.ndim != 2 or reference.shape[1] != samples.shape[1]:
        raise ValueError(f"precision/recall: reference and samples must be [M, D] and [N, D], got "
                         f"{reference.shape} and {samples.shape}")
    ref_radii = jnp.asarray(manifold_radii(reference, k, block))
    sample_radii = jnp.asarray(manifold_radii(samples, k, block))
    ref, smp = jnp.asarray(reference), jnp.asarray(samples)
    return _fraction_inside(smp, ref, ref_radii, block), _fraction_inside(ref, smp, sample_radii, block)

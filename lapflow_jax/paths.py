"""Multi-scale probability paths: time windows, noisy states, velocity targets, stages.

Conventions (docs/method.md): t in [0, 1], t = 0 is noise and t = 1 is data. Scale k = 0 is the
finest, k = L - 1 the coarsest, so every per-scale tuple here is ordered finest first, like
`pyramid.decompose`. Scale k lives on its window [T_k, 1]; the coarsest starts at T_{L-1} = 0
and finer scales start later, so `window_starts` decreases along the tuple, e.g. (0.5, 0.0).

Two paths, with alpha_k(t) = (t - T_k) / (1 - T_k) for t >= T_k:

        "global" (the paper's):  x_t = alpha_k(t) x1 + (1 - t) eps
        "local"  (ours):         x_t = alpha_k(t) x1 + (1 - alpha_k(t)) eps

Both give the same clean-image estimate from a velocity, x1 = x_t + (1 - t) v, which the
samplers use for coarse-to-fine previews.

The flow math here never imports the model: it is tested on closed-form Gaussian data alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

PATH_KINDS = ("global", "local")


def validate_window_starts(window_starts: Sequence[float], *, field: str = "window_starts") -> tuple[float, ...]:
    """Checks window starts (finest first) and returns them as a tuple of floats.

    The coarsest (last) must be 0, starts must strictly increase toward finer scales (i.e.
    strictly decrease along the tuple) and all must be < 1.
    """
    starts = tuple(float(s) for s in window_starts)
    if not starts:
        raise ValueError(f"{field} is empty: give one window start per scale, finest first, e.g. (0.5, 0.0).")
    if starts[-1] != 0.0:
        raise ValueError(
                f"{field}={starts}: the coarsest scale (last entry, scales are listed finest first) must "
                f"start at 0.0, got {starts[-1]}.")
    for k in range(len(starts) - 1):
        if not starts[k] > starts[k + 1]:
            raise ValueError(
                    f"{field}={starts}: window starts must strictly increase from the coarsest (last) to "
                    f"the finest (first) scale; entry {k} ({starts[k]}) is not greater than entry {k + 1} "
                    f"({starts[k + 1]}).")
    if starts[0] >= 1.0:
        raise ValueError(f"{field}={starts}: every window start must be < 1, the finest is {starts[0]}.")
    return starts


@dataclasses.dataclass(frozen=True)
class MultiScalePath:
    """The probability path of every scale, given its window start.

    Attributes:
        window_starts: T_k per scale, finest first; validated on construction.
        kind: "global" (the paper's) or "local".
    """

    window_starts: tuple[float, ...]
    kind: str = "global"

    def __post_init__(self):
        object.__setattr__(self, "window_starts", validate_window_starts(self.window_starts))
        if self.kind not in PATH_KINDS:
            raise ValueError(f"path kind {self.kind!r} is not one of {PATH_KINDS}.")

    @property
    def num_scales(self) -> int:
        return len(self.window_starts)

    # --- Windows and stages -------------------------------------------------------------------

    def finest_active(self, t: float) -> int:
        """Index of the finest scale active at global time t (a host float)."""
        for k, start in enumerate(self.window_starts):
            if t >= start:
                return k
        raise AssertionError("unreachable: the coarsest window starts at 0")

    def segments(self) -> list[tuple[float, float, int]]:
        """Integration segments between window starts, in time order.

        Returns:
            [(t0, t1, finest_active)] where scales finest_active..L-1 are active on [t0, t1]. The
            first segment holds only the coarsest scale; each later one adds the next finer scale.
        """
        bounds = list(reversed(self.window_starts)) + [1.0]
        return [(bounds[s], bounds[s + 1], self.num_scales - 1 - s) for s in range(self.num_scales)]

    # --- Per-scale coefficients (t: array broadcastable against the scale's array) ------------

    def alpha(self, t: jax.Array, k: int) -> jax.Array:
        """alpha_k(t) = (t - T_k) / (1 - T_k), zero before the window opens."""
        start = self.window_starts[k]
        return jnp.clip((t - start) / (1.0 - start), 0.0, 1.0)

    def noise_coeff(self, t: jax.Array, k: int) -> jax.Array:
        """Coefficient of eps in x_t for scale k: (1 - t) (global) or 1 - alpha_k(t) (local)."""
        if self.kind == "global":
            return 1.0 - t
        return 1.0 - self.alpha(t, k)

    def entry_noise_scale(self, k: int) -> float:
        """Scale k enters at t = T_k as entry_noise_scale(k) * eps."""
        return 1.0 - self.window_starts[k] if self.kind == "global" else 1.0

    def noisy_state(self, x1: jax.Array, eps: jax.Array, t: jax.Array, k: int) -> jax.Array:
        """x_t for scale k. x1, eps: [B, h, w, c]; t: [B] (broadcast over the trailing axes)."""
        t = _expand_like(t, x1)
        return self.alpha(t, k) * x1 + self.noise_coeff(t, k) * eps

    def velocity_target(self, x1: jax.Array, eps: jax.Array, k: int) -> jax.Array:
        """d x_t / dt for scale k inside its window (constant in t for both paths)."""
        start = self.window_starts[k]
        if self.kind == "global":
            return x1 / (1.0 - start) - eps
        return (x1 - eps) / (1.0 - start)

    def predict_clean(self, x_t: jax.Array, velocity: jax.Array, t: jax.Array) -> jax.Array:
        """The clean-scale estimate implied by a velocity: x1 = x_t + (1 - t) v (both paths)."""
        return x_t + (1.0 - _expand_like(t, x_t)) * velocity

    # --- Training ----------------------------------------------------------------------------

    def sample_times(self, rng: jax.Array, finest: int, batch: int) -> jax.Array:
        """Training times for a stage whose finest included scale is `finest`: t ~ U[T_f, 1). [B]."""
        return jax.random.uniform(rng, (batch,), minval=self.window_starts[finest], maxval=1.0)


def _expand_like(t: jax.Array, x: jax.Array) -> jax.Array:
    t = jnp.asarray(t, dtype=x.dtype)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def stage_batch_sizes(global_batch: int, fractions: Sequence[float] | None, num_scales: int) -> tuple[int, ...]:
    """Static sub-batch size per training stage f = 0..L-1 (finest included scale f).

    Args:
        global_batch: the whole batch of one step.
        fractions: relative share per stage, finest first; None means equal shares.
        num_scales: L.

    The sizes sum to global_batch; remainders go to the finest stages first. Every stage must get
    at least one example.
    """
    if fractions is None:
        fractions = (1.0,) * num_scales
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != num_scales:
        raise ValueError(
                f"stage_fractions has {len(fractions)} entries {fractions}, but there are {num_scales} scales.")
    if any(f <= 0 for f in fractions):
        raise ValueError(f"stage_fractions={fractions}: every entry must be > 0.")
    total = sum(fractions)
    sizes = [int(global_batch * f / total) for f in fractions]
    for i in range(global_batch - sum(sizes)):
        sizes[i % num_scales] += 1
    if min(sizes) < 1:
        raise ValueError(
                f"global batch {global_batch} is too small to give each of the {num_scales} training "
                f"stages an example (sizes {sizes}, stage_fractions {fractions}).")
    return tuple(sizes)


def split_stages(x: jax.Array, stage_sizes: Sequence[int]) -> list[jax.Array]:
    """The rows of a batch each training stage takes: [B, ...] -> per stage f [n_f, ...].

    The stages interleave: with g = gcd(n_0, ..., n_{L-1}) the batch is read as g runs of B / g
    rows, and stage f takes the same n_f / g positions of every run. The mesh splits a batch over
    its D data-parallel devices in contiguous blocks, so whenever D divides every n_f (which
    config validation requires) each device already holds n_f / D rows of every stage and the
    split moves no data; contiguous slices of the global batch would put each stage on a few
    devices and make the partitioner shuffle rows between them. The rows a stage gets do not
    depend on D: sharded and single-device steps train on the same examples per stage.
    `join_stages` is the inverse.
    """
    if len(stage_sizes) == 1:
        return [x]
    g = math.gcd(*stage_sizes)
    runs = x.reshape((g, x.shape[0] // g) + x.shape[1:])
    parts, start = [], 0
    for n in stage_sizes:
        parts.append(runs[:, start:start + n // g].reshape((n,) + x.shape[1:]))
        start += n // g
    return parts


def join_stages(parts: Sequence[jax.Array]) -> jax.Array:
    """Inverse of `split_stages`: per stage [n_f, ...] -> [sum n_f, ...], interleaved in runs of
    gcd(n_f), so that a join of batch-sharded parts stays on the devices that hold its rows."""
    if len(parts) == 1:
        return parts[0]
    g = math.gcd(*(p.shape[0] for p in parts))
    runs = [p.reshape((g, p.shape[0] // g) + p.shape[1:]) for p in parts]
    joined = jnp.concatenate(runs, axis=1)
    return joined.reshape((-1,) + parts[0].shape[1:])

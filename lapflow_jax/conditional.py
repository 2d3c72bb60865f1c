"""Coarse-conditioned sampling from an unmodified LapFlow: super-resolution and variations.

Given the coarse scales of an image (a low-resolution input `low` = Down^m(x), m = 1 for 2x,
2 for 4x), sample its m finer scales from the trained model (docs/method.md, "Conditional
sampling"). Scales k >= m are *known* (the pyramid of `low`), scales k < m are *unknown*.

Two samplers, both integrating only the unknown scales forward while the known scales follow a
given trajectory (their predicted velocities are discarded):

- "inversion" (exact): block-causal attention makes the known scales' field depend on the known
  scales alone, so their flow is an autonomous ODE. Integrate it backwards with the model's own
  field from y at t = 1 down to the first unknown scale's window start, storing its states on the
  solver's grid (Euler/Heun: the forward grid itself, so the forward pass reads stored states
  exactly; dopri5: the backward solve's dense output, evaluated wherever the adaptive forward solve
  asks). Then integrate the unknown scales forward from fresh noise beside the stored states.
  Since the unconditional sampler's known-scale output is a bijection of their noise and the
  unknown noise is independent of it, this draws from the sampler's own p(fine | coarse = y).
  The inversion is run once per input and shared by its k samples.
- "replacement" (the usual shortcut, the baseline): the known scales are set to the path's
  noisy state alpha_k(t) y + c_k(t) eps (one eps per sample) at every evaluation.

Either can project the clean estimate at every step onto Down^m(x) = low ("P" variants), and both
finish with an exact-consistency projection x <- x + D^+(low - D x), so that Down^m(output) equals
the input to float rounding. Variations: keep the known scales of a full-size reference image and
start its unknown scales at t_start from alpha_k(t_start) x_k + c_k(t_start) eps (strength
1 - t_start).

The ODE solvers stay in sampling.py (model-free); here, as there, a velocity function is pure
`velocity_fn(args, states, t)`, so everything below runs on Gaussian test fields as on the model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lapflow_jax import pyramid, sampling
from lapflow_jax.paths import MultiScalePath

SAMPLERS = ("inversion", "replacement")


# --- The constraint Down^m(x) = low and its projection ------------------------------------------

@dataclasses.dataclass(frozen=True)
class Constraint:
    """The pyramid of an L-scale model whose m finest scales are unknown (hashable: a static arg).

    levels: L; unknown: m (1 <= m < L), the input has H / 2^m; sigmas: per-scale normalisation,
    finest first; down / up: the pyramid's filters (config.pyramid).
    """

    levels: int
    unknown: int
    sigmas: tuple[float, ...]
    down: str = "area"
    up: str = "bilinear"

    def __post_init__(self):
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        if not 1 <= self.unknown < self.levels:
            raise ValueError(f"conditional sampling needs 1 <= unknown scales < num_scales; got {self.unknown} "
                             f"unknown of {self.levels} (a {2 ** self.unknown}x upsample needs at least "
                             f"{self.unknown + 1} scales).")
        if len(self.sigmas) != self.levels:
            raise ValueError(f"{len(self.sigmas)} sigmas for {self.levels} scales.")

    def down_m(self, x: jax.Array) -> jax.Array:
        """D = Down^m: [..., H, W, C] -> [..., H/2^m, W/2^m, C]."""
        for _ in range(self.unknown):
            x = pyramid.downsample(x, self.down)
        return x

    def known(self, low: jax.Array) -> list[jax.Array]:
        """The known scales m..L-1 of an image whose Down^m is `low`, normalised (finest first).

        The Gaussian levels g_k, k >= m, of x are those of low, so its pyramid's scales are too."""
        return pyramid.normalize(pyramid.decompose(low, self.levels - self.unknown, down=self.down, up=self.up),
                                 self.sigmas[self.unknown:])

    def residuals(self, x: jax.Array) -> list[jax.Array]:
        return pyramid.normalize(pyramid.decompose(x, self.levels, down=self.down, up=self.up), self.sigmas)

    def image(self, residuals: Sequence[jax.Array]) -> jax.Array:
        return pyramid.reconstruct(pyramid.denormalize(list(residuals), self.sigmas), up=self.up)

    def project(self, x: jax.Array, low: jax.Array) -> jax.Array:
        """The nearest image to x with Down^m(image) = low: x + D^+(low - D x).

        Area down: D D^T = 4^-m I, so D^+ = 4^m D^T is nearest upsampling by 2^m. Other filters:
        D^+ r = D^T z with (D D^T) z = r solved by conjugate gradients (D D^T is well conditioned:
        the binomial filter keeps at least 1/8 of the power of every decimated frequency); a second
        pass removes what float32 CG leaves.
        """
        return _project(x, low, unknown=self.unknown, down=self.down)


@functools.partial(jax.jit, static_argnames=("unknown", "down"))
def _project(x, low, *, unknown, down):
    def d(z):
        for _ in range(unknown):
            z = pyramid.downsample(z, down)
        return z

    if down == "area":
        def d_plus(r):
            for _ in range(unknown):
                r = pyramid.upsample(r, "nearest")
            return r
        passes = 1
    else:
        d_t = jax.linear_transpose(d, jax.ShapeDtypeStruct(x.shape, x.dtype))

        def d_plus(r):
            z, _ = jax.scipy.sparse.linalg.cg(lambda v: d(d_t(v)[0]), r, tol=1e-7, maxiter=200)
            return d_t(z)[0]
        passes = 2
    for _ in range(passes):
        x = x + d_plus(low - d(x))
    return x


def project_box(x: jax.Array, low: jax.Array, constraint: Constraint, lo: float = -1.0, hi: float = 1.0) -> jax.Array:
    """The nearest image to x with Down^m(image) = low *and* lo <= image <= hi (the pixel range).

    Constraint.project alone can leave pixels outside [lo, hi]; clipping them afterwards (as any
    image file does) breaks the consistency where it bites (a black input block keeps its sample's
    noise above black). Area down: the constraint is one equation per 2^m x 2^m block, so each block
    is solved alone and exactly: z = clip(x + lambda, lo, hi) with the shift lambda such that the
    block's mean is low (the KKT conditions of the box-constrained projection; lambda by bisection,
    then one Newton step on the unclipped pixels for float rounding). Needs lo <= low <= hi (true
    of any input read from an image). Binomial down: alternating clip and Constraint.project
    (`_BOX_PASSES` times, ending on the projection): consistent to float rounding, in the box to
    what the alternation reaches, not the exact nearest point.

    Args: x [B, H, W, C]; low [B, H/2^m, W/2^m, C].  Returns [B, H, W, C].
    """
    return _project_box(jnp.asarray(x), jnp.asarray(low), unknown=constraint.unknown, down=constraint.down,
                        lo=float(lo), hi=float(hi))


_BOX_PASSES = 30


@functools.partial(jax.jit, static_argnames=("unknown", "down", "lo", "hi"))
def _project_box(x, low, *, unknown, down, lo, hi):
    if down != "area":
        for _ in range(_BOX_PASSES):
            x = _project(jnp.clip(x, lo, hi), low, unknown=unknown, down=down)
        return x
    f = 2 ** unknown
    b, h, w, c = low.shape
    blocks = x.reshape(b, h, f, w, f, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h, w, c, f * f)
    g = low[..., None]
    mean = lambda shift: jnp.mean(jnp.clip(blocks + shift, lo, hi), axis=-1, keepdims=True)
    # mean(shift) is continuous and non-decreasing; it is lo at shift_lo and hi at shift_hi.
    shift_lo = lo - jnp.max(blocks, axis=-1, keepdims=True)
    shift_hi = hi - jnp.min(blocks, axis=-1, keepdims=True)

    def bisect(_, bounds):
        a, z = bounds
        mid = 0.5 * (a + z)
        below = mean(mid) < g
        return jnp.where(below, mid, a), jnp.where(below, z, mid)

    a, z = jax.lax.fori_loop(0, 60, bisect, (shift_lo, shift_hi))
    out = jnp.clip(blocks + 0.5 * (a + z), lo, hi)
    free = (out > lo) & (out < hi)
    n_free = jnp.sum(free, axis=-1, keepdims=True)
    correction = (g - jnp.mean(out, axis=-1, keepdims=True)) * (f * f) / jnp.maximum(n_free, 1)
    out = jnp.where(free, jnp.clip(out + correction, lo, hi), out)
    return out.reshape(b, h, w, c, f, f).transpose(0, 1, 4, 2, 5, 3).reshape(x.shape)


def to_uint8_consistent(images: np.ndarray, low: np.ndarray, constraint: Constraint) -> np.ndarray:
    """Images in [-1, 1] (consistent, e.g. from project_box) -> uint8 whose Down^m is the input.

    Area down: each 2^m x 2^m block's sum of levels is rounded to the integer nearest to 4^m times the
    input's level, and the block is rounded to it (floor every pixel, then one level up for the
    pixels with the largest fractional parts): |Down^m(uint8) - low| <= 0.5 / 4^m levels, and 0 for
    an input that is itself uint8. Other filters: sample.to_uint8 (plain rounding).

    Args: images [B, H, W, C] float; low [B, H/2^m, W/2^m, C] float in [-1, 1].  Returns uint8.
    """
    from lapflow_jax import sample as sample_lib

    images = np.asarray(images, np.float64)
    if constraint.down != "area":
        return sample_lib.to_uint8(images)
    f = 2 ** constraint.unknown
    b, h, w, c = np.shape(low)
    levels = np.clip((images + 1.0) * 127.5, 0.0, 255.0)
    blocks = levels.reshape(b, h, f, w, f, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h, w, c, f * f)
    floor = np.floor(blocks)
    target = np.clip(np.rint((np.asarray(low, np.float64) + 1.0) * 127.5 * f * f), 0, 255 * f * f)
    extra = np.clip(target - floor.sum(-1), 0, f * f).astype(np.int64)  # levels to add in each block
    order = np.argsort(-(blocks - floor), axis=-1, kind="stable")  # largest fractional part first
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(f * f), axis=-1)
    out = np.minimum(floor + (rank < extra[..., None]), 255.0)
    return out.reshape(b, h, w, c, f, f).transpose(0, 1, 4, 2, 5, 3).reshape(images.shape).astype(np.uint8)


def uint8_consistency_levels(images: np.ndarray, low: np.ndarray, constraint: Constraint) -> float:
    """max |Down^m(images) - low| in uint8 levels of uint8 images [B, H, W, C]; low: uint8 (levels, as
    written next to them) or float in [-1, 1]. Area down: in float64, so an exact match reads 0;
    other filters: consistency_error in float32."""
    if np.asarray(low).dtype == np.uint8:
        levels = np.asarray(low, np.float64)
    else:
        levels = (np.asarray(low, np.float64) + 1.0) * 127.5
    if constraint.down != "area":
        return consistency_error(np.asarray(images, np.float32) / 127.5 - 1.0, levels / 127.5 - 1.0, constraint) * 127.5
    f = 2 ** constraint.unknown
    b, h, w, c = levels.shape
    down = np.asarray(images, np.float64).reshape(b, h, f, w, f, c).mean((2, 4))
    return float(np.abs(down - levels).max())


def consistency_error(images: jax.Array, low: jax.Array, constraint: Constraint) -> float:
    """max |Down^m(images) - low| (images [B, H, W, C], low [B, h, w, C])."""
    return float(jnp.max(jnp.abs(constraint.down_m(jnp.asarray(images)) - jnp.asarray(low))))


# --- The forward plan ----------------------------------------------------------------------------

def forward_plan(path: MultiScalePath, start: float, steps: Sequence[int] | int) -> list[tuple[float, float, int, int]]:
    """The segments the unknown scales are integrated over, from `start` to 1, in time order.

    Returns [(t0, t1, finest active scale, steps)]: the unconditional sampler's segments and step
    counts (sampling.steps_per_segment) cut at `start` (a segment cut short keeps its step size,
    at least one step), so conditional and unconditional sampling share their grid.
    """
    segments = path.segments()
    per_segment = sampling.steps_per_segment(path, steps) if isinstance(steps, int) else tuple(int(s) for s in steps)
    if len(per_segment) != len(segments) or min(per_segment) < 1:
        raise ValueError(f"steps per segment {per_segment} must be {len(segments)} positive integers.")
    plan = []
    for (t0, t1, finest), n in zip(segments, per_segment):
        if t1 <= start:
            continue
        if t0 < start:
            n = max(1, math.ceil(n * (t1 - start) / (t1 - t0) - 1e-9))
            t0 = start
        plan.append((float(t0), float(t1), finest, n))
    return plan


# --- The known scales' trajectory -----------------------------------------------------------------

@dataclasses.dataclass
class CoarseTrajectory:
    """The known scales integrated backwards from y (t = 1) to the plan's start.

    plan: forward_plan(...). data: per plan segment, for Euler/Heun the stored grid states (per known
    scale [n + 1, B, ...], forward time order: index i at t0 + i (t1 - t0) / n), for dopri5 the
    backward solve's dense interpolation. start_states: the known scales at plan[0][0], [B, ...].
    nfe: velocity evaluations per plan segment (known scales only: cheap, coarse tokens only).
    """

    plan: list[tuple[float, float, int, int]]
    method: str
    data: list[Any]
    start_states: list[jax.Array]
    nfe: tuple[int, ...]


def invert(velocity_fn: sampling.VelocityFn, args, path: MultiScalePath, known_states: Sequence[jax.Array],
           plan: list[tuple[float, float, int, int]], *, method: str = "heun", rtol: float = 1e-3,
           atol: float = 1e-3) -> CoarseTrajectory:
    """Integrates the known scales alone backwards from t = 1 over `plan` (see CoarseTrajectory).

    velocity_fn sees only the known scales (an active suffix: the model handles any suffix, and
    block-causal attention makes their velocities the same as beside finer scales).
    """
    if method not in sampling.METHODS:
        raise ValueError(f"sampling method {method!r} is not one of {sampling.METHODS}.")
    states = list(known_states)
    data: list[Any] = [None] * len(plan)
    nfe = [0] * len(plan)
    for j in reversed(range(len(plan))):
        t0, t1, _, n = plan[j]
        if method == "dopri5":
            interp, count = sampling.dopri5_dense(velocity_fn, args, states, t1, t0, rtol, atol, initial_steps=n)
            states = list(interp.evaluate(t0))
            data[j], nfe[j] = interp, int(count)
        else:
            traj = sampling.fixed_step_trajectory(velocity_fn, args, states, t1, t0, method=method, num_steps=n)
            states = [x[-1] for x in traj]
            data[j] = [jnp.flip(x, 0) for x in traj]
            nfe[j] = n * (1 if method == "euler" else 2)
    return CoarseTrajectory(plan=plan, method=method, data=data, start_states=states, nfe=tuple(nfe))


def round_trip(velocity_fn: sampling.VelocityFn, args, trajectory: CoarseTrajectory, *, rtol: float = 1e-3,
               atol: float = 1e-3) -> list[jax.Array]:
    """forward(inverse(y)): the known scales integrated forward alone from the trajectory's start
    with the same solver and grid; equals y to the solver's tolerance."""
    states = list(trajectory.start_states)
    for t0, t1, _, n in trajectory.plan:
        states, _ = sampling.integrate_segment(velocity_fn, args, states, t0, t1, method=trajectory.method,
                                               num_steps=n, rtol=rtol, atol=atol)
    return states


def _grid_state(traj: jax.Array, t0, t1, t) -> jax.Array:
    """The stored state at time t of a grid trajectory [n + 1, B, ...] on [t0, t1]: exactly the stored
    one at a grid time (to 1e-3 of a step, float rounding of t), linear in between."""
    n = traj.shape[0] - 1
    u = jnp.clip((t - t0) / (t1 - t0) * n, 0.0, n)
    nearest = jnp.round(u)
    u = jnp.where(jnp.abs(u - nearest) < 1e-3, nearest, u)
    i = jnp.clip(jnp.floor(u), 0, n - 1).astype(jnp.int32)
    w = (u - i).astype(traj.dtype)
    return (1 - w) * traj[i] + w * traj[i + 1]


# --- The clamped velocity: unknown scales beside given known states ------------------------------

@functools.lru_cache(maxsize=None)
def clamped_velocity_fn(velocity_fn: sampling.VelocityFn, path: MultiScalePath, mode: str, repeat: int,
                        constraint: Constraint | None) -> sampling.VelocityFn:
    """Velocity of the active unknown scales with the known scales taken from a trajectory.

    args = (inner_args, coarse, projection): inner_args go to velocity_fn; coarse is ("grid") the
    per-segment stored states and (t0, t1), ("dense") a dopri5 interpolation, ("replacement") (y, eps)
    per known scale; known states have batch B and are repeated `repeat` times (row b * repeat + j
    is input b's sample j). projection: None, or (low [B * repeat, h, w, C], y per known scale
    [B * repeat, ...]) with `constraint` to project the clean estimate at every evaluation.
    Cached, so equal arguments give the same (hashable) function and no recompilation.
    """
    return functools.partial(_clamped_velocity, velocity_fn, path, mode, repeat, constraint)


def _known_states(path, mode, coarse, t):
    if mode == "grid":
        stored, t0, t1 = coarse
        return [_grid_state(x, t0, t1, t[0]) for x in stored]
    if mode == "dense":
        return list(coarse.evaluate(t[0]))
    y, eps = coarse
    first = path.num_scales - len(y)
    return [path.noisy_state(yk, ek, t, k) for k, (yk, ek) in enumerate(zip(y, eps), start=first)]


def _clamped_velocity(velocity_fn, path, mode, repeat, constraint, args, states, t):
    inner, coarse, projection = args
    known = _known_states(path, mode, coarse, t)
    if repeat > 1:
        known = [jnp.repeat(x, repeat, axis=0) for x in known]
    v = velocity_fn(inner, list(states) + known, t)[:len(states)]
    if constraint is None:
        return v
    low, y = projection
    return _projected_velocity(constraint, path, states, v, y, low, t)


def _projected_velocity(constraint, path, states, v, y, low, t):
    """The velocity whose clean estimate x_t + (1 - t) v is the projected one (the "P" variants):
    reconstruct the unknown scales' clean estimates beside y (finer scales not yet active as 0),
    project onto Down^m = low, and take the unknown scales of the result. Left as is at t = 1."""
    first = constraint.levels - len(states) - len(y)
    clean = [path.predict_clean(x, vel, t) for x, vel in zip(states, v)]
    inactive = [jnp.zeros(clean[0].shape[:1] + (clean[0].shape[1] << i, clean[0].shape[2] << i) + clean[0].shape[3:],
                          clean[0].dtype) for i in range(first, 0, -1)]
    x = constraint.project(constraint.image(inactive + clean + list(y)), low)
    projected = constraint.residuals(x)[first:first + len(states)]
    gap = (1.0 - t).reshape(t.shape + (1,) * (clean[0].ndim - 1))
    safe = jnp.maximum(gap, 1e-4)
    return [jnp.where(gap > 1e-4, vel + (p - c) / safe, vel) for vel, p, c in zip(v, projected, clean)]


# --- The samplers ---------------------------------------------------------------------------------

@dataclasses.dataclass
class ConditionalResult:
    """images: [B * k, H, W, C] reconstructed and de-normalised (pixels, or latents in latent mode);
    row b * k + j is input b's sample j. residuals: normalised scales, finest first (known = y).
    nfe_inversion / nfe_forward: per plan segment (the inversion's is shared by the k samples).
    trajectory: the inversion (None for replacement)."""

    images: jax.Array
    residuals: list[jax.Array]
    nfe_inversion: tuple[int, ...]
    nfe_forward: tuple[int, ...]
    trajectory: CoarseTrajectory | None = None


def conditional_sample(velocity_fn: sampling.VelocityFn, args, path: MultiScalePath, constraint: Constraint,
                       low: jax.Array, noise: Sequence[jax.Array], *, sampler: str = "inversion",
                       samples_per_input: int = 1, inversion_args=None, method: str = "heun",
                       steps: Sequence[int] | int = 50, rtol: float = 1e-3, atol: float = 1e-3,
                       project_steps: bool = False, final_projection: bool = True,
                       replacement_noise: Sequence[jax.Array] | None = None,
                       reference: jax.Array | None = None, t_start: float | None = None) -> ConditionalResult:
    """Samples the m unknown (finer) scales given low = Down^m(x), k = samples_per_input per input.

    Args:
      velocity_fn, args: as sampling.sample; args for the B * k rows of the forward pass.
      path: the model's multi-scale path.
      constraint: the pyramid and m (Constraint).
      low: [B, H/2^m, W/2^m, C] de-normalised input (a variation's reference gives it as Down^m).
      noise: per unknown scale k < m, finest first, standard normal [B * k, H/2^k, W/2^k, C].
      sampler: "inversion" or "replacement" (SAMPLERS).
      inversion_args: args for the B rows of the inversion (labels of the inputs); default `args`
        (right when samples_per_input is 1).
      method, steps, rtol, atol: the solver, as sampling.sample (same grid per segment).
      project_steps: project the clean estimate onto the constraint at every evaluation ("P").
      final_projection: finish with x <- x + D^+(low - D x) (off only to test that it matters).
      replacement_noise: per known scale, standard normal [B * k, ...] (replacement only).
      reference: variations: [B, H, W, C] image whose known scales are kept and whose unknown scales
        start at t_start (low is then ignored: Down^m(reference)).
      t_start: start of the unknown scales' integration (variations); default and minimum: the first
        unknown scale's window start (super-resolution from fresh noise).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"conditional sampler {sampler!r} is not one of {SAMPLERS}.")
    k = int(samples_per_input)
    m = constraint.unknown
    if len(noise) != m:
        raise ValueError(f"got noise for {len(noise)} scales; {m} scales are unknown.")
    if reference is not None:
        reference = jnp.asarray(reference)
        low = constraint.down_m(reference)
    low = jnp.asarray(low)
    batch = low.shape[0]
    y = constraint.known(low)
    first_window = path.window_starts[m - 1]
    start = first_window if t_start is None else float(t_start)
    if not first_window <= start < 1.0:
        raise ValueError(f"t_start={start} must be in [{first_window}, 1): the first unknown scale's window "
                         "start (super-resolution) up to, not including, 1.")
    plan = forward_plan(path, start, steps)
    low_k = jnp.repeat(low, k, axis=0)
    y_k = [jnp.repeat(x, k, axis=0) for x in y]
    projection = (low_k, y_k) if project_steps else None
    proj_constraint = constraint if project_steps else None

    if sampler == "inversion":
        trajectory = invert(velocity_fn, args if inversion_args is None else inversion_args, path, y, plan,
                            method=method, rtol=rtol, atol=atol)
        mode, repeat = ("dense" if method == "dopri5" else "grid"), k
        coarse = [d if method == "dopri5" else (d, t0, t1) for d, (t0, t1, _, _) in zip(trajectory.data, plan)]
        nfe_inversion = trajectory.nfe
    else:
        if replacement_noise is None or len(replacement_noise) != len(y):
            raise ValueError(f"the replacement sampler needs noise for the {len(y)} known scales.")
        trajectory, mode, repeat = None, "replacement", 1
        coarse = [(y_k, list(replacement_noise))] * len(plan)
        nfe_inversion = ()

    # The unknown scales open at `start` begin at the path's noisy state of the reference (variations)
    # or of nothing (alpha = 0 at a window start: the entry noise).
    truth = constraint.residuals(reference) if reference is not None else None
    states = []
    for s in range(plan[0][2], m):
        x1 = jnp.zeros_like(noise[s]) if truth is None else jnp.repeat(truth[s], k, axis=0)
        states.append(path.noisy_state(x1, noise[s], jnp.full((x1.shape[0],), start, x1.dtype), s))
    fn = clamped_velocity_fn(velocity_fn, path, mode, repeat, proj_constraint)
    nfes = []
    for j, (t0, t1, finest, n) in enumerate(plan):
        if j > 0:
            states = [path.entry_noise_scale(finest) * noise[finest]] + states
        states, nfe = sampling.integrate_segment(fn, (args, coarse[j], projection), states, t0, t1, method=method,
                                                 num_steps=n, rtol=rtol, atol=atol)
        nfes.append(nfe)
    residuals = list(states) + y_k
    images = _finish(residuals, low_k, constraint=constraint, final_projection=final_projection)
    return ConditionalResult(images=images, residuals=residuals, nfe_inversion=tuple(nfe_inversion),
                             nfe_forward=tuple(nfes), trajectory=trajectory)


@functools.partial(jax.jit, static_argnames=("constraint", "final_projection"))
def _finish(residuals, low, *, constraint, final_projection):
    x = constraint.image(residuals)
    return constraint.project(x, low) if final_projection else x


def replacement_noise_like(rng: jax.Array, low: jax.Array, constraint: Constraint, repeat: int) -> list[jax.Array]:
    """Standard normal noise for the replacement sampler's known scales, [B * repeat, ...] each."""
    known = constraint.known(jnp.asarray(low))
    keys = jax.random.split(rng, len(known))
    return [jax.random.normal(key, (x.shape[0] * repeat,) + x.shape[1:], x.dtype) for key, x in zip(keys, known)]


def bicubic(low: np.ndarray, factor: int) -> np.ndarray:
    """The bicubic baseline: [B, h, w, C] -> [B, h * factor, w * factor, C] (jax.image.resize)."""
    low = jnp.asarray(low, jnp.float32)
    b, h, w, c = low.shape
    return np.asarray(jax.image.resize(low, (b, h * factor, w * factor, c), "bicubic"))

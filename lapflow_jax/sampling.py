"""Segment-by-segment ODE samplers for the multi-scale path.

Global time runs from 0 (noise) to 1 (data). The window starts cut [0, 1] into segments; on each
segment a fixed set of scales is active (the coarsest alone first, each finer scale joining at its
window start as fresh, suitably scaled noise). Every velocity call sees only the active scales,
which is where LapFlow saves compute. Each segment is one compiled integration (a `fori_loop` for
Euler and Heun, a `while_loop` of Dormand-Prince 5(4) steps for the adaptive solver), so a model
with L scales compiles L programs, once.

The adaptive solver is diffrax's Dopri5 + PIDController step for step (same tableau, controller
and acceptance rule; `_dopri5_segment_diffrax` is that reference), with three changes a window
structure asks for (`Dopri5Options`): the step size carries over a window start instead of a cold
restart, the error is measured on the image the scales reconstruct, and each sample keeps its own
step size.

A velocity function here is pure: `velocity_fn(args, states, t) -> velocities`, with `args` a
pytree (model parameters, labels...) passed explicitly so large weights are never baked into the
compiled program as constants.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lapflow_jax import parallel, pyramid
from lapflow_jax.paths import MultiScalePath

METHODS = ("euler", "heun", "dopri5")

VelocityFn = Callable[[Any, list[jax.Array], jax.Array], list[jax.Array]]


@dataclasses.dataclass
class SampleResult:
    """Output of `sample`.

    residuals: the generated (still normalised) pyramid scales, finest first, [B, H/2^k, W/2^k, C].
    nfe_per_segment: velocity evaluations per segment, in time order (coarsest-only segment first).
    segments: (t0, t1, finest active scale) per segment, in time order.
    previews: if asked for, per segment end, the clean-scale estimates x1 = x_t + (1 - t) v of the
      active scales (finest first; inactive finer scales are zeros), ready to reconstruct.
    dopri5_stats: for dopri5, per segment, host numpy: "nfe" [B] (model evaluations each sample
      needed; nfe_per_segment holds what the batch paid, the most any sample needed when steps are
      per sample), "accepted"/"rejected" [B], "accepted_t"/"rejected_t" [B, bins] (steps by the
      global-time bin they start in), "h_start" [B] (first step tried in the segment).
    """

    residuals: list[jax.Array]
    nfe_per_segment: tuple[int, ...]
    segments: list[tuple[float, float, int]]
    previews: list[list[jax.Array]] | None = None
    dopri5_stats: list[dict] | None = None


def steps_per_segment(path: MultiScalePath, total_steps: int) -> tuple[int, ...]:
    """Splits `total_steps` over the segments (time order) in proportion to their length.

    Largest-remainder rounding, so the steps sum to exactly `total_steps` (rounding each share on
    its own gives 51 for 50 over three equal segments); a segment left with 0 then takes one step
    from the largest. Needs total_steps >= the number of segments (each gets >= 1).
    """
    lengths = [t1 - t0 for t0, t1, _ in path.segments()]
    if total_steps < len(lengths):
        raise ValueError(f"{total_steps} sampling steps cannot give each of the {len(lengths)} segments "
                         f"(one per scale) a step; config.sample.steps must be >= {len(lengths)}.")
    quotas = [total_steps * length / sum(lengths) for length in lengths]
    steps = [int(q) for q in quotas]
    # Rounded fractions: equal segments (1/3 each) tie exactly and the earlier one wins, instead
    # of whichever float error happens to be larger.
    order = sorted(range(len(steps)), key=lambda i: (-round(quotas[i] - steps[i], 9), i))
    for i in order[:total_steps - sum(steps)]:
        steps[i] += 1
    for i in range(len(steps)):
        if steps[i] == 0:
            steps[max(range(len(steps)), key=lambda j: steps[j])] -= 1
            steps[i] = 1
    return tuple(steps)


def _broadcast_time(t, batch: int, dtype=jnp.float32) -> jax.Array:
    return jnp.full((batch,), t, dtype)


def _add(states, deltas, h):
    return [x + h * d for x, d in zip(states, deltas)]


def _fixed_step(velocity_fn: VelocityFn, args, xs, t, h, method: str):
    """One Euler or Heun step of size h (negative h integrates backwards in time) from time t."""
    batch = xs[0].shape[0]
    v = velocity_fn(args, xs, _broadcast_time(t, batch, xs[0].dtype))
    if method == "euler":
        return _add(xs, v, h)
    v_next = velocity_fn(args, _add(xs, v, h), _broadcast_time(t + h, batch, xs[0].dtype))
    return [x + 0.5 * h * (a + b) for x, a, b in zip(xs, v, v_next)]


@functools.partial(jax.jit, static_argnames=("velocity_fn", "method", "num_steps"))
def _fixed_step_segment(velocity_fn: VelocityFn, args, states, t0, t1, *, method: str, num_steps: int):
    h = (t1 - t0) / num_steps
    return jax.lax.fori_loop(0, num_steps, lambda i, xs: _fixed_step(velocity_fn, args, xs, t0 + i * h, h, method),
                             list(states))


@functools.partial(jax.jit, static_argnames=("velocity_fn", "method", "num_steps"))
def fixed_step_trajectory(velocity_fn: VelocityFn, args, states, t0, t1, *, method: str, num_steps: int):
    """Like one segment of `sample` with Euler or Heun, but keeps every grid state.

    Integrates from t0 to t1 (t1 < t0 runs backwards) in num_steps equal steps and returns, per
    state, the stacked states at t0 + i (t1 - t0) / num_steps for i = 0..num_steps:
    [num_steps + 1, B, ...]. Conditional sampling (conditional.py) stores a coarse trajectory so.
    """
    h = (t1 - t0) / num_steps

    def step(xs, i):
        nxt = _fixed_step(velocity_fn, args, xs, t0 + i * h, h, method)
        return nxt, nxt

    _, path = jax.lax.scan(step, list(states), jnp.arange(num_steps))
    return [jnp.concatenate([x[None], p]) for x, p in zip(states, path)]


@functools.partial(jax.jit, static_argnames=("velocity_fn", "initial_steps"))
def _dopri5_segment_diffrax(velocity_fn: VelocityFn, args, states, t0, t1, rtol, atol, *, initial_steps: int):
    """The library reference (diffrax Dopri5 + PIDController, one cold start per segment, RMS over
    the whole batch): what `sample` did before `Dopri5Options`; kept for tests and comparisons."""
    batch = states[0].shape[0]
    term = diffrax.ODETerm(lambda t, y, a: tuple(velocity_fn(a, list(y), _broadcast_time(t, batch, y[0].dtype))))
    solution = diffrax.diffeqsolve(
        term, diffrax.Dopri5(), t0=t0, t1=t1, dt0=(t1 - t0) / initial_steps, y0=tuple(states), args=args,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True), max_steps=100_000)
    final = [y[-1] for y in solution.ys]
    # Dopri5 is first-same-as-last: one evaluation to start, then six per attempted step.
    nfe = 1 + 6 * solution.stats["num_steps"]
    return final, nfe


# --- Adaptive dopri5 across segments -------------------------------------------------------------

# Dormand-Prince 5(4): nodes, stage coefficients, 5th-order weights, and the error weights
# (5th minus embedded 4th order; the last one multiplies the FSAL derivative at the step's end).
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_DP_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
# diffrax's error weights are 2/3 of Hairer's b - b_hat (71/57600, ..., -1/40); we use diffrax's,
# so a tolerance means what it meant with the library (the factor only rescales the tolerance).
_DP_E = tuple(2 / 3 * e for e in (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40))

ERROR_NORMS = ("image", "state")


@dataclasses.dataclass(frozen=True)
class Dopri5Options:
    """How the adaptive solver treats the windows and measures its error (config sample.dopri5_*).

    carry_step: start each segment with the step size the previous one ended with (the last
      accepted step's proposal; if the segment end cut that step short, the uncut step), instead
      of a cold start at (segment length / initial steps). A window start adds a scale but does
      not make the coarse scales' dynamics any stiffer, so the step that was good just before is
      the best guess just after; if the joining scale needs less, the controller rejects and
      shrinks (6 evaluations per rejection, against a whole ramp-up from a tiny step).
    error_norm: "image": the error is measured on the image the scales make: the per-scale error
      estimates (normalised units) are de-normalised and reconstructed with `to_image` (linear,
      so this is exactly the image's error), scaled by atol + rtol * |image| per pixel, and
      RMS'd over the pixels. Each scale then counts by what it contributes to the output: a
      coarse element covers 4^k pixels, a residual counts at its sigma. "state": diffrax's
      default, RMS over every element of every active scale in normalised units (the finest
      scale, with most elements and unit variance, dominates, although its pixel error is its
      sigma times smaller).
    per_sample: each sample has its own time and step size (the RMS is over its own pixels), so
      sample i does not depend on which other samples share its batch (bit for bit, wherever
      the velocity field is: its norm is computed row by row); False: one step size
      for the batch from the RMS over all samples (diffrax's behaviour on a batched state).
    time_bins: resolution of the per-t step table (`SampleResult.dopri5_stats`).
    """

    carry_step: bool = True
    error_norm: str = "image"
    per_sample: bool = True
    safety: float = 0.9
    factor_min: float = 0.2
    factor_max: float = 10.0
    max_steps: int = 100_000
    time_bins: int = 20

    def __post_init__(self):
        if self.error_norm not in ERROR_NORMS:
            raise ValueError(f"dopri5 error norm {self.error_norm!r} is not one of {ERROR_NORMS}.")


# The solver as it was before the options existed (diffrax's controller, no carry, batch RMS).
DOPRI5_RESTART = Dopri5Options(carry_step=False, error_norm="state", per_sample=False)


def _with_absent(xs, num_absent: int):
    """Active scales (finest first) -> all scales, zeros for the `num_absent` finer ones."""
    b, h, w, c = xs[0].shape
    return [jnp.zeros((b, h << (num_absent - j), w << (num_absent - j), c), xs[0].dtype)
            for j in range(num_absent)] + list(xs)


def _scaled_rms(err, y0, y1, rtol, atol, *, to_image, num_absent: int, row_by_row: bool = False) -> jax.Array:
    """Per-sample RMS of err / (atol + rtol * max(|y0|, |y1|)): [B].

    row_by_row: one sample at a time (lax.map), so each row's value comes from the same program
    whatever the batch size. XLA picks its vectorisation of the reconstruction's dots by shape, so
    at batch 4 and 16 the same row's norm can differ in the last bit, and a step accepted in one
    batch is then a hair longer in the other: sample i would depend on its batch (and pod) size.
    """
    if row_by_row:
        one_row = lambda rows: _scaled_rms(*([x[None] for x in r] for r in rows), rtol, atol, to_image=to_image,
                                           num_absent=num_absent)[0]
        return jax.lax.map(one_row, (err, y0, y1))
    if to_image is not None:
        err, y0, y1 = (to_image(_with_absent(x, num_absent)) for x in (err, y0, y1))
        err, y0, y1 = [err], [y0], [y1]
    flat = lambda xs: jnp.concatenate([x.reshape(x.shape[0], -1) for x in xs], axis=1)
    err, y0, y1 = flat(err), flat(y0), flat(y1)
    scaled = err / (atol + rtol * jnp.maximum(jnp.abs(y0), jnp.abs(y1)))
    return jnp.sqrt(jnp.mean(jnp.square(scaled), axis=1))


def _per_sample(h, x):
    return h.reshape((-1,) + (1,) * (x.ndim - 1)) * x


@functools.partial(jax.jit, static_argnames=("velocity_fn", "options", "to_image", "num_absent"))
def _dopri5_segment(velocity_fn: VelocityFn, args, states, t0, t1, h0, rtol, atol, *, options: Dopri5Options,
                    to_image=None, num_absent: int = 0):
    """Dopri5 from t0 to t1 with per-sample time and step size (shared when not options.per_sample).

    states: the active scales, finest first, [B, ...]; h0: [B] first step tried per sample.
    Returns (states at t1, h [B] to carry into the next segment, stats): stats holds "batch_nfe"
    (evaluations the batch paid: 1 + 6 per loop iteration), "nfe" [B] (evaluations while each
    sample was still integrating), "accepted"/"rejected" [B], and "accepted_t"/"rejected_t"
    [B, time_bins]: the steps attempted, by the global-time bin they start in.
    """
    batch = states[0].shape[0]
    dtype = states[0].dtype
    bins = options.time_bins
    f = lambda ys, t: velocity_fn(args, ys, t.astype(dtype))
    norm = functools.partial(_scaled_rms, rtol=rtol, atol=atol, to_image=to_image, num_absent=num_absent,
                             row_by_row=options.per_sample)
    # Time and step sizes in the states' dtype (float64 under jax_enable_x64).
    t_start = jnp.full((batch,), t0, dtype)
    zeros_b = jnp.zeros((batch,), jnp.int32)
    init = dict(t=t_start, h=jnp.asarray(h0, dtype), y=list(states), k1=f(states, t_start),
                h_carry=jnp.asarray(h0, dtype), iters=jnp.zeros((), jnp.int32), nfe=zeros_b + 1,
                accepted=zeros_b, rejected=zeros_b, accepted_t=jnp.zeros((batch, bins), jnp.int32),
                rejected_t=jnp.zeros((batch, bins), jnp.int32))

    def cond(c):
        return jnp.any(c["t"] < t1) & (c["iters"] < options.max_steps)

    def body(c):
        t, h, y = c["t"], c["h"], c["y"]
        active = t < t1
        clipped = h >= t1 - t
        step = jnp.where(active, jnp.minimum(h, t1 - t), 0.0)
        ks = [c["k1"]]
        for i in range(1, 6):
            yi = [x + sum(_per_sample(step * a, k[n]) for a, k in zip(_DP_A[i], ks) if a)
                  for n, x in enumerate(y)]
            ks.append(f(yi, t + _DP_C[i] * step))
        y5 = [x + sum(_per_sample(step * b, k[n]) for b, k in zip(_DP_B, ks) if b) for n, x in enumerate(y)]
        ks.append(f(y5, t + step))
        err = [sum(_per_sample(step * e, k[n]) for e, k in zip(_DP_E, ks) if e) for n in range(len(y))]
        ratio = norm(err, y, y5)
        if not options.per_sample:
            # One step for the batch: the RMS over all samples' elements (equal counts per sample).
            ratio = jnp.full_like(ratio, jnp.sqrt(jnp.mean(jnp.square(ratio))))
        accept = active & (ratio < 1)
        # diffrax's I controller (PIDController defaults): safety * ratio^(-1/5), never shrinking
        # after an accepted step, never growing after a rejected one.
        factor = jnp.clip(options.safety * jnp.where(ratio > 0, ratio, 1e-10) ** -0.2,
                          jnp.where(accept, 1.0, options.factor_min),
                          jnp.where(accept, options.factor_max, options.safety))
        h_next = jnp.where(active, step * factor, h)
        # The segment end, not the error, cut a step short: carry the step it was cut from.
        carry = jnp.where(accept & clipped, jnp.maximum(h_next, h), h_next)
        keep = lambda new, old: [jnp.where(accept.reshape((-1,) + (1,) * (o.ndim - 1)), n, o)
                                 for n, o in zip(new, old)]
        which = jnp.clip((t * bins).astype(jnp.int32), 0, bins - 1)
        hit = jax.nn.one_hot(which, bins, dtype=jnp.int32)
        return dict(t=jnp.where(accept, jnp.where(clipped, t1, t + step), t), h=h_next,
                    y=keep(y5, y), k1=keep(ks[-1], c["k1"]),
                    h_carry=jnp.where(accept, carry, c["h_carry"]), iters=c["iters"] + 1,
                    nfe=c["nfe"] + 6 * active, accepted=c["accepted"] + accept,
                    rejected=c["rejected"] + (active & ~accept),
                    accepted_t=c["accepted_t"] + hit * accept[:, None],
                    rejected_t=c["rejected_t"] + hit * (active & ~accept)[:, None])

    out = jax.lax.while_loop(cond, body, init)
    stats = {k: out[k] for k in ("nfe", "accepted", "rejected", "accepted_t", "rejected_t")}
    stats["batch_nfe"] = 1 + 6 * out["iters"]
    return out["y"], out["h_carry"], stats


@functools.partial(jax.jit, static_argnames=("velocity_fn", "initial_steps", "max_steps"))
def dopri5_dense(velocity_fn: VelocityFn, args, states, t0, t1, rtol, atol, *, initial_steps: int,
                 max_steps: int = 256):
    """Adaptive Dopri5 from t0 to t1 (t1 < t0 runs backwards) with dense output.

    Returns (interpolation, nfe): `interpolation.evaluate(t)` gives the tuple of states at any t in
    the interval (Dopri5's 4th-order interpolant, accurate to about the solver's tolerance), and
    may be passed to jitted code as an argument (it is a pytree of arrays). The dense output is
    allocated for max_steps steps up front (about 9 states each; 100,000 as `sample` allows would
    be tens of GB), so it is kept small: these flows take tens of steps at the usual tolerances,
    and a solve that needs more fails with diffrax's max_steps error instead of running out of memory.
    """
    batch = states[0].shape[0]
    term = diffrax.ODETerm(lambda t, y, a: tuple(velocity_fn(a, list(y), _broadcast_time(t, batch, y[0].dtype))))
    solution = diffrax.diffeqsolve(
        term, diffrax.Dopri5(), t0=t0, t1=t1, dt0=(t1 - t0) / initial_steps, y0=tuple(states), args=args,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(dense=True), max_steps=max_steps)
    return solution.interpolation, 1 + 6 * solution.stats["num_steps"]


def integrate_segment(velocity_fn: VelocityFn, args, states, t0: float, t1: float, *, method: str, num_steps: int,
                      rtol: float = 1e-3, atol: float = 1e-3) -> tuple[list[jax.Array], int]:
    """One segment as `sample` integrates it: (states at t1, NFE). For callers that assemble their
    own segments (conditional.py); num_steps is the initial step count for dopri5, which runs as the
    library reference does (one step size for the batch, the state norm, a cold start), the
    behaviour conditional sampling's dense-output inversion is paired with."""
    if method == "dopri5":
        h0 = jnp.full((states[0].shape[0],), (t1 - t0) / num_steps, states[0].dtype)
        final, _, stats = _dopri5_segment(velocity_fn, args, states, t0, t1, h0, rtol, atol,
                                          options=DOPRI5_RESTART)
        return final, int(stats["batch_nfe"])
    final = _fixed_step_segment(velocity_fn, args, states, t0, t1, method=method, num_steps=num_steps)
    return final, num_steps * (1 if method == "euler" else 2)


def segment_program(velocity_fn: VelocityFn, args, states, t0: float, t1: float, *, method: str, num_steps: int,
                    rtol: float = 1e-3, atol: float = 1e-3) -> jax.stages.Lowered:
    """The program `sample` runs for one segment, lowered for these (possibly abstract) inputs:
    for ahead-of-time compile checks. Arguments as `sample`; states are the active scales'."""
    if method == "dopri5":
        h0 = jnp.full((states[0].shape[0],), (t1 - t0) / num_steps, states[0].dtype)
        return _dopri5_segment.lower(velocity_fn, args, states, t0, t1, h0, rtol, atol, options=Dopri5Options())
    return _fixed_step_segment.lower(velocity_fn, args, states, t0, t1, method=method, num_steps=num_steps)


@functools.partial(jax.jit, static_argnames=("velocity_fn", "path"))
def _preview(velocity_fn: VelocityFn, args, states, t, *, path: MultiScalePath):
    t = _broadcast_time(t, states[0].shape[0], states[0].dtype)
    v = velocity_fn(args, states, t)
    return [path.predict_clean(x, vel, t) for x, vel in zip(states, v)]


def sample(velocity_fn: VelocityFn, args, path: MultiScalePath, noise: Sequence[jax.Array], *,
           method: str = "heun", steps: Sequence[int] | int = 50, rtol: float = 1e-3, atol: float = 1e-3,
           previews: bool = False, dopri5: Dopri5Options = Dopri5Options(), to_image=None) -> SampleResult:
    """Integrates the multi-scale ODE from noise (t = 0) to data (t = 1).

    Args:
      velocity_fn: pure velocity function (see module docstring); must be hashable (a plain
        function or functools.partial of hashables) since it is a static jit argument.
      args: pytree passed to velocity_fn unchanged (parameters, labels).
      path: the multi-scale path (windows and path kind).
      noise: standard normal noise per scale, finest first, [B, H/2^k, W/2^k, C]; scale k enters
        at its window start as `path.entry_noise_scale(k) * noise[k]`.
      method: "euler", "heun" or "dopri5" (adaptive, the paper's).
      steps: fixed steps per segment (a sequence, in time order) or a total split in proportion to
        segment lengths; for dopri5 the initial step count per segment.
      rtol, atol: dopri5 tolerances.
      dopri5: how dopri5 crosses window starts and measures its error (`Dopri5Options`).
      to_image: for dopri5's "image" error norm, the linear map from all scales (finest first,
        normalised) to the image, e.g. de-normalise and reconstruct; a static jit argument, so
        hashable and the same object call after call (see `image_fn`). None: the norm falls back
        to "state" (RMS over the normalised scales).
      previews: also return the clean-image estimate at each segment end.

    Returns:
      SampleResult with the final residuals and the NFE per segment.
    """
    if method not in METHODS:
        raise ValueError(f"sampling method {method!r} is not one of {METHODS}.")
    if len(noise) != path.num_scales:
        raise ValueError(f"got noise for {len(noise)} scales; the path has {path.num_scales}.")
    segments = path.segments()
    per_segment = steps_per_segment(path, steps) if isinstance(steps, int) else tuple(int(s) for s in steps)
    if len(per_segment) != len(segments) or min(per_segment) < 1:
        raise ValueError(f"steps per segment {per_segment} must be {len(segments)} positive integers.")

    states: list[jax.Array] = []
    nfes, boundary_previews, stats = [], [], []
    h = None
    image = to_image if dopri5.error_norm == "image" else None
    for (t0, t1, finest), n in zip(segments, per_segment):
        # The scale joining at t0 enters as noise scaled as the path says (alpha = 0 there).
        states = [path.entry_noise_scale(finest) * noise[finest]] + states
        if method == "dopri5":
            if h is None or not dopri5.carry_step:
                h = jnp.full((noise[0].shape[0],), (t1 - t0) / n, noise[0].dtype)
            h_start = h
            # carry_step acts here, between segments: leave it out of the segment's (static)
            # options so that carrying or not runs the same compiled program.
            states, h, seg = _dopri5_segment(velocity_fn, args, states, t0, t1, h, rtol, atol,
                                             options=dataclasses.replace(dopri5, carry_step=False),
                                             to_image=image, num_absent=finest)
            nfes.append(int(seg.pop("batch_nfe")))
            stats.append({**jax.tree.map(np.asarray, seg), "h_start": np.asarray(h_start)})
        else:
            states, nfe = integrate_segment(velocity_fn, args, states, t0, t1, method=method, num_steps=n)
            nfes.append(nfe)
        if previews:
            # At t = 1 the state is the sample itself; elsewhere ask the model for x1's estimate.
            clean = states if t1 >= 1.0 else _preview(velocity_fn, args, states, t1, path=path)
            boundary_previews.append([jnp.zeros_like(noise[k]) for k in range(finest)] + list(clean))
    return SampleResult(residuals=states, nfe_per_segment=tuple(nfes), segments=segments,
                        previews=boundary_previews if previews else None,
                        dopri5_stats=stats if method == "dopri5" else None)


@functools.lru_cache(maxsize=None)
def image_fn(sigmas: tuple[float, ...], up: str) -> Callable[[list[jax.Array]], jax.Array]:
    """De-normalise (per-scale sigmas) and reconstruct: the `to_image` of `sample`. Cached, so the
    same settings give the same (hashable) function and dopri5 compiles once."""
    return functools.partial(_image, tuple(float(x) for x in sigmas), up)


def _image(sigmas, up, residuals):
    return pyramid.reconstruct(pyramid.denormalize(list(residuals), sigmas), up=up)


# --- Model velocity functions -------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def model_velocity_fn(graphdef: nnx.GraphDef) -> VelocityFn:
    """Pure velocity function of an NNX model: args = (model_state, labels or None).

    Cached, so the same graph gives the same (hashable) function and samplers never recompile.
    """
    return functools.partial(_model_velocity, graphdef)


def _model_velocity(graphdef, args, states, t):
    model_state, labels = args
    model = nnx.merge(graphdef, model_state)
    return model(states, t, labels)


@functools.lru_cache(maxsize=None)
def in_chunks(velocity_fn: VelocityFn, rows_per_shard: int) -> VelocityFn:
    """The same field, evaluated `rows_per_shard` samples per data shard at a time (lax.map).

    args = (model_state, labels [B] or None); B must divide by rows_per_shard times the shards (the
    data-parallel chips of the `parallel.activation_sharding` mesh it is traced under, else 1). Each call
    then sees a batch of the same shape whatever B is, so a sample's velocity comes from the same
    compiled code and is the same bits at any sample batch: XLA picks a dot's vectorisation by
    its shape, and the same row of a batch of 4 and one of 16 can differ in the last bit. On a
    mesh, chunk j takes rows j*n..(j+1)*n of every shard's block, so no row leaves its device.
    Also bounds a big sample batch's activation memory.
    """
    return functools.partial(_velocity_in_chunks, velocity_fn, int(rows_per_shard))


def _velocity_in_chunks(velocity_fn, rows, args, states, t):
    model_state, labels = args
    mesh = parallel.active_mesh()
    shards = 1 if mesh is None else parallel.data_size(mesh)
    batch = t.shape[0]
    if batch % (rows * shards):
        raise ValueError(f"sampling batch {batch} does not divide into chunks of {rows} rows per data shard "
                         f"(config.sample.rows_per_call) on {shards} shard(s).")
    calls = batch // (rows * shards)
    # [B, ...] = [shards, calls, rows, ...] in memory order -> [calls, shards * rows, ...].
    split = lambda x: (x.reshape((shards, calls, rows) + x.shape[1:]).swapaxes(0, 1)
                       .reshape((calls, shards * rows) + x.shape[1:]))
    merge = lambda x: (x.reshape((calls, shards, rows) + x.shape[2:]).swapaxes(0, 1)
                       .reshape((batch,) + x.shape[2:]))
    one_call = lambda chunk: velocity_fn((model_state, chunk[2]), chunk[0], chunk[1])
    out = jax.lax.map(one_call, ([split(x) for x in states], split(t), None if labels is None else split(labels)))
    return [merge(v) for v in out]


@functools.lru_cache(maxsize=None)
def guided_velocity_fn(graphdef: nnx.GraphDef, guidance_scale: float, null_class: int) -> VelocityFn:
    """Classifier-free guidance: v = v_null + s (v_cond - v_null), one model call on 2B.

    args = (model_state, labels [B]). guidance_scale 1 is the plain conditional model.
    """
    return functools.partial(_guided_velocity, graphdef, float(guidance_scale), int(null_class))


def _guided_velocity(graphdef, scale, null_class, args, states, t):
    model_state, labels = args
    model = nnx.merge(graphdef, model_state)
    # Checked while tracing (shapes are static): an out-of-range index would be clamped by JAX
    # and guidance would silently use the last real class as "null".
    rows = model.class_embed.shape[0] if hasattr(model, "class_embed") else 0
    if rows <= null_class:
        raise ValueError(f"classifier-free guidance needs the null class {null_class}, but the model's class "
                         f"embedding has {rows} rows (trained with config.model.class_dropout=0); sample with "
                         "config.sample.guidance_scale=1.0.")
    doubled = [jnp.concatenate([x, x]) for x in states]
    both = jnp.concatenate([labels, jnp.full_like(labels, null_class)])
    out = model(doubled, jnp.concatenate([t, t]), both)
    batch = labels.shape[0]
    return [v[batch:] + scale * (v[:batch] - v[batch:]) for v in out]

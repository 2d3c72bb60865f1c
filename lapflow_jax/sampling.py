"""Segment-by-segment ODE samplers for the multi-scale path.

Global time runs from 0 (noise) to 1 (data). The window starts cut [0, 1] into segments; on each
segment a fixed set of scales is active (the coarsest alone first, each finer scale joining at its
window start as fresh, suitably scaled noise). Every velocity call sees only the active scales,
which is where LapFlow saves compute. Each segment is one compiled integration (a `fori_loop` for
Euler and Heun, `diffrax.diffeqsolve` with Dopri5 for the adaptive solver), so a model with L scales
compiles L programs, once.

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
from flax import nnx

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
    """

    residuals: list[jax.Array]
    nfe_per_segment: tuple[int, ...]
    segments: list[tuple[float, float, int]]
    previews: list[list[jax.Array]] | None = None


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
def _dopri5_segment(velocity_fn: VelocityFn, args, states, t0, t1, rtol, atol, *, initial_steps: int):
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
    own segments (conditional.py); num_steps is the initial step count for dopri5."""
    if method == "dopri5":
        final, nfe = _dopri5_segment(velocity_fn, args, states, t0, t1, rtol, atol, initial_steps=num_steps)
        return final, int(nfe)
    final = _fixed_step_segment(velocity_fn, args, states, t0, t1, method=method, num_steps=num_steps)
    return final, num_steps * (1 if method == "euler" else 2)


def segment_program(velocity_fn: VelocityFn, args, states, t0: float, t1: float, *, method: str, num_steps: int,
                    rtol: float = 1e-3, atol: float = 1e-3) -> jax.stages.Lowered:
    """The program `sample` runs for one segment, lowered for these (possibly abstract) inputs:
    for ahead-of-time compile checks. Arguments as `sample`; states are the active scales'."""
    if method == "dopri5":
        return _dopri5_segment.lower(velocity_fn, args, states, t0, t1, rtol, atol, initial_steps=num_steps)
    return _fixed_step_segment.lower(velocity_fn, args, states, t0, t1, method=method, num_steps=num_steps)


@functools.partial(jax.jit, static_argnames=("velocity_fn", "path"))
def _preview(velocity_fn: VelocityFn, args, states, t, *, path: MultiScalePath):
    t = _broadcast_time(t, states[0].shape[0], states[0].dtype)
    v = velocity_fn(args, states, t)
    return [path.predict_clean(x, vel, t) for x, vel in zip(states, v)]


def sample(velocity_fn: VelocityFn, args, path: MultiScalePath, noise: Sequence[jax.Array], *,
           method: str = "heun", steps: Sequence[int] | int = 50, rtol: float = 1e-3, atol: float = 1e-3,
           previews: bool = False) -> SampleResult:
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
    nfes, boundary_previews = [], []
    for (t0, t1, finest), n in zip(segments, per_segment):
        # The scale joining at t0 enters as noise scaled as the path says (alpha = 0 there).
        states = [path.entry_noise_scale(finest) * noise[finest]] + states
        states, nfe = integrate_segment(velocity_fn, args, states, t0, t1, method=method, num_steps=n,
                                        rtol=rtol, atol=atol)
        nfes.append(nfe)
        if previews:
            # At t = 1 the state is the sample itself; elsewhere ask the model for x1's estimate.
            clean = states if t1 >= 1.0 else _preview(velocity_fn, args, states, t1, path=path)
            boundary_previews.append([jnp.zeros_like(noise[k]) for k in range(finest)] + list(clean))
    return SampleResult(residuals=states, nfe_per_segment=tuple(nfes), segments=segments,
                        previews=boundary_previews if previews else None)


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

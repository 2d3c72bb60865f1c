"""The LapFlow training loss over static per-stage sub-batches.

Stage f trains the model with scales f..L-1 present (f is the finest included scale) at times
t ~ U[T_f, 1). The global batch is cut into one fixed-size sub-batch per stage, so every shape is
static and all stages run in one compiled step. With one scale this is plain rectified-flow
matching (SiT's linear path with a velocity target).

    loss = sum_f (b_f / B) * sum_{k >= f} w_k * mean (v_theta^(k) - target^(k))^2

where the mean runs over the sub-batch and all of the scale's elements.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from lapflow_jax import paths
from lapflow_jax.paths import MultiScalePath

# (states finest first, t [B], labels [B] or None) -> velocities finest first.
VelocityModel = Callable[[list[jax.Array], jax.Array, jax.Array | None], list[jax.Array]]
# One stage's model inputs: (states of scales f..L-1 finest first, t [b_f], labels [b_f] or None).
StageInputs = tuple[list[jax.Array], jax.Array, "jax.Array | None"]


def stagewise(model: VelocityModel) -> Callable[[Sequence[StageInputs]], list[list[jax.Array]]]:
    """Any velocity model as a function of all stages' inputs, one call per stage. The MoT's own
    `MoT.stages` takes them in one pass through its blocks instead (each weight read once)."""
    return lambda stages: [model(states, t, labels) for states, t, labels in stages]


def drop_labels(rng: jax.Array, labels: jax.Array, drop_prob: float, null_class: int) -> jax.Array:
    """Replaces each label by the null class with probability drop_prob (for CFG). [B] -> [B]."""
    if drop_prob <= 0:
        return labels
    drop = jax.random.uniform(rng, labels.shape) < drop_prob
    return jnp.where(drop, null_class, labels)


def multiscale_loss(model: VelocityModel, residuals: Sequence[jax.Array], labels: jax.Array | None,
                    rng: jax.Array, path: MultiScalePath, stage_sizes: Sequence[int],
                    scale_weights: Sequence[float]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow-matching loss of one batch.

    Args:
      model: the velocity model (any callable with the MoT's signature). A model with a `stages`
        method (the MoT) gets all stages' sub-batches in one call, so each of its weights is read
        (and, under FSDP, gathered) once per step rather than once per stage.
      residuals: normalised pyramid scales of the clean batch, finest first, [B, H/2^k, W/2^k, C].
      labels: [B] class ids (already label-dropped) or None.
      rng: a key for this step (fold the step in before calling).
      path: the multi-scale path.
      stage_sizes: static sub-batch size per stage f = 0..L-1; sums to B.
      scale_weights: w_k per scale, finest first.

    Returns:
      (scalar loss, metrics) where metrics holds "loss", "loss_scale{k}" (the weighted average of
      scale k's squared error over the stages that include it) and "loss_stage{f}".
    """
    num_scales = path.num_scales
    batch = residuals[0].shape[0]
    if sum(stage_sizes) != batch:
        raise ValueError(f"stage sizes {tuple(stage_sizes)} sum to {sum(stage_sizes)}, not the batch {batch}.")
    inputs, targets = [], []
    stage_residuals = [paths.split_stages(r, stage_sizes) for r in residuals]   # [scale k][stage f]
    stage_labels = None if labels is None else paths.split_stages(labels, stage_sizes)
    for f, size in enumerate(stage_sizes):
        stage_rng = jax.random.fold_in(rng, f)
        time_rng, *noise_rngs = jax.random.split(stage_rng, num_scales + 1)
        t = path.sample_times(time_rng, f, size)
        clean = [stage_residuals[k][f] for k in range(f, num_scales)]
        noise = [jax.random.normal(noise_rngs[k], x.shape, x.dtype) for k, x in zip(range(f, num_scales), clean)]
        states = [path.noisy_state(x, e, t, k) for k, x, e in zip(range(f, num_scales), clean, noise)]
        inputs.append((states, t, None if labels is None else stage_labels[f]))
        targets.append([path.velocity_target(x, e, k) for k, x, e in zip(range(f, num_scales), clean, noise)])
    predicted = model.stages(inputs) if hasattr(model, "stages") else stagewise(model)(inputs)

    total = jnp.zeros((), jnp.float32)
    metrics = {}
    scale_err = [jnp.zeros((), jnp.float32) for _ in range(num_scales)]
    scale_count = [0] * num_scales
    for f, (size, stage_targets, stage_predicted) in enumerate(zip(stage_sizes, targets, predicted)):
        stage_loss = jnp.zeros((), jnp.float32)
        for k, target, v in zip(range(f, num_scales), stage_targets, stage_predicted):
            err = jnp.mean(jnp.square(v.astype(jnp.float32) - target.astype(jnp.float32)))
            stage_loss = stage_loss + scale_weights[k] * err
            scale_err[k] = scale_err[k] + size * err
            scale_count[k] += size
        metrics[f"loss_stage{f}"] = stage_loss
        total = total + (size / batch) * stage_loss
    for k in range(num_scales):
        metrics[f"loss_scale{k}"] = scale_err[k] / scale_count[k]
    metrics["loss"] = total
    return total, metrics

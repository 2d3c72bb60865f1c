"""From a trained model to images: noise -> multi-scale ODE -> de-normalise -> reconstruct.

Also the PNG grid writers used by training and the sample mode. On a mesh the batch is sharded
over 'data' (noise is made on the devices, in slices); the model parameters keep whatever
sharding they were restored with.

Sample i of a run depends on (seed, i) alone: its noise is drawn from fold_in(key, i), and its
label too (config.eval.labels="random"), whatever the batch it falls in, the batch size or the
mesh. So a resumed or re-batched run makes the same images (to float rounding, and bitwise where
the sampler's arithmetic per sample is the same).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from lapflow_jax import parallel, pyramid, sampling
from lapflow_jax.paths import MultiScalePath


@dataclasses.dataclass
class Generated:
    """images: [N, H, W, C] float32 in about [-1, 1] (host numpy, the whole batch on every process).

    nfe_per_segment: model calls per segment, in time order (coarsest-only segment first).
    segments: (t0, t1, finest active scale) per segment.
    previews: if asked for, per segment end the reconstructed clean-image estimate, each
      [N, H, W, C] (finer scales that are not active yet contribute zeros).
    """

    images: np.ndarray
    nfe_per_segment: tuple[int, ...]
    previews: list[np.ndarray] | None
    segments: list[tuple[float, float, int]] | None = None


def path_from_config(config: ml_collections.ConfigDict) -> MultiScalePath:
    return MultiScalePath(tuple(config.window_starts), config.path_kind)


def dopri5_options(config) -> sampling.Dopri5Options:
    """The adaptive solver's treatment of window starts and its error norm (config.sample.dopri5_*)."""
    return sampling.Dopri5Options(carry_step=bool(config.sample.get("dopri5_carry_step", True)),
                                  error_norm=config.sample.get("dopri5_norm", "image"),
                                  per_sample=bool(config.sample.get("dopri5_per_sample", True)))


def velocity_for(config, graphdef: nnx.GraphDef, num_classes: int) -> sampling.VelocityFn:
    """The velocity function sampling uses (classifier-free guided when the config asks for it),
    evaluated config.sample.rows_per_call samples per data shard at a time when that is set (the
    shards: the data-parallel chips of the mesh it is traced under, `model_context`)."""
    if num_classes > 0 and config.sample.guidance_scale != 1.0:
        fn = sampling.guided_velocity_fn(graphdef, config.sample.guidance_scale, num_classes)
    else:
        fn = sampling.model_velocity_fn(graphdef)
    rows = int(config.sample.get("rows_per_call", 0))
    return sampling.in_chunks(fn, rows) if rows else fn


def model_context(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None):
    """Where sampling traces the model: on a mesh, the activation layout training uses (and the
    per-device splash kernel, which the compiler cannot partition by itself)."""
    if mesh is None:
        return contextlib.nullcontext()
    return parallel.activation_sharding(mesh, parallel.logical_rules(config.fsdp))


LABEL_MODES = ("balanced", "random")


@functools.partial(jax.jit, static_argnames=("shapes", "channels", "num_classes", "batch", "sharding", "labels"))
def _noise_and_labels(rng, first_index, *, shapes, channels, num_classes, batch, sharding, labels="balanced"):
    """Per-scale noise [B, h_k, w_k, C] (finest first) and labels [B] (or None), laid out on `sharding`.

    Row i is sample first_index + i: its noise comes from fold_in(rng, first_index + i) alone.
    Labels: "balanced" gives class (first_index + i) mod num_classes (one column per class in
    grids); "random" draws it from the sample's key (ADM and DiT draw FID labels uniformly).
    Generated inside jit with an output sharding, so on a mesh every device makes only its slice
    and every process gets the same global arrays (no host-to-device copy of the batch).
    """
    index = first_index + jnp.arange(batch)
    if sharding is not None:
        index = jax.lax.with_sharding_constraint(index, sharding)
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)
    noise = [jax.vmap(lambda key, k=k, h=h, w=w: jax.random.normal(jax.random.fold_in(key, k), (h, w, channels)))(keys)
             for k, (h, w) in enumerate(shapes)]
    out_labels = None
    if num_classes > 0:
        if labels == "random":
            draw = lambda key: jax.random.randint(jax.random.fold_in(key, len(shapes)), (), 0, num_classes)
            out_labels = jax.vmap(draw)(keys).astype(jnp.int32)
        else:
            out_labels = (index % num_classes).astype(jnp.int32)
    if sharding is not None:
        noise = [jax.lax.with_sharding_constraint(x, sharding) for x in noise]
        out_labels = None if out_labels is None else jax.lax.with_sharding_constraint(out_labels, sharding)
    return noise, out_labels


@functools.partial(jax.jit, static_argnames=("sigmas", "up"))
def _reconstruct(residuals, *, sigmas, up):
    """De-normalise and reconstruct in one compiled program (eager, every op compiles on its own)."""
    return pyramid.reconstruct(pyramid.denormalize(residuals, sigmas), up=up)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole (possibly sharded, possibly multi-process) array as numpy, on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


@dataclasses.dataclass
class OnMesh:
    """A sampled batch still on the devices (sharded over 'data' on a mesh).

    x: [B, H, W, C] reconstructed samples: images in about [-1, 1], or in latent mode the
      autoencoder latents (decode with latents.decode_latents).
    labels: [B] int32 class ids, or None (unconditional).
    nfe_per_segment, segments: as Generated.
    previews: per segment end the reconstructed clean estimate [B, H, W, C] (if asked), like x.
    """

    x: jax.Array
    labels: jax.Array | None
    nfe_per_segment: tuple[int, ...]
    segments: list[tuple[float, float, int]]
    previews: list[jax.Array] | None = None


def sample_on_mesh(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, params: Any, sigmas: Sequence[float],
                   *, image_shape: tuple[int, int, int], num_classes: int, rng: jax.Array, batch: int,
                   mesh: jax.sharding.Mesh | None = None, first_index: int = 0, label_mode: str = "balanced",
                   labels: np.ndarray | None = None, previews: bool = False) -> OnMesh:
    """Samples first_index .. first_index + batch - 1: noise -> multi-scale ODE -> de-normalise ->
    reconstruct, leaving the result on the devices.

    Args:
      config: the experiment config (scales, windows, pyramid filters, config.sample.*).
      graphdef, params: the model (params a pure dict, e.g. the EMA parameters).
      sigmas: per-scale normalisation factors, finest first (from the checkpoint).
      image_shape: (H, W, C) of the finest scale.
      num_classes: 0 for an unconditional model.
      rng: the run's key: sample i's noise (and random label) depends on it and i alone.
      batch: samples to make.
      mesh: shard the batch over its 'data' axis (batch must divide by its size); None: leave the
        placement to JAX (one device).
      first_index: index of this batch's first sample in the run.
      label_mode: "balanced" or "random" (LABEL_MODES), when `labels` is not given.
      labels: [batch] class ids instead.
      previews: also reconstruct the clean-image estimate at every segment end.
    """
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label mode {label_mode!r} is not one of {LABEL_MODES} (config.eval.labels).")
    path = path_from_config(config)
    height, width, channels = image_shape
    shapes = tuple(pyramid.scale_shapes(height, width, config.num_scales))
    sharding = None
    if mesh is not None:
        data = parallel.data_size(mesh)
        if batch % data:
            raise ValueError(f"sampling batch {batch} (config.sample.batch_size) is not divisible by the mesh's "
                             f"data axis ({data} devices).")
        sharding = parallel.batch_sharding(mesh)
    noise, default_labels = _noise_and_labels(rng, first_index, shapes=shapes, channels=channels,
                                              num_classes=num_classes, batch=batch, sharding=sharding,
                                              labels=label_mode)
    if num_classes > 0 and labels is not None:
        labels = jnp.asarray(labels, jnp.int32)
        if labels.shape != (batch,):
            raise ValueError(f"labels have shape {labels.shape}; expected ({batch},).")
        if sharding is not None:
            labels = jax.device_put(labels, sharding)
    else:
        labels = default_labels
    with model_context(config, mesh):
        result = sampling.sample(velocity_for(config, graphdef, num_classes), (params, labels), path, noise,
                                 method=config.sample.method, steps=config.sample.steps, rtol=config.sample.rtol,
                                 atol=config.sample.atol, previews=previews, dopri5=dopri5_options(config),
                                 to_image=sampling.image_fn(tuple(float(s) for s in sigmas), config.pyramid.up))
    sigmas = tuple(float(s) for s in sigmas)

    def reconstruct(residuals):
        x = _reconstruct(list(residuals), sigmas=sigmas, up=config.pyramid.up)
        return x if sharding is None else jax.device_put(x, sharding)

    return OnMesh(x=reconstruct(result.residuals), labels=labels, nfe_per_segment=result.nfe_per_segment,
                  segments=result.segments,
                  previews=[reconstruct(p) for p in result.previews] if previews else None)


def generate(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, params: Any, sigmas: Sequence[float], *,
             image_shape: tuple[int, int, int], num_classes: int, rng: jax.Array,
             labels: np.ndarray | None = None, batch: int, previews: bool = False,
             mesh: jax.sharding.Mesh | None = None, first_index: int = 0) -> Generated:
    """Samples `batch` images (`sample_on_mesh`, balanced labels), decoded in latent mode on the
    devices that made them, and returns them on every process (host numpy)."""
    out = sample_on_mesh(config, graphdef, params, sigmas, image_shape=image_shape, num_classes=num_classes,
                         rng=rng, batch=batch, mesh=mesh, first_index=first_index, labels=labels, previews=previews)

    def to_image(x):
        if config.latent.enabled:  # latent mode: the flow made autoencoder latents; decode them
            from lapflow_jax import latents as latents_lib  # pylint: disable=import-outside-toplevel
            if mesh is None:
                decode, state = latents_lib.decoder(config)
                return to_host(jax.jit(decode)(state, x))
            return to_host(latents_lib.decode_latents(config, x, mesh))
        return to_host(x)

    return Generated(images=to_image(out.x), nfe_per_segment=out.nfe_per_segment,
                     previews=[to_image(p) for p in out.previews] if previews else None,
                     segments=out.segments)


def coarse_to_fine_grid(previews: Sequence[np.ndarray], max_images: int = 8) -> np.ndarray:
    """One row per segment end (coarse only at the top, the final sample at the bottom), one column
    per image: [S, N, H, W, C] estimates -> a uint8 grid."""
    rows = [np.asarray(p)[:max_images] for p in previews]
    return image_grid(np.concatenate(rows, axis=0), columns=rows[0].shape[0])


def grid_columns(num_classes: int, num_images: int) -> int | None:
    """Grid width for samples with the default labels (image i has class i mod num_classes): one
    column per class when the classes fit on a row (one row if there are fewer images than
    classes), else None (a square grid)."""
    return min(num_classes, num_images) if 0 < num_classes <= 20 else None


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """[N, H, W, C] floats in [-1, 1] -> one uint8 [rows*H, cols*W, 3] grid (1 px gaps)."""
    images = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.full((rows * (h + 1) - 1, columns * (w + 1) - 1, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * (h + 1):r * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = img
    return grid


def save_png(path: str | epath.Path, grid: np.ndarray) -> None:
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if grid.ndim == 3 and grid.shape[-1] == 3 and (grid == grid[..., :1]).all():
        grid = grid[..., 0]  # grayscale images: a third of the file
    with path.open("wb") as f:
        Image.fromarray(grid).save(f, format="PNG", optimize=True)

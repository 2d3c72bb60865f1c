"""From a trained model to images: noise -> multi-scale ODE -> de-normalise -> reconstruct.

Also the PNG grid writers used by training and the sample mode. On a mesh the batch is sharded
over 'data' (noise is made on the devices, in slices); the model parameters keep whatever
sharding they were restored with.
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
from jax.sharding import NamedSharding, PartitionSpec as P
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


def velocity_for(config, graphdef: nnx.GraphDef, num_classes: int) -> sampling.VelocityFn:
    """The velocity function sampling uses (classifier-free guided when the config asks for it)."""
    if num_classes > 0 and config.sample.guidance_scale != 1.0:
        return sampling.guided_velocity_fn(graphdef, config.sample.guidance_scale, num_classes)
    return sampling.model_velocity_fn(graphdef)


def model_context(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None):
    """Where sampling traces the model: on a mesh, the activation layout training uses (and the
    per-device splash kernel, which the compiler cannot partition by itself)."""
    if mesh is None:
        return contextlib.nullcontext()
    return parallel.activation_sharding(mesh, parallel.logical_rules(config.fsdp))


@functools.partial(jax.jit, static_argnames=("shapes", "channels", "num_classes", "batch", "sharding"))
def _noise_and_labels(rng, first_index, *, shapes, channels, num_classes, batch, sharding):
    """Per-scale noise [B, h_k, w_k, C] (finest first) and labels [B] (or None), laid out on `sharding`.

    Generated inside jit with an output sharding, so on a mesh every device makes only its slice
    and every process gets the same global arrays (no host-to-device copy of the batch).
    """
    keys = jax.random.split(rng, len(shapes))
    noise = [jax.random.normal(keys[k], (batch, h, w, channels)) for k, (h, w) in enumerate(shapes)]
    labels = None
    if num_classes > 0:
        # Balanced classes over the whole run: image i gets class i mod num_classes.
        labels = ((first_index + jnp.arange(batch)) % num_classes).astype(jnp.int32)
    if sharding is not None:
        noise = [jax.lax.with_sharding_constraint(x, sharding) for x in noise]
        labels = None if labels is None else jax.lax.with_sharding_constraint(labels, sharding)
    return noise, labels


@functools.partial(jax.jit, static_argnames=("sigmas", "up"))
def _reconstruct(residuals, *, sigmas, up):
    """De-normalise and reconstruct in one compiled program (eager, every op compiles on its own)."""
    return pyramid.reconstruct(pyramid.denormalize(residuals, sigmas), up=up)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole (possibly sharded, possibly multi-process) array as numpy, on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def generate(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, params: Any, sigmas: Sequence[float], *,
             image_shape: tuple[int, int, int], num_classes: int, rng: jax.Array,
             labels: np.ndarray | None = None, batch: int, previews: bool = False,
             mesh: jax.sharding.Mesh | None = None, first_index: int = 0) -> Generated:
    """Samples `batch` images: noise -> multi-scale ODE -> de-normalise -> reconstruct.

    Args:
      config: the experiment config (scales, windows, pyramid filters, config.sample.*).
      graphdef, params: the model (params a pure dict, e.g. the EMA parameters).
      sigmas: per-scale normalisation factors, finest first (from the checkpoint).
      image_shape: (H, W, C) of the finest scale.
      num_classes: 0 for an unconditional model.
      rng: key of this batch: the noise depends on it alone.
      labels: [batch] class ids; default: (first_index + i) mod num_classes, balanced classes.
      batch: images to make.
      previews: also reconstruct the clean-image estimate at every segment end.
      mesh: shard the batch over its 'data' axis (batch must divide by its size); None: leave the
        placement to JAX (one device).
      first_index: index of this batch's first image in the run (for the default labels).
    """
    path = path_from_config(config)
    height, width, channels = image_shape
    shapes = tuple(pyramid.scale_shapes(height, width, config.num_scales))
    sharding = None
    if mesh is not None:
        data = mesh.shape["data"]
        if batch % data:
            raise ValueError(f"sampling batch {batch} (config.sample.batch_size) is not divisible by the mesh's "
                             f"data axis ({data} devices).")
        sharding = NamedSharding(mesh, P("data"))
    noise, default_labels = _noise_and_labels(rng, first_index, shapes=shapes, channels=channels,
                                              num_classes=num_classes, batch=batch, sharding=sharding)
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
                                 atol=config.sample.atol, previews=previews)
    sigmas = tuple(float(s) for s in sigmas)

    def to_image(residuals):
        x = to_host(_reconstruct(list(residuals), sigmas=sigmas, up=config.pyramid.up))
        if config.latent.enabled:  # latent mode: the flow made autoencoder latents; decode them
            from lapflow_jax import latents as latents_lib  # pylint: disable=import-outside-toplevel
            x = latents_lib.decode_latents(config, x)
        return x

    return Generated(images=to_image(result.residuals), nfe_per_segment=result.nfe_per_segment,
                     previews=[to_image(p) for p in result.previews] if previews else None,
                     segments=result.segments)


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

"""From a trained model to images: noise -> multi-scale ODE -> de-normalise -> reconstruct.

Also the PNG grid writer used by training and the sample mode.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image

from lapflow_jax import pyramid, sampling
from lapflow_jax.paths import MultiScalePath


@dataclasses.dataclass
class Generated:
    """images: [N, H, W, C] float32 in about [-1, 1]; previews: per segment end, the same shape."""

    images: np.ndarray
    nfe_per_segment: tuple[int, ...]
    previews: list[np.ndarray] | None


def path_from_config(config: ml_collections.ConfigDict) -> MultiScalePath:
    return MultiScalePath(tuple(config.window_starts), config.path_kind)


def velocity_for(config, graphdef: nnx.GraphDef, num_classes: int) -> sampling.VelocityFn:
    if num_classes > 0 and config.sample.guidance_scale != 1.0:
        return sampling.guided_velocity_fn(graphdef, config.sample.guidance_scale, num_classes)
    return sampling.model_velocity_fn(graphdef)


def generate(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, params: Any, sigmas: Sequence[float], *,
             image_shape: tuple[int, int, int], num_classes: int, rng: jax.Array,
             labels: np.ndarray | None = None, batch: int, previews: bool = False) -> Generated:
    """Samples `batch` images. Labels default to a cycle over the classes (class models only)."""
    path = path_from_config(config)
    height, width, channels = image_shape
    shapes = pyramid.scale_shapes(height, width, config.num_scales)
    keys = jax.random.split(rng, config.num_scales)
    noise = [jax.random.normal(keys[k], (batch, h, w, channels)) for k, (h, w) in enumerate(shapes)]
    if num_classes > 0:
        labels = jnp.asarray(np.arange(batch) % num_classes if labels is None else labels, jnp.int32)
    else:
        labels = None
    result = sampling.sample(velocity_for(config, graphdef, num_classes), (params, labels), path, noise,
                             method=config.sample.method, steps=config.sample.steps, rtol=config.sample.rtol,
                             atol=config.sample.atol, previews=previews)
    sigmas = tuple(float(s) for s in sigmas)

    def to_image(residuals):
        return np.asarray(pyramid.reconstruct(pyramid.denormalize(residuals, sigmas), up=config.pyramid.up))

    return Generated(images=to_image(result.residuals), nfe_per_segment=result.nfe_per_segment,
                     previews=[to_image(p) for p in result.previews] if previews else None)


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
    with path.open("wb") as f:
        Image.fromarray(grid).save(f, format="PNG")

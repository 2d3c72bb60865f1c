"""The upsample mode: super-resolution (or variations) of the user's images with a trained model.

    python -m lapflow_jax.main --config=configs/demo.py --workdir=workdirs/demo --mode=upsample \
        --config.upsample.input=low_res/ --config.upsample.samples_per_image=4

Reads config.upsample.input, a folder of images (PNG/JPEG, any mode, converted to the model's
channels) or an .npz (`images` or `arr_0`, uint8 [N, h, w, C]), at 1/2 or 1/4 (...) of the model's
image size: the factor is the ratio, and a 2^m x upsample needs m + 1 scales. Each image's coarse
scales are kept and its m finer scales sampled (conditional.py, docs/method.md), k =
samples_per_image times, then projected so that downsampling the output gives the input exactly.
With config.upsample.variation_t0 > 0 the inputs are full-size images instead: their coarse
scales (config.upsample.factor) are kept and their fine scales redrawn from t0 (strength 1 - t0).

Writes into <workdir>/upsampled/step<step>/:
  batch<i>.npz    inputs, bicubic and samples (uint8) of batch i, written atomically: a killed run
                  resumes at the first missing batch (settings.json guards the settings);
  images/<i>_<j>.png  sample j of input i, full size;
  grid.png        one row per input (the first config.upsample.grid_images): input (nearest), bicubic,
                  then the k samples;
  upsampled.npz   inputs [N, h, w, C], bicubic [N, H, W, C], samples [N, k, H, W, C] (uint8), and for
                  variations references [N, H, W, C] (the originals, first column of grid.png);
  summary.json    sampler, NFE, seconds per image, max |Down(output) - input| in float and in uint8
                  levels of the written files (area down, uint8 input: 0; the outputs are projected
                  onto the constraint within the pixel range, conditional.project_box, and rounded
                  block by block, conditional.to_uint8_consistent).

config.upsample.split = "test" (any split of config.data), instead of an input, takes the first
config.upsample.num_images images of the model's own data, downsampled with its Down by
config.upsample.factor (0: 2), as the inputs; upsampled.npz then also holds their originals.

Pixel mode only: in latent mode the constraint would hold on the latent's coarse scale, and the
low-resolution input has no latent of its own (not built yet).
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from lapflow_jax import conditional
from lapflow_jax import generate as generate_lib
from lapflow_jax import metrics as metrics_lib
from lapflow_jax import sample as sample_lib
from lapflow_jax.evaluation import npz as npz_lib

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_inputs(path: str | epath.Path, channels: int) -> tuple[np.ndarray, list[str]]:
    """uint8 [N, h, w, channels] images and their names, from a folder (sorted) or an .npz."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config.upsample.input={str(path)!r} does not exist.")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise ValueError(f"config.upsample.input={str(path)!r}: no images ({', '.join(IMAGE_SUFFIXES)}) there.")
        images = []
        for f in files:
            with f.open("rb") as fh:
                img = Image.open(fh).convert("L" if channels == 1 else "RGB")
                images.append(np.asarray(img).reshape(img.size[1], img.size[0], channels))
        if len({im.shape for im in images}) != 1:
            raise ValueError(f"config.upsample.input={str(path)!r}: the images differ in size "
                             f"({sorted({im.shape for im in images})}); give one size.")
        return np.stack(images), [f.stem for f in files]
    arrays = npz_lib.read_npz(path)
    key = "images" if "images" in arrays else "arr_0" if "arr_0" in arrays else None
    if key is None:
        raise ValueError(f"config.upsample.input={str(path)!r} has no `images` or `arr_0` array (has {sorted(arrays)}).")
    images = arrays[key]
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != channels:
        raise ValueError(f"config.upsample.input={str(path)!r}: `{key}` must be uint8 [N, h, w, {channels}], got "
                         f"{images.dtype} {images.shape}.")
    return images, [f"{i:05d}" for i in range(images.shape[0])]


def split_inputs(config: ml_collections.ConfigDict, split: str, sigmas) -> tuple[np.ndarray, list[str], np.ndarray]:
    """config.upsample.split = <name>: the first config.upsample.num_images (0: all) images of
    that split of config.data, area-/filter-downsampled by config.upsample.factor (0: 2) with the
    model's own Down, as uint8 inputs; with their names and the uint8 full-size originals."""
    from lapflow_jax.data import pipeline  # pylint: disable=import-outside-toplevel

    factor = config.upsample.factor or 2
    m = int(round(np.log2(factor)))
    num = int(config.upsample.num_images) or None
    try:
        images, _ = pipeline.read_split(config.data, split, num)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ValueError(f"config.upsample.split={split!r}: cannot read that split of config.data ({e}).") from e
    originals = sample_lib.to_uint8(images)
    constraint = conditional.Constraint(config.num_scales, m, tuple(float(s) for s in sigmas), config.pyramid.down,
                                        config.pyramid.up)
    names = [f"{split}{i:05d}" for i in range(len(originals))]
    if config.upsample.variation_t0 > 0:  # variations take the full-size images themselves
        return originals, names, originals
    low = sample_lib.to_uint8(constraint.down_m(jnp.asarray(sample_lib.from_uint8(originals))))
    return low, names, originals


def unknown_scales(config: ml_collections.ConfigDict, input_shape: tuple[int, int], image_shape: tuple[int, ...]) -> int:
    """m, the number of scales to sample: from the input's size (super-resolution) or
    config.upsample.factor (variations). Errors name the field."""
    cfg = config.upsample
    if cfg.variation_t0 > 0:
        if tuple(input_shape) != tuple(image_shape[:2]):
            raise ValueError(f"config.upsample.variation_t0={cfg.variation_t0}: variations take full-size images "
                             f"{image_shape[:2]}, config.upsample.input has {tuple(input_shape)}.")
        factor = cfg.factor or 2
    else:
        h, w = input_shape
        factor = image_shape[0] // h
        if h * factor != image_shape[0] or w * factor != image_shape[1]:
            raise ValueError(f"config.upsample.input images are {h}x{w}; the model makes {image_shape[0]}x"
                             f"{image_shape[1]}: the ratio must be a power of 2.")
        if cfg.factor and cfg.factor != factor:
            raise ValueError(f"config.upsample.factor={cfg.factor}, but the inputs ({h}x{w}) need {factor}x.")
    m = int(round(np.log2(factor)))
    if 2 ** m != factor or m < 1:
        raise ValueError(f"config.upsample.factor: the upsampling factor {factor} must be 2, 4, ... (a power of 2).")
    if m >= config.num_scales:
        raise ValueError(f"config.upsample.factor: a {factor}x upsample needs more than {m} scales; the model has "
                         f"config.num_scales={config.num_scales}.")
    return m


@functools.partial(jax.jit, static_argnames=("shapes", "channels", "k"))
def _noise(rng, first_index, *, shapes, channels, k):
    """Per unknown scale [B * k, h, w, C]: input i's sample j from fold_in(fold_in(rng, i), j) alone."""
    index = first_index + jnp.arange(shapes[0][0])
    keys = jax.vmap(lambda i: jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(rng, i), j))(jnp.arange(k)))(index)
    keys = keys.reshape(-1)
    out = []
    for s, (_, h, w) in enumerate(shapes[1:]):
        out.append(jax.vmap(lambda key, s=s, h=h, w=w: jax.random.normal(jax.random.fold_in(key, s), (h, w, channels)))(keys))
    return out


def upsample_batch(config: ml_collections.ConfigDict, graphdef, params, sigmas, inputs: np.ndarray, *,
                   num_classes: int, rng: jax.Array, first_index: int, m: int, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray,
                                                                                      conditional.ConditionalResult]:
    """inputs uint8 (or float in [-1, 1]) [B, h, w, C] -> (samples float [B, k, H, W, C], low float
    [B, h', w', C], result). labels: config.upsample.label, or per input [B] when `labels` is given."""
    cfg = config.upsample
    k = int(cfg.samples_per_image)
    x = sample_lib.from_uint8(inputs) if inputs.dtype == np.uint8 else np.asarray(inputs, np.float32)
    constraint = conditional.Constraint(config.num_scales, m, tuple(float(s) for s in sigmas), config.pyramid.down,
                                        config.pyramid.up)
    reference = x if cfg.variation_t0 > 0 else None
    low = constraint.down_m(jnp.asarray(x)) if reference is not None else jnp.asarray(x)
    batch, (h, w, c) = low.shape[0], low.shape[1:]
    shapes = ((batch, 0, 0),) + tuple((batch, h << (m - s), w << (m - s)) for s in range(m))
    noise = _noise(rng, first_index, shapes=shapes, channels=c, k=k)
    if labels is not None:
        labels = jnp.asarray(labels, jnp.int32)
    elif num_classes > 0:
        label = num_classes if cfg.label < 0 else cfg.label  # -1: the null class (trained with class dropout)
        labels = jnp.full((batch,), label, jnp.int32)
    velocity = generate_lib.velocity_for(config, graphdef, num_classes)
    replacement = None
    if cfg.sampler == "replacement":
        replacement = conditional.replacement_noise_like(jax.random.fold_in(jax.random.fold_in(rng, 2**31 - 1), first_index),
                                                         low, constraint, k)
    path = generate_lib.path_from_config(config)
    start = max(float(cfg.variation_t0), path.window_starts[m - 1]) if reference is not None else None
    result = conditional.conditional_sample(
        velocity, (params, None if labels is None else jnp.repeat(labels, k)), path, constraint, low, noise,
        sampler=cfg.sampler, samples_per_input=k, inversion_args=(params, labels), method=config.sample.method,
        steps=config.sample.steps, rtol=config.sample.rtol, atol=config.sample.atol, project_steps=cfg.project_steps,
        replacement_noise=replacement, reference=reference, t_start=start)
    # The nearest consistent image *in the pixel range* (the sampler's projection ignores the range,
    # and the clip of any image file would then break the consistency where it bites).
    images = conditional.project_box(result.images, jnp.repeat(low, k, axis=0), constraint)
    images = np.asarray(images).reshape((batch, k) + result.images.shape[1:])
    return images, np.asarray(low), result


_SETTINGS = ("upsample.input", "upsample.split", "upsample.num_images", "upsample.samples_per_image",
             "upsample.sampler", "upsample.project_steps", "upsample.label", "upsample.variation_t0",
             "upsample.factor", "upsample.batch_size", "sample.method", "sample.steps", "sample.guidance_scale",
             "sample.rtol", "sample.atol", "sample.use_ema", "num_scales", "window_starts", "path_kind", "model")


def upsample_to_dir(config: ml_collections.ConfigDict, setup, params: Any, sigmas: np.ndarray, out_dir, *,
                    seed: int) -> dict[str, Any]:
    """Upsamples config.upsample.input into out_dir (resumable, see the module docstring)."""
    cfg = config.upsample
    if config.latent.enabled:
        raise ValueError("--mode=upsample works in pixel mode only (config.latent.enabled=True): a low-resolution "
                         "image has no latent of its own to condition on.")
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    originals = None
    if cfg.split:
        inputs, names, originals = split_inputs(config, cfg.split, sigmas)
    else:
        inputs, names = read_inputs(cfg.input, setup.image_shape[-1])
        if cfg.num_images:
            inputs, names = inputs[:cfg.num_images], names[:cfg.num_images]
    m = unknown_scales(config, inputs.shape[1:3], setup.image_shape)
    _check_settings(config, out_dir, seed)
    batch, k = int(cfg.batch_size), int(cfg.samples_per_image)
    num_batches = -(-inputs.shape[0] // batch)
    todo = [i for i in range(num_batches) if not (out_dir / f"batch{i:05d}.npz").exists()]
    logging.info("upsampling %d images (%dx, %d samples each, %s%s) in %d batches into %s (%d to do)",
                 inputs.shape[0], 2 ** m, k, cfg.sampler, "+P" if cfg.project_steps else "", num_batches, out_dir,
                 len(todo))
    progress = metrics_lib.Progress("upsampling", len(todo), items_per_batch=batch)
    rng, times, errors, errors_u8, nfe = jax.random.key(seed), [], [], [], None
    for done, i in enumerate(todo, 1):
        part = inputs[i * batch:(i + 1) * batch]
        if part.shape[0] < batch:  # one compiled shape: pad the last batch
            part = np.concatenate([part, np.repeat(part[-1:], batch - part.shape[0], 0)])
        start = time.perf_counter()
        samples, low, result = upsample_batch(config, setup.graphdef, params, sigmas, part,
                                              num_classes=setup.num_classes, rng=rng, first_index=i * batch, m=m)
        times.append(time.perf_counter() - start)
        constraint = conditional.Constraint(config.num_scales, m, tuple(float(s) for s in sigmas),
                                            config.pyramid.down, config.pyramid.up)
        flat_low = np.repeat(low, k, 0)
        errors.append(conditional.consistency_error(samples.reshape((-1,) + samples.shape[2:]), flat_low, constraint))
        samples_u8 = conditional.to_uint8_consistent(samples.reshape((-1,) + samples.shape[2:]), flat_low,
                                                     constraint).reshape(samples.shape)
        errors_u8.append(conditional.uint8_consistency_levels(samples_u8.reshape((-1,) + samples.shape[2:]),
                                                              sample_lib.to_uint8(flat_low), constraint))
        nfe = (result.nfe_inversion, result.nfe_forward)
        factor = samples.shape[2] // low.shape[1]
        extra = {"references": part} if cfg.variation_t0 > 0 else {}  # variations: the full-size originals
        npz_lib.write_npz(out_dir / f"batch{i:05d}.npz", inputs=sample_lib.to_uint8(low),
                          bicubic=sample_lib.to_uint8(conditional.bicubic(low, factor)),
                          samples=samples_u8, **extra)
        progress.update(done, **{"max |D out - in|": f"{errors[-1]:.1e}"})

    parts = [npz_lib.read_npz(out_dir / f"batch{i:05d}.npz") for i in range(num_batches)]
    n = inputs.shape[0]
    arrays = {key: np.concatenate([p[key] for p in parts])[:n] for key in parts[0]}
    if originals is not None:  # inputs made from a data split: the full-size truth, for comparison
        arrays["originals"] = originals
    npz_lib.write_npz(out_dir / "upsampled.npz", **arrays)
    for i, name in enumerate(names):
        for j in range(k):
            generate_lib.save_png(out_dir / "images" / f"{name}_{j}.png",
                                  generate_lib.image_grid(sample_lib.from_uint8(arrays["samples"][i, j:j + 1])))
    generate_lib.save_png(out_dir / "grid.png", comparison_grid(arrays, cfg.grid_images))
    summary = {"num_images": n, "factor": int(arrays["samples"].shape[2] // arrays["inputs"].shape[1]),
               "samples_per_image": k, "sampler": cfg.sampler, "project_steps": bool(cfg.project_steps),
               "variation_t0": float(cfg.variation_t0), "method": config.sample.method, "dir": str(out_dir)}
    if times:
        summary["seconds_first_batch"] = times[0]
        summary["seconds_per_image"] = float(np.mean(times[1:] or times)) / batch
        summary["max_consistency_error"] = float(max(errors))
        summary["max_consistency_error_uint8_levels"] = float(max(errors_u8))
        summary["nfe_inversion"], summary["nfe_forward"] = list(nfe[0]), list(nfe[1])
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logging.info("wrote %d upsampled images (x%d samples) to %s", n, k, out_dir)
    return summary


def comparison_grid(arrays: dict[str, np.ndarray], rows: int) -> np.ndarray:
    """One row per input: input (nearest-upsampled to full size; variations: the original), bicubic
    (of the kept coarse image), the k samples."""
    samples = arrays["samples"][:rows]
    n, k, height = samples.shape[0], samples.shape[1], samples.shape[2]
    reps = height // arrays["inputs"].shape[1]
    nearest = arrays["references"][:n] if "references" in arrays else np.repeat(
        np.repeat(arrays["inputs"][:n], reps, 1), reps, 2)
    tiles = np.concatenate([nearest[:, None], arrays["bicubic"][:n, None], samples], axis=1)
    return generate_lib.image_grid(sample_lib.from_uint8(tiles.reshape((-1,) + tiles.shape[2:])), columns=k + 2)


def _check_settings(config, out_dir: epath.Path, seed: int) -> None:
    now = sample_lib.settings_of(config, _SETTINGS, seed)
    path = out_dir / "settings.json"
    if path.exists():
        before = json.loads(path.read_text())
        diffs = [f"{key}: earlier {before.get(key)!r}, now {v!r}" for key, v in now.items() if before.get(key) != v]
        if diffs:
            raise ValueError(f"{out_dir} holds batches made with other settings:\n  " + "\n  ".join(diffs)
                             + f"\nDelete {out_dir} or restore those config values.")
    else:
        path.write_text(json.dumps(now, indent=2))


def upsample_from_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict[str, Any]:
    """The upsample mode, from checkpoint `step` (default: the latest)."""
    if not config.upsample.input and not config.upsample.split:
        raise ValueError("--mode=upsample needs config.upsample.input (a folder of images or an .npz) or "
                         "config.upsample.split (a split of config.data, e.g. test).")
    setup, step, params, sigmas = sample_lib.restore_for_sampling(config, workdir, step)
    out_dir = epath.Path(workdir) / "upsampled" / f"step{step:07d}"
    summary = upsample_to_dir(config, setup, params, sigmas, out_dir, seed=config.seed + 13)
    summary["step"] = step
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

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

Latent mode (config.latent.enabled): the inputs are still pixel images (H x W = the latent's size
times the autoencoder's factor; config.upsample.split reads config.latent.source). A low-resolution
image has no latent of its own, so it is resized to H x W with the bicubic baseline, clipped to
[-1, 1], encoded as training latents are (latents.encode_images: posterior mean, shift and scaling
factor), and the Down^m of that latent is the known value: the samplers run on the latents with the
exact projection there (max |Down^m(latent out) - y| <= 1e-5), and the outputs are decoded.
In pixels this is not exact (the decoder is not the encoder's inverse, and the bicubic image is
not consistent with the input): summary.json adds max_latent_consistency_error and the decoded
images' max / mean |Down^m(decoded) - input| (max_decoded_consistency_error,
mean_decoded_consistency_error). config.upsample.project_decoded (default True) then projects the
decoded images onto the input's constraint within the pixel range, as pixel mode's outputs are,
so the written files are exactly consistent (max_consistency_error* describe the written files);
False writes the decoder's output, plainly rounded.
"""

from __future__ import annotations

import dataclasses
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
from lapflow_jax import latents as latents_lib
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


def split_inputs(config: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """config.upsample.split = <name>: the first config.upsample.num_images (0: all) images of
    that split of config.data (latent mode: of the pixel dataset config.latent.source),
    area-/filter-downsampled by config.upsample.factor (0: 2) with the model's own Down, as uint8
    inputs; with their names and the uint8 full-size originals."""
    from lapflow_jax.data import pipeline  # pylint: disable=import-outside-toplevel

    factor = config.upsample.factor or 2
    m = int(round(np.log2(factor)))
    num = int(config.upsample.num_images) or None
    data, field = (config.latent.source, "config.latent.source") if config.latent.enabled else (config.data, "config.data")
    try:
        images, _ = pipeline.read_split(data, split, num)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ValueError(f"config.upsample.split={split!r}: cannot read that split of {field} ({e}).") from e
    originals = sample_lib.to_uint8(images)
    names = [f"{split}{i:05d}" for i in range(len(originals))]
    if config.upsample.variation_t0 > 0:  # variations take the full-size images themselves
        return originals, names, originals
    low = sample_lib.to_uint8(pixel_constraint(config, m).down_m(jnp.asarray(sample_lib.from_uint8(originals))))
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


def _conditional(config: ml_collections.ConfigDict, graphdef, params, sigmas, low: jax.Array,
                 reference: jax.Array | None, *, num_classes: int, rng: jax.Array, first_index: int, m: int,
                 labels: np.ndarray | None) -> conditional.ConditionalResult:
    """The conditional samplers in the model's space (pixels, or latents in latent mode).

    low: [B, h, w, C] the known Down^m of the model's input; reference: variations, [B, H, W, C]
    whose known scales are kept (low is then its Down^m). Returns images [B * k, H, W, C] with
    Down^m(images) = low to float rounding (conditional.conditional_sample's final projection)."""
    cfg = config.upsample
    k = int(cfg.samples_per_image)
    constraint = model_constraint(config, sigmas, m)
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
    return conditional.conditional_sample(
        velocity, (params, None if labels is None else jnp.repeat(labels, k)), path, constraint, low, noise,
        sampler=cfg.sampler, samples_per_input=k, inversion_args=(params, labels), method=config.sample.method,
        steps=config.sample.steps, rtol=config.sample.rtol, atol=config.sample.atol, project_steps=cfg.project_steps,
        replacement_noise=replacement, reference=reference, t_start=start)


def model_constraint(config: ml_collections.ConfigDict, sigmas, m: int) -> conditional.Constraint:
    """Down^m = low in the model's space (pixels, or latents), with its pyramid's normalisation."""
    return conditional.Constraint(config.num_scales, m, tuple(float(s) for s in sigmas), config.pyramid.down,
                                  config.pyramid.up)


def pixel_constraint(config: ml_collections.ConfigDict, m: int) -> conditional.Constraint:
    """Down^m = input in pixels. In pixel mode the model's constraint; in latent mode the same
    filters on the decoded images (the sigmas, which only normalise a pyramid's scales, are unused:
    Down^m and the projections do not read them)."""
    return conditional.Constraint(config.num_scales, m, (1.0,) * config.num_scales, config.pyramid.down,
                                  config.pyramid.up)


def upsample_batch(config: ml_collections.ConfigDict, graphdef, params, sigmas, inputs: np.ndarray, *,
                   num_classes: int, rng: jax.Array, first_index: int, m: int, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray,
                                                                                      conditional.ConditionalResult]:
    """Pixel mode: inputs uint8 (or float in [-1, 1]) [B, h, w, C] -> (samples float [B, k, H, W, C],
    low float [B, h', w', C], result). labels: config.upsample.label, or per input [B] when `labels`
    is given. Latent mode: latent_upsample_batch."""
    if config.latent.enabled:
        raise ValueError("upsample_batch is the pixel mode's (config.latent.enabled=True): use latent_upsample_batch.")
    k = int(config.upsample.samples_per_image)
    x = sample_lib.from_uint8(inputs) if inputs.dtype == np.uint8 else np.asarray(inputs, np.float32)
    constraint = model_constraint(config, sigmas, m)
    reference = jnp.asarray(x) if config.upsample.variation_t0 > 0 else None
    low = constraint.down_m(reference) if reference is not None else jnp.asarray(x)
    result = _conditional(config, graphdef, params, sigmas, low, reference, num_classes=num_classes, rng=rng,
                          first_index=first_index, m=m, labels=labels)
    # The nearest consistent image *in the pixel range* (the sampler's projection ignores the range,
    # and the clip of any image file would then break the consistency where it bites).
    images = conditional.project_box(result.images, jnp.repeat(low, k, axis=0), constraint)
    images = np.asarray(images).reshape((low.shape[0], k) + result.images.shape[1:])
    return images, np.asarray(low), result


@dataclasses.dataclass
class LatentBatch:
    """latent_upsample_batch's output. samples: pixels float [B, k, H, W, C], what is written (the
    decoded images, projected onto Down^m = low when config.upsample.project_decoded); decoded: the
    same before that projection; low: the pixel input [B, H/2^m, W/2^m, C] float in [-1, 1];
    latent_low: its latent's Down^m [B, h/2^m, w/2^m, c], the known value y of the latent samplers;
    result: the samplers' output in latent space (images [B * k, h, w, c])."""

    samples: np.ndarray
    decoded: np.ndarray
    low: np.ndarray
    latent_low: np.ndarray
    result: conditional.ConditionalResult


def latent_inputs(config: ml_collections.ConfigDict, inputs: np.ndarray, m: int) -> tuple[jax.Array, jax.Array]:
    """Latent mode: the pixel inputs and their latents. inputs uint8 [B, H/2^m, W/2^m, C] (variations:
    [B, H, W, C]) -> (low float [B, H/2^m, W/2^m, C] in [-1, 1], the latent z [B, h, w, c] whose
    Down^m is the known value y).

    A low-resolution image has no latent of its own: it is resized to the model's pixel size with
    the bicubic baseline (conditional.bicubic) and clipped to [-1, 1] (the encoder was trained on
    images, which are in range), then encoded as training latents are (latents.encode_images:
    posterior mean, shift and scaling factor). Variations encode the full-size input itself."""
    x = jnp.asarray(sample_lib.from_uint8(inputs))
    if config.upsample.variation_t0 > 0:
        return pixel_constraint(config, m).down_m(x), latents_lib.encode_images(config, x)
    full = jnp.clip(jnp.asarray(conditional.bicubic(x, 2 ** m)), -1.0, 1.0)
    return x, latents_lib.encode_images(config, full)


def latent_upsample_batch(config: ml_collections.ConfigDict, graphdef, params, sigmas, inputs: np.ndarray, *,
                          num_classes: int, rng: jax.Array, first_index: int, m: int,
                          labels: np.ndarray | None = None) -> LatentBatch:
    """Latent mode: inputs uint8 [B, H/2^m, W/2^m, C] pixels (variations: [B, H, W, C]) -> LatentBatch.

    The known value is the Down^m of the input's latent (latent_inputs), and the samplers run on the
    latents exactly as in pixel mode: max |Down^m(latent out) - y| <= 1e-5 holds in latent space.
    In pixels it does not: the decoder is not the encoder's inverse and the bicubic image the latent
    came from is not consistent with the input either, so Down^m(decoded) only approximates the
    input (upsample_to_dir reports max and mean |Down^m(decoded) - input|). With
    config.upsample.project_decoded the decoded images are then projected onto Down^m = input
    within the pixel range (conditional.project_box, as pixel mode's outputs are), so that the
    written files are consistent too.
    """
    k = int(config.upsample.samples_per_image)
    low, z = latent_inputs(config, inputs, m)
    reference = z if config.upsample.variation_t0 > 0 else None
    latent_low = model_constraint(config, sigmas, m).down_m(z)
    result = _conditional(config, graphdef, params, sigmas, latent_low, reference, num_classes=num_classes, rng=rng,
                          first_index=first_index, m=m, labels=labels)
    decode, state = latents_lib.decoder(config)
    decoded = jax.jit(decode)(state, result.images)  # [B * k, H, W, C]
    samples = decoded
    if config.upsample.project_decoded:
        samples = conditional.project_box(decoded, jnp.repeat(low, k, axis=0), pixel_constraint(config, m))
    shape = (low.shape[0], k) + decoded.shape[1:]
    return LatentBatch(samples=np.asarray(samples).reshape(shape), decoded=np.asarray(decoded).reshape(shape),
                       low=np.asarray(low), latent_low=np.asarray(latent_low), result=result)


def pixel_shape(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(H, W, C) of the images the model makes: image_shape itself, or in latent mode the latent's
    [h, w] times the autoencoder's factor, with its channels."""
    if not config.latent.enabled:
        return tuple(image_shape)
    ae = latents_lib.autoencoder_config(config)
    f = ae.downsample_factor
    return (image_shape[0] * f, image_shape[1] * f, ae.out_channels)


_SETTINGS = ("upsample.input", "upsample.split", "upsample.num_images", "upsample.samples_per_image",
             "upsample.sampler", "upsample.project_steps", "upsample.label", "upsample.variation_t0",
             "upsample.factor", "upsample.batch_size", "sample.method", "sample.steps", "sample.guidance_scale",
             "sample.rtol", "sample.atol", "sample.use_ema", "num_scales", "window_starts", "path_kind", "model")
# Latent mode also: the autoencoder that encodes the inputs and decodes the samples, and the
# pixel projection (kept apart so that pixel-mode folders written before latent mode still resume).
_LATENT_SETTINGS = ("latent.autoencoder", "latent.dtype", "upsample.project_decoded")


def upsample_to_dir(config: ml_collections.ConfigDict, setup, params: Any, sigmas: np.ndarray, out_dir, *,
                    seed: int) -> dict[str, Any]:
    """Upsamples config.upsample.input into out_dir (resumable, see the module docstring)."""
    cfg = config.upsample
    latent = bool(config.latent.enabled)
    image_shape = pixel_shape(config, setup.image_shape)
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    originals = None
    if cfg.split:
        inputs, names, originals = split_inputs(config, cfg.split)
    else:
        inputs, names = read_inputs(cfg.input, image_shape[-1])
        if cfg.num_images:
            inputs, names = inputs[:cfg.num_images], names[:cfg.num_images]
    m = unknown_scales(config, inputs.shape[1:3], image_shape)
    _check_settings(config, out_dir, seed)
    batch, k = int(cfg.batch_size), int(cfg.samples_per_image)
    num_batches = -(-inputs.shape[0] // batch)
    todo = [i for i in range(num_batches) if not (out_dir / f"batch{i:05d}.npz").exists()]
    logging.info("upsampling %d images (%dx, %d samples each, %s%s%s) in %d batches into %s (%d to do)",
                 inputs.shape[0], 2 ** m, k, cfg.sampler, "+P" if cfg.project_steps else "",
                 ", in latent space" if latent else "", num_batches, out_dir, len(todo))
    progress = metrics_lib.Progress("upsampling", len(todo), items_per_batch=batch)
    constraint = pixel_constraint(config, m)
    rng, times, errors, errors_u8, nfe = jax.random.key(seed), [], [], [], None
    latent_errors, decoded_max, decoded_sum = [], [], 0.0  # latent mode only
    for done, i in enumerate(todo, 1):
        part = inputs[i * batch:(i + 1) * batch]
        real = part.shape[0]
        if real < batch:  # one compiled shape: pad the last batch
            part = np.concatenate([part, np.repeat(part[-1:], batch - part.shape[0], 0)])
        start = time.perf_counter()
        kwargs = dict(num_classes=setup.num_classes, rng=rng, first_index=i * batch, m=m)
        if latent:
            out = latent_upsample_batch(config, setup.graphdef, params, sigmas, part, **kwargs)
            samples, low, result = out.samples, out.low, out.result
        else:
            samples, low, result = upsample_batch(config, setup.graphdef, params, sigmas, part, **kwargs)
        times.append(time.perf_counter() - start)
        flat_low = np.repeat(low, k, 0)
        flat = samples.reshape((-1,) + samples.shape[2:])
        rows = real * k  # the errors leave out the padding rows of the last batch
        errors.append(conditional.consistency_error(flat[:rows], flat_low[:rows], constraint))
        if latent:  # exact on the latent; after decoding, only approximate
            latent_errors.append(conditional.consistency_error(
                result.images[:rows], np.repeat(out.latent_low, k, 0)[:rows], model_constraint(config, sigmas, m)))
            decoded = jnp.asarray(out.decoded.reshape(flat.shape)[:rows])
            miss = np.abs(np.asarray(constraint.down_m(decoded)) - flat_low[:rows])
            decoded_max.append(float(miss.max()))
            decoded_sum += float(miss.mean()) * real
        if latent and not cfg.project_decoded:  # not consistent: block rounding cannot make it so
            samples_u8 = sample_lib.to_uint8(samples)
        else:
            samples_u8 = conditional.to_uint8_consistent(flat, flat_low, constraint).reshape(samples.shape)
        errors_u8.append(conditional.uint8_consistency_levels(samples_u8.reshape(flat.shape)[:rows],
                                                              sample_lib.to_uint8(flat_low[:rows]), constraint))
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
               "variation_t0": float(cfg.variation_t0), "method": config.sample.method, "dir": str(out_dir),
               "latent": latent}
    if latent:
        summary["project_decoded"] = bool(cfg.project_decoded)
    if times:
        summary["seconds_first_batch"] = times[0]
        summary["seconds_per_image"] = float(np.mean(times[1:] or times)) / batch
        summary["max_consistency_error"] = float(max(errors))
        summary["max_consistency_error_uint8_levels"] = float(max(errors_u8))
        summary["nfe_inversion"], summary["nfe_forward"] = list(nfe[0]), list(nfe[1])
        if latent:
            summary["max_latent_consistency_error"] = float(max(latent_errors))
            summary["max_decoded_consistency_error"] = max(decoded_max)
            summary["mean_decoded_consistency_error"] = decoded_sum / sum(
                min(batch, n - i * batch) for i in todo)
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
    now = sample_lib.settings_of(config, _SETTINGS + (_LATENT_SETTINGS if config.latent.enabled else ()), seed)
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

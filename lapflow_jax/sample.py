"""The sample mode: N images from the latest checkpoint, as PNG grids and an .npz, with their cost.

    python -m lapflow_jax.main --config=configs/demo.py --workdir=workdirs/demo --mode=sample \
        --config.sample.num_images=1000 --config.sample.method=dopri5

Writes into <workdir>/generated/step<step>/:
  batch<i>.npz      images uint8 [B, H, W, C] (+ labels [B], previews uint8 [S, B, H, W, C],
                    nfe_per_segment [S]) for batch i; written atomically, so a killed run
                    resumes at the first missing batch;
  samples.npz       all images (`images` uint8 [N, H, W, C], the layout of ADM's reference
                    batches) and `labels`;
  grid.png          the first config.sample.grid_images images;
  coarse_to_fine.png (config.sample.previews) one row per segment end: the clean-image estimate
                    as each finer scale joins, the final samples at the bottom;
  summary.json      NFE per segment, GFLOPs per model call per segment and per sample (XLA cost
                    analysis, see flops.py) beside the single-scale baseline's, wall time.

Image k is made from fold_in(key, k) alone (generate.py), with label k mod num_classes, so a
resumed run makes exactly the images an uninterrupted one would, and the classes are balanced.
Files are written atomically and replace what a killed or earlier run left, so the same command
can run again. The batch is sharded over the mesh's 'data' axis (config.mesh_shape); every
process runs every batch (SPMD) and process 0 writes the files (the eval mode, evaluate.py,
instead keeps each host's rows on that host).
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from lapflow_jax import checkpoint as ckpt_lib
from lapflow_jax import flops as flops_lib
from lapflow_jax import generate as generate_lib
from lapflow_jax import metrics as metrics_lib
from lapflow_jax import parallel
from lapflow_jax import train as train_lib
from lapflow_jax.evaluation import npz as npz_lib


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 (0..255), rounding as PNG writers do."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 (0..255) -> float32 in [-1, 1]."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


def sampling_setup(config: ml_collections.ConfigDict) -> train_lib.Setup:
    """train.make_setup for sampling and evaluation, on config.mesh_shape: the training batch (which
    make_setup checks against the mesh) plays no part here, so a run trained with batch 32 samples
    on a 64-chip slice too. setup.config is a copy with a batch that fits; sample with `config`."""
    mesh = parallel.mesh_for(config)
    fitted = ml_collections.ConfigDict(config.to_dict())
    fitted.train.stage_fractions = None
    fitted.train.global_batch_size = parallel.data_size(mesh) * config.num_scales
    return train_lib.make_setup(fitted, mesh)


def restore_for_sampling(config: ml_collections.ConfigDict, workdir: str | epath.Path, step: int | None = None,
                         setup: train_lib.Setup | None = None):
    """(setup, step, params, sigmas) from checkpoint `step` (default: the latest) in workdir (EMA weights
    by default). A `setup` made earlier for the same config may be passed to reuse its model and mesh."""
    workdir = epath.Path(workdir)
    setup = setup or sampling_setup(config)
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", every_steps=1, keep=config.checkpoint.keep)
    steps = checkpointer.manager.all_steps()
    if step is not None and step not in steps:
        checkpointer.close()
        raise FileNotFoundError(f"--step={step}: no such checkpoint in {workdir / 'checkpoints'} (there: "
                                f"{sorted(steps) or 'none'}).")
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        checkpointer.close()
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}: train first (--mode=train).")
    shardings, abstract = train_lib.state_shardings(setup)
    state = checkpointer.restore_state(step, ckpt_lib.abstract_with_shardings(abstract, shardings))
    checkpointer.close()
    params = train_lib.sampling_params(setup, state)
    return setup, step, params, np.asarray(state.sigmas)


def _missing_batches(out_dir: epath.Path, num_batches: int) -> list[int]:
    """Batches without a file, as process 0 sees them (so every process runs the same batches)."""
    missing = np.array([not (out_dir / f"batch{i:05d}.npz").exists() for i in range(num_batches)], np.int32)
    if jax.process_count() > 1:
        missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
    return [i for i in range(num_batches) if missing[i]]


# What fixes the images of batch i: a resumed run must not mix batches made with other values.
_SETTINGS = ("sample.batch_size", "sample.method", "sample.steps", "sample.guidance_scale", "sample.rtol",
             "sample.atol", "sample.use_ema", "num_scales", "window_starts", "path_kind", "model")


_DOPRI5_SETTINGS = ("dopri5_carry_step", "dopri5_norm", "dopri5_per_sample")
_DOPRI5_BEFORE = {"sample.dopri5_carry_step": False, "sample.dopri5_norm": "state", "sample.dopri5_per_sample": False}


def settings_of(config: ml_collections.ConfigDict, keys, seed: int) -> dict:
    """{"seed": seed, key: the config's value} for dotted keys ("sample.method", "model")."""
    flat = json.loads(config.to_json())
    now = {"seed": seed}
    for key in keys:
        node = flat
        for part in key.split("."):
            node = node[part]
        now[key] = node
    return now


def _check_settings(config: ml_collections.ConfigDict, out_dir: epath.Path, seed: int, primary: bool) -> None:
    """Records the settings in out_dir/settings.json, or checks them against an earlier run's."""
    now = settings_of(config, _SETTINGS, seed)
    if config.sample.method == "dopri5":
        # An earlier dopri5 run without these fields used the old solver (cold restart per segment,
        # state norm, one step for the batch): resuming it with the new one is refused.
        now.update({f"sample.{k}": config.sample[k] for k in _DOPRI5_SETTINGS})
    path = out_dir / "settings.json"
    if path.exists():
        before = json.loads(path.read_text())
        before = {**_DOPRI5_BEFORE, **before} if before.get("sample.method") == "dopri5" else before
        diffs = [f"{k}: earlier {before.get(k)!r}, now {v!r}" for k, v in now.items() if before.get(k) != v]
        if diffs:
            raise ValueError(f"{out_dir} holds batches made with other settings:\n  " + "\n  ".join(diffs)
                             + f"\nDelete {out_dir} or restore those config values.")
    elif primary:
        path.write_text(json.dumps(now, indent=2))


def _write_npz(path: epath.Path, **arrays) -> None:
    """Writes atomically (temporary name, then replace): a killed write never looks finished, and a
    rerun overwrites what an earlier run wrote."""
    npz_lib.write_npz(path, **arrays)


def _read_npz(path: epath.Path) -> dict[str, np.ndarray]:
    with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def generate_to_dir(config: ml_collections.ConfigDict, setup: train_lib.Setup, params: Any, sigmas: np.ndarray,
                    out_dir: str | epath.Path, *, num_images: int, previews: bool, seed: int,
                    grid_images: int = 64) -> dict[str, Any]:
    """Generates `num_images` images into `out_dir` (resumable, see the module docstring).

    Returns the summary (also written to out_dir/summary.json by process 0).
    """
    out_dir = epath.Path(out_dir)
    primary = jax.process_index() == 0
    if primary:
        out_dir.mkdir(parents=True, exist_ok=True)
    batch = int(config.sample.batch_size)
    if num_images < 1 or batch < 1:
        raise ValueError(f"need num_images >= 1 and config.sample.batch_size >= 1, got {num_images} and {batch}.")
    num_batches = -(-num_images // batch)
    _check_settings(config, out_dir, seed, primary)
    base = jax.random.key(seed)
    todo = _missing_batches(out_dir, num_batches)
    logging.info("sampling %d images in %d batches of %d into %s (%d to do, method %s)", num_images, num_batches,
                 batch, out_dir, len(todo), config.sample.method)
    times = []
    progress = metrics_lib.Progress("sampling", len(todo), items_per_batch=batch)
    for done, i in enumerate(todo, 1):
        start = time.perf_counter()
        out = generate_lib.generate(config, setup.graphdef, params, sigmas, image_shape=setup.image_shape,
                                    num_classes=setup.num_classes, rng=base, batch=batch,
                                    previews=previews, mesh=setup.mesh, first_index=i * batch)
        times.append(time.perf_counter() - start)
        if primary:
            arrays = {"images": to_uint8(out.images), "nfe_per_segment": np.asarray(out.nfe_per_segment, np.int64)}
            if setup.num_classes > 0:
                arrays["labels"] = ((i * batch + np.arange(batch)) % setup.num_classes).astype(np.int32)
            if out.previews is not None:
                arrays["previews"] = to_uint8(np.stack(out.previews))
            _write_npz(out_dir / f"batch{i:05d}.npz", **arrays)
        progress.update(done, **{"NFE per segment": "/".join(str(int(n)) for n in out.nfe_per_segment)})

    # Every process reads the finished set back (process 0 wrote it; others wait at the barrier).
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lapflow_sample_batches_written")
    parts = [_read_npz(out_dir / f"batch{i:05d}.npz") for i in range(num_batches)]
    images = np.concatenate([p["images"] for p in parts])[:num_images]
    nfes = np.stack([p["nfe_per_segment"] for p in parts])
    summary: dict[str, Any] = {
        "num_images": int(images.shape[0]), "batch_size": batch, "method": config.sample.method,
        "steps": config.sample.steps, "guidance_scale": float(config.sample.guidance_scale),
        "nfe_per_segment": nfes.mean(0).tolist(), "nfe_total": float(nfes.sum(1).mean()),
        "devices": jax.device_count(), "dir": str(out_dir),
    }
    if times:
        # The first batch of a run includes compilation; later ones are the steady state.
        steady = times[1:] or times
        summary["seconds_first_batch"] = times[0]
        summary["seconds_per_sample"] = float(np.mean(steady)) / batch
    if config.sample.gflops:
        # dopri5's NFE varies by batch: the cost is that of the mean NFE.
        counted = flops_lib.sampling_flops(config, nfes.mean(0).tolist(),
                                           image_shape=setup.image_shape, num_classes=setup.num_classes)
        summary["gflops"] = counted.as_dict()
        logging.info("GFLOPs per sample %.3f (per call per segment %s); single-scale baseline %.3f at the same "
                     "NFE: %.2fx", counted.gflops_per_sample, [round(g, 4) for g in counted.gflops_per_call],
                     counted.baseline_gflops_per_sample, counted.ratio)
    if primary:
        arrays = {"images": images}
        if "labels" in parts[0]:
            arrays["labels"] = np.concatenate([p["labels"] for p in parts])[:num_images]
        _write_npz(out_dir / "samples.npz", **arrays)
        grid = images[:grid_images]  # image i has class i mod num_classes: one column per class
        generate_lib.save_png(out_dir / "grid.png", generate_lib.image_grid(
            from_uint8(grid), columns=generate_lib.grid_columns(setup.num_classes, len(grid))))
        if "previews" in parts[0]:
            generate_lib.save_png(out_dir / "coarse_to_fine.png",
                                  generate_lib.coarse_to_fine_grid(from_uint8(parts[0]["previews"])))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logging.info("wrote %d samples to %s", images.shape[0], out_dir)
    return summary


def sample_from_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict[str, Any]:
    """The sample mode: config.sample.num_images images from checkpoint `step` (default: the latest)."""
    setup, step, params, sigmas = restore_for_sampling(config, workdir, step)
    out_dir = epath.Path(workdir) / "generated" / f"step{step:07d}"
    summary = generate_to_dir(config, setup, params, sigmas, out_dir, num_images=config.sample.num_images,
                              previews=config.sample.previews, seed=config.seed + 11,
                              grid_images=config.sample.grid_images)
    summary["step"] = step
    if jax.process_index() == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    # The others return once the files are there (a caller may read them next).
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lapflow_sample_written")
    return summary

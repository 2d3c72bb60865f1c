"""Shared pieces of the benchmark scripts: model configs, one sampling and one training measurement.

Every measurement builds LapFlow and the single-scale baseline from the same code (L = 1 is
DiT/SiT) with the same width, depth, finest patch size, resolution, batch and NFE; FLOPs come
from XLA's cost analysis of the compiled programs (lapflow_jax/flops.py), times from the wall
clock after compilation (`block_until_ready`; the settings are timed round-robin and the best
of the repeats is used, which a busy shared machine disturbs least).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Settings compared by default: (label, window starts finest first).
SETTINGS = {
    "baseline": (0.0,),
    "lapflow2": (0.5, 0.0),             # the paper's 256 px headline: 2 scales, T = 0.5
    "lapflow3": (2 / 3, 1 / 3, 0.0),    # 3 scales, equal segments (the paper does not give its T's)
}
LABELS = {"baseline": "1-scale baseline (DiT/SiT)", "lapflow2": "LapFlow 2-scale T=0.5",
          "lapflow3": "LapFlow 3-scale T=1/3,2/3"}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    image_size: int = 32
    channels: int = 3
    width: int = 256
    depth: int = 6
    heads: int = 4
    patch: int = 2
    dtype: str = "float32"
    preset: str = "tiny"
    num_classes: int = 10           # class-conditional (as ImageNet), 0: unconditional
    attention_backend: str = "xla"


def make_config(spec: ModelSpec, window_starts: Sequence[float], *, batch: int = 32, steps: int = 20,
                method: str = "euler", guidance: float = 1.0):
    """A LapFlow config (L = len(window_starts); L = 1 is the baseline) on synthetic data."""
    from lapflow_jax.config import base_config

    c = base_config()
    L = len(window_starts)
    c.num_scales = L
    c.window_starts = tuple(window_starts)
    c.pyramid.sigmas = (1.0,) * L           # no data read: benchmarks use synthetic images
    c.model.preset = spec.preset
    c.model.hidden_size = spec.width
    c.model.depth = spec.depth
    c.model.num_heads = spec.heads
    c.model.patch_sizes = (spec.patch,) * L
    c.model.dtype = spec.dtype
    c.model.attention_backend = spec.attention_backend
    c.model.conditional = spec.num_classes > 0
    c.data.name = "demo_photos"             # never read (synthetic inputs of spec's shape)
    c.data.image_size = spec.image_size
    c.data.channels = spec.channels if spec.channels in (1, 3) else 3
    c.train.global_batch_size = batch
    c.sample.method = method
    c.sample.steps = steps
    c.sample.guidance_scale = guidance
    c.sample.batch_size = batch
    c.mesh_shape = (-1, 1)
    return c


def tokens_per_segment(window_starts: Sequence[float], spec: ModelSpec) -> list[int]:
    from lapflow_jax.paths import MultiScalePath

    per_scale = [((spec.image_size >> k) // spec.patch) ** 2 for k in range(len(window_starts))]
    return [sum(per_scale[f:]) for _, _, f in MultiScalePath(tuple(window_starts)).segments()]


def time_interleaved(runs: dict[str, Any], repeats: int) -> dict[str, dict[str, float]]:
    """Wall seconds of each `runs[name]()` (results blocked on), after one warm-up call each.

    The timed calls go round-robin over the settings, so a slow spell of a shared machine hits
    all of them alike; `min` (the best of `repeats`, least disturbed) is what ratios use, `median`
    is reported beside it.
    """
    import jax

    for fn in runs.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: {"min": min(t), "median": statistics.median(t)} for name, t in times.items()}


@functools.lru_cache(maxsize=8)
def _init_params(config_json: str, image_shape: tuple[int, int, int], num_classes: int, seed: int):
    """Random parameters, initialised under jit (eager init compiles one program per shape)."""
    import json

    import jax
    import ml_collections
    from flax import nnx

    from lapflow_jax.models import build_model

    config = ml_collections.ConfigDict(json.loads(config_json))

    @jax.jit
    def init():
        model = build_model(config, image_shape=image_shape, num_classes=num_classes, rngs=nnx.Rngs(seed))
        return nnx.to_pure_dict(nnx.state(model))

    graphdef = nnx.split(nnx.eval_shape(lambda: build_model(config, image_shape=image_shape, num_classes=num_classes,
                                                            rngs=nnx.Rngs(seed))))[0]
    return graphdef, init()


def release_cached_params() -> None:
    """Drops the cached random parameters (a large model's are gigabytes of device memory)."""
    _init_params.cache_clear()


def _randomise_zero_init(params, seed: int = 1):
    """DiT zero-initialises adaLN and the final layer, so a fresh model outputs exactly 0; give
    them small random values so the sampler integrates a non-trivial field (times are the same
    either way, but dopri5's step count is not)."""
    import jax
    import jax.numpy as jnp

    @jax.jit  # one program: eagerly, every parameter shape would compile its own ops
    def perturb(tree):
        leaves, treedef = jax.tree.flatten(tree)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        leaves = [jnp.where(x == 0, 0.02 * jax.random.normal(k, x.shape, x.dtype), x) if x.ndim >= 2 else x
                  for x, k in zip(leaves, keys)]
        return jax.tree.unflatten(treedef, leaves)

    return perturb(params)


def prepare_sampling(spec: ModelSpec, window_starts: Sequence[float], *, batch: int,
                     steps_per_segment: Sequence[int], method: str = "euler", guidance: float = 1.0,
                     timed: bool = True):
    """GFLOPs per sample of one sampling run (fixed steps per segment), and a function running it.

    Returns (info, run): run() samples one batch, sharded over all devices (data parallel) as the
    sample mode does; None when timed=False (then only FLOPs are counted: compiled for one
    sample, nothing is allocated or run).
    """
    import jax
    import numpy as np

    from lapflow_jax import flops as flops_lib
    from lapflow_jax import generate, parallel, pyramid, sampling

    config = make_config(spec, window_starts, batch=batch, method=method, guidance=guidance)
    image_shape = (spec.image_size, spec.image_size, spec.channels)
    nfe = [n * (1 if method == "euler" else 2) for n in steps_per_segment]
    counted = flops_lib.sampling_flops(config, nfe, image_shape=image_shape, num_classes=spec.num_classes,
                                       baseline=False)
    info = {"window_starts": list(window_starts), "tokens_per_segment": tokens_per_segment(window_starts, spec),
            "nfe_per_segment": nfe, "gflops_per_call": list(counted.gflops_per_call),
            "gflops_per_sample": counted.gflops_per_sample, "gmacs_per_sample": counted.gmacs_per_sample,
            "seconds_per_sample": float("nan"), "batch": batch}
    if not timed:
        return info, None
    graphdef, params = _init_params(config.to_json(), image_shape, spec.num_classes, 0)
    params = _randomise_zero_init(params)
    mesh = parallel.make_mesh((-1, 1))
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    info["params_millions"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) / 1e6
    path = generate.path_from_config(config)
    shapes = tuple(pyramid.scale_shapes(spec.image_size, spec.image_size, len(window_starts)))
    noise, labels = generate._noise_and_labels(  # pylint: disable=protected-access
        jax.random.key(0), 0, shapes=shapes, channels=spec.channels, num_classes=spec.num_classes, batch=batch,
        sharding=parallel.batch_sharding(mesh))
    fn = generate.velocity_for(config, graphdef, spec.num_classes)

    def run():
        out = sampling.sample(fn, (params, labels), path, noise, method=method, steps=tuple(steps_per_segment))
        if list(out.nfe_per_segment) != nfe:
            raise AssertionError(f"NFE {out.nfe_per_segment} differs from the planned {nfe}")
        return out.residuals

    return info, run


def synthetic_setup(config, spec: ModelSpec):
    """train.Setup for synthetic inputs of spec's shape and class count, read from no dataset.

    train.make_setup takes the input shape and classes from the data config (4-channel latents
    need a latent cache on disk); a benchmark needs neither, so the same fields are filled here
    from the spec, with the same helpers.
    """
    from flax import nnx

    from lapflow_jax import config as config_lib
    from lapflow_jax import parallel, paths, train
    from lapflow_jax.models import build_model

    image_shape = (spec.image_size, spec.image_size, spec.channels)
    mesh = parallel.mesh_for(config)
    config_lib.validate_for_mesh(config, parallel.data_size(mesh))
    abstract = nnx.eval_shape(lambda: build_model(config, image_shape=image_shape, num_classes=spec.num_classes,
                                                  rngs=nnx.Rngs(0)))
    tx, schedule = train.make_optimizer(config.train)
    L = config.num_scales
    specs = parallel.param_specs(abstract, parallel.logical_rules(config.fsdp))
    abstract_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    return train.Setup(
        config=config, image_shape=image_shape, num_classes=spec.num_classes,
        stage_sizes=paths.stage_batch_sizes(config.train.global_batch_size, config.train.stage_fractions, L),
        scale_weights=(1.0,) * L, path=paths.MultiScalePath(tuple(config.window_starts), config.path_kind),
        mesh=mesh, graphdef=nnx.split(abstract)[0], param_specs=specs,
        update_specs=train.update_specs(config, abstract_params, specs, mesh), tx=tx, schedule=schedule)


def prepare_training(spec: ModelSpec, window_starts: Sequence[float], *, batch: int):
    """XLA GFLOPs of one compiled train step at global batch `batch`, and a function running it.

    Synthetic images in [-1, 1] and labels, sharded over all devices; the project's own train step
    (decompose, per-stage sub-batches, MoT, loss, AdamW, EMA). Returns (info, run).
    """
    import jax
    import numpy as np

    from lapflow_jax import checkpoint as ckpt_lib
    from lapflow_jax import flops as flops_lib
    from lapflow_jax import parallel, train
    from lapflow_jax.models import attention, presets

    config = make_config(spec, window_starts, batch=batch)
    setup = synthetic_setup(config, spec)
    state = train.create_state(setup, np.ones(len(window_starts), np.float32))
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (batch, spec.image_size, spec.image_size, spec.channels)).astype(np.float32)
    labels = rng.integers(0, max(setup.num_classes, 1), (batch,)).astype(np.int32)
    data = parallel.global_batch({"image": images, "label": labels}, setup.mesh)
    step = train.make_train_step(setup).lower(state, data).compile()
    flops_per_device = flops_lib.compiled_flops(step)
    if attention.resolve_backend(spec.attention_backend, presets.DTYPES[spec.dtype]) != "xla":
        # Fused attention kernels are invisible to XLA's cost analysis: count the same step
        # with XLA attention (compiled, never run).
        counting = synthetic_setup(flops_lib.counting_config(config), spec)
        shardings, abstract = train.state_shardings(counting)
        abstract_data = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), data)
        flops_per_device = flops_lib.compiled_flops(train.make_train_step(counting).lower(
            ckpt_lib.abstract_with_shardings(abstract, shardings), abstract_data).compile())
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], data)
        if not np.isfinite(float(metrics["loss"])):
            raise FloatingPointError("the benchmark's train step gave a non-finite loss")
        return metrics["loss"]

    info = {"window_starts": list(window_starts), "stage_batch_sizes": list(setup.stage_sizes),
            "gflops_per_step": flops_per_device * jax.device_count() / 1e9,
            "gflops_per_step_per_device": flops_per_device / 1e9, "devices": jax.device_count(), "batch": batch}
    return info, run


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return "/".join(cell(x) for x in v)
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def device_description() -> str:
    import jax

    d = jax.devices()[0]
    return f"{jax.device_count()} x {d.device_kind} ({d.platform}), {os.cpu_count()} host CPUs"

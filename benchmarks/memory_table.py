"""Per-device memory of the train state (parameters + AdamW moments + EMA) under each sharding mode,
computed from the shapes and the shardings training uses (train.state_shardings), not guessed.

    python benchmarks/memory_table.py                      # L/2 and XL/2, 8 and 64 devices (markdown)
    python benchmarks/memory_table.py --compile_time       # + train-step compile seconds, scan vs unrolled
    python benchmarks/memory_table.py --no-table --compile_time --presets=L

The models are the ImageNet 256 ones: 32x32x4 latents, patch 2, 1000 classes (+ the null class),
LapFlow with 2 scales (T = 0.5) and, for scale, the 1-scale DiT baseline. Nothing is allocated:
the state is abstract (jax.eval_shape) and the devices are fake CPU devices. Activations are not
counted (they depend on batch, remat policy and scan; see --compile_time's XLA memory figures).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=64")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from lapflow_jax import config as config_lib  # noqa: E402
from lapflow_jax import parallel, paths, train  # noqa: E402
from lapflow_jax.models import build_model  # noqa: E402

LATENT = (32, 32, 4)
NUM_CLASSES = 1000
GIB = 2.0 ** 30


def make_config(preset: str, num_scales: int, *, scan: bool = False, remat: str = "none", fsdp: bool = False):
    c = config_lib.base_config()
    c.num_scales = num_scales
    c.window_starts = (0.5, 0.0) if num_scales == 2 else (0.0,)
    c.pyramid.sigmas = (1.0,) * num_scales
    c.model.preset = preset
    c.model.patch_sizes = (2,) * num_scales
    c.model.attention_backend = "xla"
    c.model.scan_layers = scan
    c.model.remat = remat
    c.fsdp = fsdp
    return c


def make_setup(config, mesh, batch: int = 256) -> train.Setup:
    """train.make_setup for a 32x32x4 latent and 1000 classes, without reading any data."""
    abstract_model = nnx.eval_shape(lambda: build_model(config, image_shape=LATENT, num_classes=NUM_CLASSES,
                                                        rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract_model)
    specs = parallel.param_specs(abstract_model, parallel.logical_rules(config.fsdp))
    parallel.check_divisible(nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param)), specs, mesh,
                             num_heads=abstract_model.num_heads)
    tx, schedule = train.make_optimizer(config.train)
    L = config.num_scales
    return train.Setup(config=config, image_shape=LATENT, num_classes=NUM_CLASSES,
                       stage_sizes=paths.stage_batch_sizes(batch, None, L), scale_weights=(1.0,) * L,
                       path=paths.MultiScalePath(tuple(config.window_starts), config.path_kind), mesh=mesh,
                       graphdef=graphdef, param_specs=specs, tx=tx, schedule=schedule)


def state_bytes(setup: train.Setup) -> dict[str, int]:
    """Bytes per device of params, optimizer state and EMA (the largest shard of each array)."""
    shardings, abstract = train.state_shardings(setup)
    return {"params": parallel.bytes_per_device(abstract.params, shardings.params),
            "optimizer": parallel.bytes_per_device(abstract.opt_state, shardings.opt_state),
            "ema": parallel.bytes_per_device(abstract.ema_params, shardings.ema_params)}


MODES = (  # (name, model axis size, fsdp)
    ("DP", 1, False),
    ("TP 8", 8, False),
    ("FSDP", 1, True),
    ("FSDP + TP 8", 8, True),
)


def memory_table(presets=("L", "XL"), device_counts=(8, 64)) -> str:
    lines = []
    devices = jax.devices()
    totals = ["| model | scales | parameters | params + AdamW + EMA, one replica |", "| --- | --- | --- | --- |"]
    for preset in presets:
        for L in (1, 2):
            setup = make_setup(make_config(preset, L), parallel.make_mesh((1, 1), devices[:1]))
            count = sum(x.size for x in jax.tree.leaves(train.state_shardings(setup)[1].params))
            b = state_bytes(setup)
            totals.append(f"| {preset}/2 | {L}{' (DiT)' if L == 1 else ''} | {count / 1e6:,.1f} M | "
                          f"{sum(b.values()) / GIB:.2f} GiB |")
    lines += totals + [""]
    header = ("| model (2 scales) | devices | mode | mesh (data, model) | params | AdamW (mu, nu) | EMA | "
              "total per device |")
    lines += [header, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for preset in presets:
        for n in device_counts:
            for name, model, fsdp in MODES:
                shape = (n // model, model)
                setup = make_setup(make_config(preset, 2, fsdp=fsdp), parallel.make_mesh(shape, devices[:n]))
                b = state_bytes(setup)
                lines.append(f"| {preset}/2 | {n} | {name} | {shape} | {b['params'] / GIB:.3f} GiB | "
                             f"{b['optimizer'] / GIB:.3f} GiB | {b['ema'] / GIB:.3f} GiB | "
                             f"**{sum(b.values()) / GIB:.3f} GiB** |")
    return "\n".join(lines)


def compile_times(presets=("L", "XL"), batch: int = 2) -> str:
    """Seconds to lower and compile the train step on one CPU device, unrolled vs scanned blocks
    (full remat in both), with XLA's temp-memory estimate of the compiled step."""
    lines = ["| model (2 scales) | blocks | lower s | compile s | XLA temp bytes (batch 2) |",
             "| --- | --- | --- | --- | --- |"]
    mesh = parallel.make_mesh((1, 1), jax.devices()[:1])
    ratios = []
    for preset in presets:
        seconds = {}
        for scan in (False, True):
            setup = make_setup(make_config(preset, 2, scan=scan, remat="full"), mesh, batch=batch)
            shardings, abstract = train.state_shardings(setup)
            state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
            sharding = parallel.batch_sharding(mesh)
            data = {"image": jax.ShapeDtypeStruct((batch,) + LATENT, jnp.float32, sharding=sharding),
                    "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)}
            step = train.make_train_step(setup)
            t0 = time.perf_counter()
            lowered = step.lower(state, data)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", float("nan"))
            lines.append(f"| {preset}/2 | {'scan' if scan else 'unrolled'} | {t1 - t0:.1f} | {t2 - t1:.1f} | "
                         f"{temp / 2**20:,.0f} MiB |")
            print(lines[-1], flush=True)
            seconds[scan] = t2 - t0
        ratios.append(f"{preset}/2 lower+compile time, unrolled / scanned: {seconds[False] / seconds[True]:.2f}x")
    return "\n".join(lines + [""] + ratios)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="L,XL")
    parser.add_argument("--devices", default="8,64", help="device counts (at most the fake devices: 64)")
    parser.add_argument("--table", action=argparse.BooleanOptionalAction, default=True, help="the memory table")
    parser.add_argument("--compile_time", action="store_true")
    args = parser.parse_args()
    presets = tuple(args.presets.split(","))
    if args.table:
        print(memory_table(presets, tuple(int(n) for n in args.devices.split(","))))
    if args.compile_time:
        print()
        print(compile_times(presets))


if __name__ == "__main__":
    main()

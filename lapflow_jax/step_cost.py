"""What one train step costs per chip: model FLOPs and HBM bytes, from XLA's cost analysis.

Both are read from the compiler for whatever devices the setup's mesh holds: TPU devices of a
topology that no host has (the compile check), or the local GPU a benchmark times
(benchmarks/step_roofline.py). `roofline.step_time` turns them into a predicted step time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from lapflow_jax import checkpoint as ckpt_lib
from lapflow_jax import flops as flops_lib
from lapflow_jax import parallel, train
from lapflow_jax.models import presets


def abstract_batch(setup: train.Setup, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch a train step takes, as abstract arrays sharded over the data axes."""
    sharding = parallel.batch_sharding(setup.mesh)
    data = {"image": jax.ShapeDtypeStruct((batch,) + tuple(setup.image_shape), jnp.float32, sharding=sharding)}
    if setup.num_classes > 0:
        data["label"] = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)
    return data


def train_step_cost(setup: train.Setup, **model_overrides) -> dict[str, float]:
    """The compiler's cost analysis (for the mesh's devices) of the train step with the model fields overridden."""
    config = ml_collections.ConfigDict(setup.config.to_dict())
    config.model.update(model_overrides)
    variant = train.make_setup(config, setup.mesh, dataset_classes=setup.num_classes)
    shardings, abstract = train.state_shardings(variant)
    lowered = train.make_train_step(variant).lower(ckpt_lib.abstract_with_shardings(abstract, shardings),
                                                   abstract_batch(variant, config.train.global_batch_size))
    return lowered.compile().cost_analysis()


def hbm_bytes_per_chip(setup: train.Setup) -> float:
    """Bytes one chip's train step reads and writes in HBM, by the compiler's cost analysis.

    The analysis counts a loop's body once, so the step is compiled with 1 and 2 unrolled blocks
    and extrapolated to the depth: every block is the same program, so the bytes are linear in
    the depth (a + b * depth). Two small compiles, whatever the depth."""
    one, two = (float(train_step_cost(setup, depth=d, scan_layers=False)["bytes accessed"]) for d in (1, 2))
    depth = presets.model_size(setup.config.model)[1]
    return one + (two - one) * (depth - 1)


def model_flops_per_chip(setup: train.Setup) -> float | None:
    """FLOPs of one train step divided by the chips: XLA's count of the whole step lowered for one
    host CPU device (lowering allocates nothing), with every layer unrolled and the XLA attention,
    since XLA counts a scanned loop's body once and cannot see into Pallas kernels (and gives no
    count for a program lowered for TPU devices)."""
    cpu = parallel.make_mesh((1, 1), jax.devices("cpu")[:1])
    counted = train.make_setup(flops_lib.counting_config(setup.config), cpu, dataset_classes=setup.num_classes)
    shardings, abstract = train.state_shardings(counted)
    lowered = train.make_train_step(counted).lower(ckpt_lib.abstract_with_shardings(abstract, shardings),
                                                   abstract_batch(counted, setup.config.train.global_batch_size))
    cost = lowered.cost_analysis()
    return float(cost["flops"]) / setup.mesh.size if cost and "flops" in cost else None

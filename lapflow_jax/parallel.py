"""Device mesh, logical-axis rules and shardings: every placement decision lives here.

Parameters carry logical axis names (see models/mot.py); `logical_rules` maps them to the mesh
axes ('data', 'model'):

- data parallel: the batch is split over 'data';
- tensor parallel (Megatron style) over 'model': column-parallel QKV and MLP-in (their output
  axes 'qkv' / 'mlp'), row-parallel attention-out and MLP-out (their input axes 'heads' / 'mlp');
- FSDP (optional): the 'embed' axis of parameters, and so of the optimizer state and EMA, is
  sharded over 'data' as well.

Sharded results equal single-device results up to float reassociation (tests/test_parallel.py).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "model")


def logical_rules(fsdp: bool = False) -> tuple[tuple[str, str | None], ...]:
    """Logical axis name -> mesh axis (None = replicated)."""
    return (
        ("batch", "data"),
        ("embed", "data" if fsdp else None),
        ("mlp", "model"),
        ("qkv", "model"),
        ("heads", "model"),
        ("scale", None),
        ("vocab", None),
        ("patch", None),
        ("freq", None),
        ("embed_out", None),
    )


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'model') mesh; one entry of `shape` may be -1, meaning "the rest of the devices".

    Raises a ValueError naming `config.mesh_shape` when the shape cannot use exactly the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"config.mesh_shape={tuple(shape)} must have {len(MESH_AXES)} entries {MESH_AXES}.")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"config.mesh_shape={tuple(shape)}: entries must be positive, with at most one -1.")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"config.mesh_shape={tuple(shape)}: {len(devices)} devices are not divisible by {known}.")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"config.mesh_shape={tuple(shape)} needs {int(np.prod(shape))} devices, but {len(devices)} are "
            f"available ({jax.process_count()} process(es)).")
    device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def _spec_from_names(names, rules) -> P:
    table = dict(rules)
    return P(*[table.get(n) if n is not None else None for n in names])


def param_specs(abstract_model: nnx.Module, rules) -> Any:
    """PartitionSpec per parameter as a pure dict mirroring `nnx.to_pure_dict(params)`."""
    params = nnx.state(abstract_model, nnx.Param)

    def spec(variable):
        names = variable.get_metadata().get("out_sharding")
        return _spec_from_names(names, rules) if names else P()

    specs = jax.tree.map(spec, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs)


def _keystr(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def specs_like_params(tree: Any, params_specs: Any) -> Any:
    """Spec per leaf of any tree that embeds parameter-shaped subtrees (optimizer state, EMA).

    A leaf whose key path ends with a parameter's key path gets that parameter's spec; every other
    leaf (step counters, scalars) is replicated.
    """
    by_path = {_keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        params_specs, is_leaf=lambda x: isinstance(x, P))[0]}
    lengths = sorted({len(p) for p in by_path}, reverse=True)

    def lookup(path, leaf):
        key = _keystr(path)
        for n in lengths:
            if len(key) >= n and key[-n:] in by_path:
                spec = by_path[key[-n:]]
                if len(spec) <= np.ndim(leaf):
                    return spec
        return P()

    return jax.tree_util.tree_map_with_path(lookup, tree)


def named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over 'data'; everything else replicated."""
    return NamedSharding(mesh, P("data"))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's slice of the batch into global arrays sharded over 'data'."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def bytes_per_device(abstract_tree: Any, shardings: Any) -> int:
    """Bytes each device holds for a tree of ShapeDtypeStructs under the given NamedShardings."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(
            shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
        shard = sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
    return total

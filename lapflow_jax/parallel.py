"""Device mesh, logical-axis rules and shardings, multi-host input: every placement decision lives here.

Parameters carry logical axis names (models/mot.py); `logical_rules` maps them, and the names of
the key activations, to the mesh axes ('data', 'fsdp', 'model'). `config.mesh_shape` names two
numbers, (data parallel, model); `make_mesh` splits the first into ('data', 'fsdp'): FSDP groups of
`config.fsdp_group` chips (auto: at most FSDP_GROUP_MAX), data parallel across the groups.

- data parallel: the batch (and every activation's batch axis) is split over ('data', 'fsdp'),
  i.e. over every chip of the data-parallel axis;
- tensor parallel (Megatron style) over 'model': column-parallel QKV, MLP-in and adaLN (their
  output axes 'qkv' / 'mlp' / 'modulation'), row-parallel attention-out and MLP-out (their input
  axes 'heads' / 'mlp'); attention runs on the heads of each device;
- FSDP (optional): the 'embed' axis of parameters, and so of the optimizer state and EMA, is
  sharded over 'fsdp' (ZeRO-3 within a group: the compiler all-gathers each weight where it is
  used). The group is at most 32 chips because the TPU compiler (libtpu 0.0.42) compiles an
  all-gather over 64 or more chips as an all-reduce of a zero-padded buffer, twice the wire time
  (measured: tests/test_compile_check.py::test_fsdp_over_64_chips_gathers); across groups the
  gradients are summed as in plain data parallelism.
- ZeRO-1 (config.zero1, without FSDP): parameters stay replicated for the forward and backward
  pass, but the optimizer update, the AdamW moments and the EMA are split over every chip of the
  data-parallel axis (`zero1_specs`); the new parameters are all-gathered at the end of the step.

Multi-host: every process runs the same program. The global batch is read as `input_shards`
equal slices by Grain iterators, one per shard; each process reads the shards whose rows its
devices hold (`InputShards`), and `global_batch` assembles the slices into global arrays. With
a fixed shard count the global batch of every step is the same whatever the number of processes.

Sharded results equal single-device results up to float reassociation (tests/test_parallel.py).
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen import spmd as linen_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")   # a batch is split over both: every chip of the data-parallel axis
FSDP_GROUP_MAX = 32             # the largest all-gather the TPU compiler keeps an all-gather

# Logical names of activation axes (distinct from the parameter names: with FSDP a parameter's
# 'embed' axis is sharded over 'fsdp', an activation's never is, since 'fsdp' holds its batch).
ACTIVATION_RULES = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "model"),
    ("activation_mlp", "model"),
)


def logical_rules(fsdp: bool = False) -> tuple[tuple[str, str | None], ...]:
    """Logical axis name -> mesh axis (None = replicated), parameters and activations.

    A mesh axis is used at most once per array: the first matching rule wins (flax's logic).
    """
    return (
        ("batch", BATCH_AXES),
        ("embed", "fsdp" if fsdp else None),
        ("mlp", "model"),
        ("qkv", "model"),
        ("heads", "model"),
        ("modulation", "model"),
        ("layers", None),
        ("scale", None),
        ("vocab", None),
        ("patch", None),
        ("freq", None),
        ("embed_out", None),
    ) + ACTIVATION_RULES


def spec_for(names: Sequence[str | None], rules) -> P:
    """PartitionSpec of an array whose axes carry these logical names."""
    return linen_spmd.logical_to_mesh_axes(tuple(names), rules)


def fsdp_group_size(data: int, requested: int = 0) -> int:
    """Chips per FSDP group on a data-parallel axis of `data` chips: `requested` (config.fsdp_group),
    which must divide it, or (0) the largest divisor of it that is at most FSDP_GROUP_MAX."""
    if requested:
        if requested < 0 or data % requested:
            raise ValueError(f"config.fsdp_group={requested} must divide the data-parallel axis ({data} chips, "
                             "config.mesh_shape[0]); 0 picks the largest divisor up to "
                             f"{FSDP_GROUP_MAX}.")
        return requested
    return max(g for g in range(1, min(data, FSDP_GROUP_MAX) + 1) if data % g == 0)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None, fsdp_group: int = 0) -> Mesh:
    """A ('data', 'fsdp', 'model') mesh from `shape` = (data parallel, model), one entry of which
    may be -1 ("the rest of the devices"); the data-parallel chips are split into groups of
    `fsdp_group_size(shape[0], fsdp_group)` along 'fsdp' (neighbours on the physical torus).

    Raises a ValueError naming `config.mesh_shape` when the shape cannot use exactly the devices.
    Axes are Auto (the compiler propagates shardings from the ones we state).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in shape]
    if len(shape) != 2:
        raise ValueError(f"config.mesh_shape={tuple(shape)} must have 2 entries (data, model).")
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
    group = fsdp_group_size(shape[0], fsdp_group)
    shape = (shape[0] // group, group, shape[1])
    # jax.make_mesh lays devices out by the physical topology on TPU (plain order elsewhere).
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:
        # An axis that is not a product of whole physical axes (a 'model' axis of 4 on a 16x16
        # v6e slice): let it split a physical axis, which keeps its devices neighbours.
        from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)


def mesh_for(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh a config asks for: config.mesh_shape, FSDP groups of config.fsdp_group."""
    return make_mesh(config.mesh_shape, devices, int(config.get("fsdp_group", 0)))


def data_size(mesh) -> int:
    """Chips a batch is split over (the data-parallel axis: 'data' x 'fsdp')."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))


def padded_batch(requested: int, mesh, rows_per_shard: int = 0) -> int:
    """`requested` rounded up to whole rows per data-parallel chip (and, with `rows_per_shard`,
    config.sample.rows_per_call, whole model calls per chip): sampling pads, then trims."""
    unit = data_size(mesh) * max(1, int(rows_per_shard))
    return max(1, -(-int(requested) // unit)) * unit


def batch_spec(mesh) -> P:
    """PartitionSpec of an array whose leading axis is a batch split over the data-parallel chips."""
    return P(tuple(a for a in BATCH_AXES if a in mesh.shape))


def mesh_shape(mesh) -> tuple[int, int]:
    """(data parallel, model): the mesh as config.mesh_shape names it."""
    return data_size(mesh), int(mesh.shape.get("model", 1))


def param_specs(abstract_model: nnx.Module, rules) -> Any:
    """PartitionSpec per parameter as a pure dict mirroring `nnx.to_pure_dict(params)`."""
    params = nnx.state(abstract_model, nnx.Param)

    def spec(variable):
        names = variable.get_metadata().get("out_sharding")
        return spec_for(names, rules) if names else P()

    specs = jax.tree.map(spec, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs)


def check_divisible(abstract_params: Any, specs: Any, mesh: Mesh, *, num_heads: int | None = None,
                    what: str = "config.mesh_shape") -> None:
    """Every sharded dimension must divide by its mesh axis, and the 'model' axis the head count
    (Megatron attention runs whole heads per device); raises a ValueError naming what does not.

    Run before anything compiles (jit would otherwise fail deep inside with a less clear message).
    """
    model = mesh.shape["model"]
    if num_heads is not None and num_heads % model:
        raise ValueError(f"{what}={mesh_shape(mesh)}: the 'model' axis ({model}) must divide the number "
                         f"of attention heads ({num_heads}, config.model.num_heads or the preset's).")
    bad = []
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for (path, leaf), spec in zip(leaves, spec_leaves):
        for dim, axis in zip(leaf.shape, spec):
            axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
            size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
            if dim % size:
                bad.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} -> {spec}: {dim} % {size} != 0")
    if bad:
        raise ValueError(f"{what}={mesh_shape(mesh)} (axes {dict(mesh.shape)}) cannot shard these "
                         "parameters evenly:\n  " + "\n  ".join(bad[:10])
                         + "\nChoose a 'model' axis that divides the head count and widths (or turn off "
                           "config.fsdp, whose group (config.fsdp_group) must divide the hidden size).")


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


def zero1_specs(abstract_params: Any, specs: Any, mesh: Mesh) -> Any:
    """ZeRO-1: where the optimizer update runs and its state (AdamW moments, EMA) lives when the
    parameters themselves are not split over the data-parallel chips (no FSDP).

    Each parameter's spec with BATCH_AXES added to the dimension whose per-chip length is largest
    among those that still divide by the data-parallel chips (the first such if several tie; a
    dimension tensor parallelism splits over 'model' keeps that split and is split further); a
    parameter without one (a bias of odd width, a scalar) keeps its spec. Each chip then updates
    its 1/data of the parameters and holds that much of their moments and EMA, instead of all of
    them: the update's HBM traffic and the state shrink by the data-parallel factor, and the
    gradient all-reduce becomes a reduce-scatter plus an all-gather of the new parameters.
    """
    n = data_size(mesh)

    def split(leaf, spec):
        entries = [(a,) if isinstance(a, str) else tuple(a or ()) for a in spec]
        entries += [()] * (len(leaf.shape) - len(entries))
        local = [dim // int(np.prod([mesh.shape[a] for a in axes])) for dim, axes in zip(leaf.shape, entries)]
        free = [i for i, size in enumerate(local) if size % n == 0]
        if n == 1 or not free:
            return spec
        best = max(free, key=lambda i: (local[i], -i))
        entries[best] += BATCH_AXES
        return P(*[None if not e else e[0] if len(e) == 1 else e for e in entries])

    return jax.tree.map(split, abstract_params, specs)


def named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over the data-parallel chips; everything else replicated."""
    return NamedSharding(mesh, batch_spec(mesh))


# --- Activation sharding constraints -----------------------------------------------------------

class _ActivationContext(threading.local):
    mesh: Mesh | None = None
    rules: tuple = ()


_ACTIVE = _ActivationContext()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules) -> Iterator[None]:
    """Within this context (while a jitted function traces), `constrain` pins activations."""
    before = (_ACTIVE.mesh, _ACTIVE.rules)
    _ACTIVE.mesh, _ACTIVE.rules = mesh, tuple(rules)
    try:
        yield
    finally:
        _ACTIVE.mesh, _ACTIVE.rules = before


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `activation_sharding` context (None outside one)."""
    return _ACTIVE.mesh


def target_platform() -> str:
    """Platform the traced program is for: the active mesh's devices ("tpu" for a topology's
    devices in an ahead-of-time compile on a CPU host), else JAX's default backend."""
    mesh = _ACTIVE.mesh
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def gathered(weight: jax.Array, names: Sequence[str | None], dtype) -> jax.Array:
    """A weight as a layer uses it: cast to the compute dtype, then FSDP's split of its 'embed'
    axis undone (the all-gather) with tensor parallelism's split kept; just the cast outside
    `activation_sharding`.

    Casting first (MaxText's order) makes the gather move bf16, not float32. Every use of a
    weight within a traced layer shares one gathered copy (XLA merges identical casts and
    constraints), so a weight that several stages or scales use crosses the network once per
    pass, and XLA sums the uses' gradients before reducing them."""
    weight = weight.astype(dtype)
    mesh = _ACTIVE.mesh
    if mesh is None:
        return weight
    rules = tuple((name, None if name == "embed" else axis) for name, axis in _ACTIVE.rules)
    return jax.lax.with_sharding_constraint(weight, NamedSharding(mesh, spec_for(names, rules)))


def activation_spec(shape: Sequence[int], names: Sequence[str | None]) -> P | None:
    """PartitionSpec of an activation with these logical axis names inside `activation_sharding`
    (None outside one). A dimension that does not divide by its mesh axis is left unsharded (e.g.
    a sampling batch of 2 on 8 devices), so the model runs on any batch."""
    mesh = _ACTIVE.mesh
    if mesh is None:
        return None
    spec = list(spec_for(names, _ACTIVE.rules))
    for i, axis in enumerate(spec):
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        if axes and shape[i] % int(np.prod([mesh.shape[a] for a in axes])):
            spec[i] = None
    return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axis names; the identity outside `activation_sharding`."""
    spec = activation_spec(x.shape, names)
    if spec is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(_ACTIVE.mesh, spec))


# --- Multi-host input ---------------------------------------------------------------------------

def input_groups(mesh: Mesh) -> tuple[int, int]:
    """(this process's group, number of groups): processes whose devices hold the same rows of a
    batch sharded over 'data' form a group and read the same data.

    Groups are ordered by their first row. Usually (CPU, GPU, and TPU slices whose hosts hold
    adjacent devices) each group holds one contiguous block of rows, and the global batch is the
    groups' data in order. Where a topology-aware mesh gives a host scattered rows,
    `make_array_from_process_local_data` places its data on them in order, which is still a
    valid batch, only arranged differently from a one-process run.
    """
    rows_of = {}
    for i, row in enumerate(mesh.devices.reshape(data_size(mesh), -1)):
        for device in np.ravel(row):
            rows_of.setdefault(device.process_index, set()).add(i)
    groups = sorted({tuple(sorted(rows)) for rows in rows_of.values()})
    seen = [r for g in groups for r in g]
    if len(seen) != len(set(seen)):
        raise ValueError(f"hosts hold overlapping rows of the mesh's 'data' axis: {groups}; choose "
                         "config.mesh_shape so that hosts holding any row of a device row hold all of it.")
    if len({len(g) for g in groups}) != 1:
        raise ValueError(f"hosts hold different numbers of 'data' rows: {groups}.")
    return groups.index(tuple(sorted(rows_of[jax.process_index()]))), len(groups)


class InputShards:
    """The global batch read as `count` equal shards; this process reads shards [first, first + n).

    next() concatenates this process's shards' batches (its rows of the global batch, in order).
    State is one Grain iterator state per shard: get_state() returns JSON bytes, which
    `checkpoint.InputShardsHandler` stores per process and merges on restore, and set_state()
    refuses a state saved with another shard count.
    """

    def __init__(self, make_iterator: Callable[[int, int], Any], *, first: int, num: int, count: int):
        self.first, self.num, self.count = first, num, count
        self.iterators = [make_iterator(first + i, count) for i in range(num)]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> bytes:
        return json.dumps({"input_shards": self.count, "shards": {
            str(self.first + i): it.get_state() for i, it in enumerate(self.iterators)}}).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state)
        mine = [str(self.first + i) for i in range(self.num)]
        if state.get("input_shards") != self.count or any(k not in state["shards"] for k in mine):
            raise ValueError(
                f"the checkpoint's data iterator state holds input shards {sorted(state['shards'])} of "
                f"{state.get('input_shards')}, but this process reads shards {mine} of {self.count}. Resume "
                f"with --config.input_shards={state.get('input_shards')} (it works on any number of hosts "
                "that divides it), or with the host count the run was saved with.")
        for key, it in zip(mine, self.iterators):
            it.set_state(state["shards"][key])

    def start_prefetch(self) -> None:
        for it in self.iterators:
            if hasattr(it, "start_prefetch"):
                it.start_prefetch()


def make_input_shards(mesh: Mesh, make_iterator: Callable[[int, int], Any], input_shards: int = 0) -> InputShards:
    """This process's input iterators for a batch sharded over the mesh's 'data' axis.

    Args:
      mesh: the training mesh.
      make_iterator: (shard_index, shard_count) -> iterator of that shard's host batches.
      input_shards: how many shards the global batch is read as; 0 = one per process group (see
        `input_groups`). A fixed value (a multiple of every group count you will use) makes the
        data of every step independent of the number of processes.
    """
    group, groups = input_groups(mesh)
    count = input_shards or groups
    if count % groups:
        raise ValueError(f"config.input_shards={input_shards} must be a multiple of the {groups} process "
                         "group(s) reading distinct rows of the batch.")
    per_group = count // groups
    return InputShards(make_iterator, first=group * per_group, num=per_group, count=count)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh,
                 global_batch_size: int | None = None) -> dict[str, jax.Array]:
    """Assembles each host's rows of the batch into global arrays sharded over 'data'.

    global_batch_size: the batch over all processes (needed when several processes hold the same
    rows, e.g. a mesh whose 'data' axis does not span the hosts); default: inferred.
    """
    sharding = batch_sharding(mesh)

    def one(v):
        v = np.asarray(v)
        shape = None if global_batch_size is None else (global_batch_size,) + v.shape[1:]
        return jax.make_array_from_process_local_data(sharding, v, shape)

    return {k: one(v) for k, v in local_batch.items()}


def bytes_per_device(abstract_tree: Any, shardings: Any) -> int:
    """Bytes each device holds for a tree of ShapeDtypeStructs under the given NamedShardings
    (the largest shard, where a dimension does not split evenly)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(
            shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
        shard = sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
    return total


# --- Rows of a batch held by this process (evaluation) -------------------------------------------

def host_rows(mesh: Mesh, batch: int) -> np.ndarray:
    """The rows of a [batch, ...] array sharded over 'data' that this process's devices hold,
    ascending (int64). Over all processes the row sets cover the batch; processes sharing a
    'data' row (a 'model' axis that spans hosts) list it both."""
    rows: set[int] = set()
    for index in batch_sharding(mesh).addressable_devices_indices_map((batch,)).values():
        rows.update(range(*index[0].indices(batch)))
    return np.array(sorted(rows), np.int64)


def put_host_rows(local: np.ndarray, mesh: Mesh, batch: int) -> jax.Array:
    """The global [batch, ...] array sharded over 'data' whose rows host_rows(mesh, batch) are
    `local` (in that order); every process passes its own rows, nothing is sent between hosts."""
    local = np.asarray(local)
    rows = host_rows(mesh, batch)
    if local.shape[0] != len(rows):
        raise ValueError(f"put_host_rows: {local.shape[0]} rows given, this process holds {len(rows)}.")
    position = {int(r): i for i, r in enumerate(rows)}
    shape = (batch,) + local.shape[1:]
    sharding = batch_sharding(mesh)
    pieces = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        start, stop, _ = index[0].indices(batch)
        first = position[start]
        pieces.append(jax.device_put(local[first:first + stop - start], device))
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


def get_host_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a global array sharded over its leading axis, in host_rows order
    (each row once, also when several local devices hold it); copies only local data."""
    pieces = {}
    for shard in x.addressable_shards:
        start = shard.index[0].start or 0
        if start not in pieces:
            pieces[start] = shard.data
    return np.concatenate([np.asarray(pieces[s]) for s in sorted(pieces)]) if pieces else np.zeros((0,) + x.shape[1:])


def map_in_chunks(fn: Callable[[jax.Array], Any], x: jax.Array, chunk: int) -> Any:
    """fn over x [n, ...] in chunks of `chunk` rows (the last one padded with zeros, its outputs
    dropped), one chunk at a time (jax.lax.map): bounds a device's activation memory. fn maps
    [chunk, ...] to arrays (or a tree) with leading axis chunk."""
    n = x.shape[0]
    if n <= chunk:
        return fn(x)
    count = -(-n // chunk)
    padded = jnp.concatenate([x, jnp.zeros((count * chunk - n,) + x.shape[1:], x.dtype)]) if count * chunk > n else x
    out = jax.lax.map(fn, padded.reshape((count, chunk) + x.shape[1:]))
    return jax.tree.map(lambda y: y.reshape((count * chunk,) + y.shape[2:])[:n], out)

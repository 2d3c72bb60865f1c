"""The eval pass: rows in global batches on the mesh, each host storing its own rows, resumable.

Rows (samples, or reference images) are processed in global batches of `batch` rows sharded over
the mesh's 'data' axis (`batch` is a multiple of it: a configured batch that does not divide the
axis is rounded up, the extra rows being real rows of the next indices). Each device turns its
rows into uint8 pixels and features (`FeatureProgram`: autoencoder decode in latent mode, then
every feature network, all under shard_map with the weights replicated), and each host keeps
only its own rows: nothing is gathered onto one host during the pass, and a host's memory holds
at most one part of its rows (below).

Consecutive batches are grouped into parts of about PART_BYTES over all hosts; host h writes part
p of kind k (`images`, or a feature network's name) to

    <dir>/p{p:05d}.h{h:04d}.{k}.npz        `index` [n] (row indices) + the arrays of that kind

atomically (temporary name, then replace), so a killed pass leaves whole files only, and a rerun
does what is missing, part by part: samples it lacks, or only the features of a network added
since (from the stored images). Which parts to do is agreed by all hosts before the pass (the
union of what any host lacks), so every host runs the same sequence of programs. The layout
(batch, batches per part, host count) and what fixes the rows (seed, sampler settings, source)
are recorded in <dir>/settings.json, written once by process 0; a rerun with another layout or
other settings is refused, naming the differences. Reading (`PartStore.rows`) needs no particular
layout: after a barrier, one process can read every host's parts, in any order or in row order.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lapflow_jax import metrics as metrics_lib
from lapflow_jax import parallel
from lapflow_jax.evaluation import npz as npz_lib
from lapflow_jax.evaluation.networks import FeatureNetwork

PART_BYTES = 64 << 20  # bytes of one part over all hosts: the unit of resume, and what a reader holds
IMAGES = "images"


def global_batch(requested: int, mesh: Mesh, rows_per_shard: int = 1) -> int:
    """`requested` rounded up to a multiple of the mesh's 'data' axis (as training pads its sampling
    batch): on a pod, the ImageNet configs' batch of 16 becomes one row per data-parallel device.
    rows_per_shard: also a whole number of model calls per device (config.sample.rows_per_call)."""
    return parallel.padded_batch(requested, mesh, rows_per_shard)


def barrier(name: str) -> None:
    """Every process waits here for the others (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8 pixels, rounding as PNG writers and sample.to_uint8 do."""
    return jnp.clip(jnp.rint((x.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class FeatureProgram:
    """One compiled program per batch shape: x [B, ...] sharded over 'data' -> (uint8 pixels
    [B, H, W, C], {"<network>.<output>": [B, D] float32}), every device on its own rows.

    x is uint8 pixels, float images in [-1, 1], or (with `decode`) autoencoder latents. The
    networks' and the autoencoder's weights are replicated over the mesh once, at construction.
    """

    def __init__(self, mesh: Mesh, networks: Mapping[str, FeatureNetwork], decode=None):
        self.mesh = mesh
        self.networks = dict(networks)
        replicated = NamedSharding(mesh, P())
        # From host copies: each process places its own replicas (a device_put of one process's
        # device arrays onto a mesh spanning other hosts is a cross-host transfer, which a
        # multi-process CPU job refuses; the pod rehearsal's latent eval found it).
        place = lambda tree: jax.device_put(jax.tree.map(np.asarray, tree), replicated)
        self.states = {name: place(net.state) for name, net in self.networks.items()}
        self.decode_state = None if decode is None else place(decode[1])
        decode_fn = None if decode is None else decode[0]
        networks_ = self.networks

        def per_device(states, decode_state, x):
            if decode_fn is not None:
                x = decode_fn(decode_state, x)
            pixels = x if x.dtype == jnp.uint8 else to_uint8(x)
            features = {}
            for name, net in networks_.items():
                for output, value in net.apply(states[name], pixels).items():
                    features[f"{name}.{output}"] = value.astype(jnp.float32)
            return pixels, features

        spec = parallel.batch_spec(mesh)
        self._program = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), spec),
                                              out_specs=(spec, spec), check_vma=False))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        return self._program(self.states, self.decode_state, x)


@dataclasses.dataclass
class Layout:
    """How the rows 0 .. num_rows - 1 are cut: global batches of `batch`, `batches_per_part` per
    part, written by `processes` hosts."""

    batch: int
    batches_per_part: int
    processes: int
    num_rows: int

    @property
    def num_batches(self) -> int:
        return -(-self.num_rows // self.batch)

    @property
    def num_parts(self) -> int:
        return -(-self.num_batches // self.batches_per_part)

    def batches(self, part: int) -> range:
        return range(part * self.batches_per_part, min((part + 1) * self.batches_per_part, self.num_batches))

    def as_dict(self) -> dict[str, int]:
        return {"batch": self.batch, "batches_per_part": self.batches_per_part, "processes": self.processes}


def write_json(path: epath.Path, data: Any) -> None:
    """JSON written atomically (temporary name, then replace), logged as the one writer of it."""
    tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)
    logging.info("wrote %s", path)


class PartStore:
    """The part files of one pass (module docstring) in `directory`.

    Args:
      directory: local or remote folder (shared by the hosts for multi-host reading).
      identity: what fixes the rows' content (seed, sampler settings, source, networks...): with
        the layout, recorded in settings.json and checked on every later run.
      layout: this run's layout; a directory made with another one keeps its own (read from
        settings.json) and is read with it, but cannot be added to.
    """

    def __init__(self, directory: str | epath.Path, identity: Mapping[str, Any], layout: Layout, *,
                 create: bool = True):
        self.dir = epath.Path(directory)
        self.identity = json.loads(json.dumps(identity, default=str))
        self.requested = layout
        settings = self.dir / "settings.json"
        if create:  # every process: process 0 records the settings, the others wait for them
            if jax.process_index() == 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                if not settings.exists():
                    write_json(settings, {"identity": self.identity, "layout": layout.as_dict()})
            barrier(f"lapflow_eval_settings_{self.dir}")
        elif not settings.exists():
            raise FileNotFoundError(f"{self.dir} holds no evaluation parts (no settings.json).")
        stored = json.loads(settings.read_text())
        diffs = _differences(stored["identity"], self.identity)
        if diffs:
            raise ValueError(f"{self.dir} holds rows made with other settings:\n  " + "\n  ".join(diffs)
                             + f"\nDelete {self.dir} or restore those settings.")
        self.layout = Layout(num_rows=layout.num_rows, **stored["layout"])
        self._names: set[str] | None = None

    @classmethod
    def open(cls, directory: str | epath.Path, num_rows: int) -> "PartStore":
        """A finished store, for reading by one process (no barrier, no check of the settings)."""
        settings = json.loads((epath.Path(directory) / "settings.json").read_text())
        return cls(directory, settings["identity"], Layout(num_rows=num_rows, **settings["layout"]), create=False)

    def same_layout(self) -> bool:
        return self.layout.as_dict() == self.requested.as_dict()

    @staticmethod
    def name(part: int, host: int, kind: str) -> str:
        return f"p{part:05d}.h{host:04d}.{kind}.npz"

    def names(self, refresh: bool = False) -> set[str]:
        if self._names is None or refresh:
            self._names = {p.name for p in self.dir.iterdir()} if self.dir.exists() else set()
        return self._names

    def complete(self, kinds: Sequence[str], part: int) -> bool:
        """Whether every host's files of `part` for `kinds` exist (from a listing of the folder)."""
        names = self.names()
        return all(self.name(part, h, k) in names for h in range(self.layout.processes) for k in kinds)

    def missing(self, kinds: Sequence[str]) -> np.ndarray:
        """[num_parts, len(kinds)] bool: the kinds some host lacks per part, agreed by all hosts
        (each checks its own files; the union is taken, for folders that are not shared too)."""
        names = self.names(refresh=True)
        me = jax.process_index()
        mine = np.array([[self.name(p, me, k) not in names for k in kinds] for p in range(self.layout.num_parts)],
                        np.int32).reshape(self.layout.num_parts, len(kinds))
        if jax.process_count() > 1:
            mine = np.asarray(multihost_utils.process_allgather(mine)).max(axis=0)
        return mine.astype(bool)

    def write(self, part: int, kind: str, arrays: Mapping[str, np.ndarray]) -> None:
        """This host's rows of `part` for `kind`, atomically."""
        npz_lib.write_npz(self.dir / self.name(part, jax.process_index(), kind), **arrays)

    def read(self, part: int, host: int, kind: str, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return npz_lib.read_npz(self.dir / self.name(part, host, kind), None if names is None else tuple(names))

    def rows(self, kind: str, names: Sequence[str], limit: int | None = None,
             ordered: bool = False) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(index [n], {name: [n, ...]}) over every host's files of `kind`, one part at a time; rows
        with index >= limit left out. ordered: one yield per part, its rows sorted by index
        (otherwise one yield per file, in no particular order)."""
        for part in range(self.layout.num_parts):
            pieces = []
            for host in range(self.layout.processes):
                data = self.read(part, host, kind, ("index", *names))
                keep = data["index"] < (limit if limit is not None else np.iinfo(np.int64).max)
                piece = (data["index"][keep], {k: data[k][keep] for k in names})
                if not ordered:
                    yield piece
                else:
                    pieces.append(piece)
            if ordered and pieces:
                index = np.concatenate([p[0] for p in pieces])
                order = np.argsort(index, kind="stable")
                yield index[order], {k: np.concatenate([p[1][k] for p in pieces])[order] for k in names}


def _differences(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(before) | set(now))
    return [f"{k}: earlier {before.get(k)!r}, now {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]


def batches_per_part(batch: int, row_bytes: int, rows: int = 0) -> int:
    """Batches per part: about `rows` rows (config.eval.part_rows), or with rows = 0 about
    PART_BYTES over all hosts; at least one batch."""
    if rows:
        return max(1, int(rows) // batch)
    return max(1, PART_BYTES // max(1, batch * row_bytes))


def kind_of(network: FeatureNetwork) -> str:
    """The part-file kind of a network's features: its name and a digest of its identity, so
    features of other weights or preprocessing are other files (recomputed, never mixed)."""
    digest = hashlib.sha256(json.dumps(network.identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"{network.name}-{digest}"


@dataclasses.dataclass
class Batch:
    """What `run` needs for one global batch: x on the devices ([batch, ...] sharded over 'data'),
    per row this host holds its label (or None), and what the sampler reports (NFE per segment)."""

    x: jax.Array
    labels: np.ndarray | None = None
    nfe: Sequence[int] | None = None


def run(store: PartStore, program: FeatureProgram, *, label: str,
        make_batch: Callable[[int], Batch] | None, keep_images: bool) -> dict[str, Any]:
    """Fills `store` with every part's images (if keep_images) and every network's features.

    Args:
      store: where the parts go (its layout fixes the batches).
      program: the device program (its networks say which feature kinds are made).
      label: for progress lines ("eval: samples", "eval: reference").
      make_batch: batch index -> Batch (sampling, or reading the source rows).
      keep_images: store the uint8 pixels (samples) as kind "images", with their labels and the
        sampler's NFE; parts that then lack only a network's features are computed from them
        instead of calling make_batch.
    Returns:
      {"parts": total, "parts_done": made now, "batches": run now, "nfe": [[NFE per segment] per
      batch sampled now]}.
    """
    layout = store.layout
    kinds_of = {name: kind_of(net) for name, net in program.networks.items()}
    kinds = ([IMAGES] if keep_images else []) + list(kinds_of.values())
    todo = store.missing(kinds)
    parts = [p for p in range(layout.num_parts) if todo[p].any()]
    if parts and not store.same_layout():
        raise ValueError(
            f"{store.dir} was started with {layout.processes} host(s) and global batch {layout.batch} "
            f"({store.requested.processes} and {store.requested.batch} now) and is not finished: rerun with the "
            f"earlier slice (same host and device count), or delete {store.dir} to start over.")
    rows = parallel.host_rows(program.mesh, layout.batch)
    num_batches = sum(len(layout.batches(p)) for p in parts)
    logging.info("%s: %d rows in %d batches of %d (%d parts); %d part(s) to do (%d batches) in %s", label,
                 layout.num_rows, layout.num_batches, layout.batch, layout.num_parts, len(parts), num_batches,
                 store.dir)
    progress = metrics_lib.Progress(label, num_batches, items_per_batch=layout.batch)
    done, nfes = 0, []
    for part in parts:
        need_images = keep_images and bool(todo[part][0])
        need = [name for name, kind in kinds_of.items() if todo[part][kinds.index(kind)]]
        stored = store.read(part, jax.process_index(), IMAGES) if keep_images and not need_images else None
        buffers: dict[str, list[np.ndarray]] = {}
        for j in layout.batches(part):
            index = j * layout.batch + rows
            if stored is not None:  # only features are missing: from the stored pixels
                pick = (stored["index"] // layout.batch) == j
                batch = Batch(x=parallel.put_host_rows(stored["images"][pick], program.mesh, layout.batch))
            else:
                batch = make_batch(j)
            pixels, features = program(batch.x)
            # Samples keep every row (rows past num_rows are real samples too); source rows past
            # the end are blanks.
            keep = np.ones(len(index), bool) if keep_images else index < layout.num_rows
            buffers.setdefault("index", []).append(index[keep])
            if need_images:
                buffers.setdefault("images", []).append(parallel.get_host_rows(pixels)[keep])
                if batch.labels is not None:
                    buffers.setdefault("labels", []).append(np.asarray(batch.labels)[keep])
                if batch.nfe is not None:
                    buffers.setdefault("nfe", []).append(np.asarray(batch.nfe, np.int64)[None])
                    nfes.append([int(n) for n in batch.nfe])
            for key, value in features.items():
                if key.split(".")[0] in need:
                    buffers.setdefault(key, []).append(parallel.get_host_rows(value)[keep])
            done += 1
            progress.update(done)
        merged = {k: np.concatenate(v) for k, v in buffers.items()}
        for name in need:
            outputs = {k.split(".", 1)[1]: v for k, v in merged.items() if k.startswith(name + ".")}
            store.write(part, kinds_of[name], {"index": merged["index"], **outputs})
        if need_images:  # last: a part with images but no features is redone from them, not resampled
            store.write(part, IMAGES, {k: merged[k] for k in ("index", "images", "labels", "nfe") if k in merged})
    barrier(f"lapflow_eval_parts_{store.dir}")
    store.names(refresh=True)
    return {"parts": layout.num_parts, "parts_done": len(parts), "batches": num_batches, "nfe": nfes}


def host_reader(read_rows: Callable[[np.ndarray], np.ndarray], mesh: Mesh, batch: int,
                num_rows: int, blank: Callable[[int], np.ndarray]) -> Callable[[int], Batch]:
    """make_batch for a row source: batch j's rows this host holds (read_rows(indices) -> uint8
    [n, H, W, C]; rows past num_rows are blank(n) zeros, dropped after the features)."""
    rows = parallel.host_rows(mesh, batch)

    def make_batch(j: int) -> Batch:
        index = j * batch + rows
        real = index < num_rows
        pixels = read_rows(index[real]) if real.any() else blank(0)
        if not real.all():
            pixels = np.concatenate([pixels, blank(int((~real).sum()))])
        return Batch(x=parallel.put_host_rows(pixels, mesh, batch))

    return make_batch


@functools.lru_cache(maxsize=8)
def _zeros(shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape, np.uint8)


def blank_rows(image_shape: tuple[int, int, int]) -> Callable[[int], np.ndarray]:
    return lambda n: _zeros((n, *image_shape))

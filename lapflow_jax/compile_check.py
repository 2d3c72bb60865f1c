"""Compile a run for a TPU topology ahead of time, on any host, and read per-chip memory,
FLOPs and communication from the TPU compiler, before a slice is created.

    pip install -e '.[tpu]'     # libtpu: the TPU compiler (it runs on a CPU machine too)
    python -m lapflow_jax.compile_check --config=configs/imagenet256_xl2_lapflow.py \\
        --topology=v5p:4x4x4 --config.mesh_shape=16,4 --config.fsdp=True

The run's mesh (config.mesh_shape) is laid over the topology's devices
(`jax.experimental.topologies`), and the real programs are compiled for them with the config's
FSDP, remat, scan and attention backend ("auto" = splash on TPU): the train step at
config.train.global_batch_size, and the sampling program of every segment at the batch the
training loop samples (config.sample.num_images, padded to the 'data' axis). Nothing runs and no
data is read (the number of classes comes from the dataset's metadata, or --num_classes).

Per chip it prints what `memory_analysis()` says: the arguments (for the train step: the state,
parameters + AdamW moments + EMA, and the batch), the temporaries (activations, gradients,
workspace) and their sum with the outputs that do not reuse an argument's buffer, against the
chip's HBM; the train step's FLOPs per chip (XLA's count of the whole step, lowered unrolled
with the XLA attention since XLA counts a scanned loop once and cannot see into Pallas kernels,
divided by the chips); compile seconds; and the collectives of the optimized HLO (kind, count and
bytes per call, loops multiplied by their trip counts).

Exit status: 0 when every program fits, 1 (saying by how much) when one does not, or on a bad
config. The check runs on the host's CPU and never touches a TPU, so it is safe on a TPU VM
whose chips are busy.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Sequence

# The check compiles for the topology's devices and runs nothing: keep JAX off any local
# accelerator (on a TPU VM its chips may belong to a running job).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lapflow_jax import checkpoint as ckpt_lib  # noqa: E402
from lapflow_jax import cli, generate, parallel, pyramid, sampling, train  # noqa: E402
from lapflow_jax import roofline, step_cost  # noqa: E402
from lapflow_jax.data import latents as latents_data  # noqa: E402
from lapflow_jax.data import pipeline  # noqa: E402
from lapflow_jax.models import attention, presets  # noqa: E402

GIB = 2.0 ** 30

# HBM per chip by `device.device_kind` (Cloud TPU documentation's system architecture pages).
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:8x8, v5p:4x4x4, v6e:16x16, v4:4x4x4"

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")


# --- Topology ----------------------------------------------------------------------------------

def topology_devices(topology: str) -> list[jax.Device]:
    """The devices of a TPU topology such as "v5p:4x4x4", from libtpu, without any TPU attached."""
    # libtpu otherwise asks a TPU VM's metadata server for these, and prints a page of warnings
    # when there is none; they do not affect an ahead-of-time compile.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu takes a machine-wide lock that a second process (a training job on this TPU VM, or
    # a parallel check) would fail on; a compile-only user never opens the chips.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # noqa: BLE001 - libtpu missing or the name unknown; both are the user's to fix
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"--topology={topology!r}: no TPU topology of that name could be built ({message}). It needs "
            f"the TPU compiler (pip install -e '.[tpu]', which brings libtpu) and a name like "
            f"{TOPOLOGY_EXAMPLES}.") from e


def hbm_bytes(device: jax.Device) -> float:
    kind = device.device_kind
    if kind not in HBM_GIB:
        raise ValueError(f"no HBM size known for {kind!r} (known: {sorted(HBM_GIB)}); pass --hbm_gib.")
    return HBM_GIB[kind] * GIB


# --- Reading the compiled program ----------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\(")
_CALLED = re.compile(r"\b(body|condition|calls|to_apply)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_INT_CONSTANT = re.compile(r"= s32\[\]\S* constant\((\d+)\)")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (a tuple's arrays summed; layouts ignored)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += size * _DTYPE_BYTES.get(dtype, 1)
    return int(total)


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str        # "all-gather", "all-reduce", ...
    count: int       # executions per call of the program (ops in loops times their trip counts)
    bytes: int       # bytes of their results per call, per chip

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
    """One collective instruction of a program."""

    kind: str
    count: int                 # executions per call of the program
    bytes: int                 # bytes of its result per execution, per chip
    group: tuple[int, ...]     # logical device ids of the group holding device 0 (all: every device)


def collectives(hlo_text: str) -> list[Collective]:
    """Collectives of an optimized HLO module per kind: executions and result bytes per call of
    the program, per chip (see `collective_ops`)."""
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for op in collective_ops(hlo_text):
        counts[op.kind][0] += op.count
        counts[op.kind][1] += op.count * op.bytes
    return [Collective(kind, c, b) for kind, (c, b) in sorted(counts.items())]


def collective_ops(hlo_text: str, num_devices: int | None = None) -> list[CollectiveOp]:
    """Collective instructions of an optimized HLO module, per call of the program, per chip.

    An async pair (all-gather-start / -done) counts once, with the -done's result shape. An op in
    a while loop counts as many times as the loop runs: its known_trip_count, or else the bound of
    a scan's condition (`counter < N` and nothing else; a loop without either, such as dopri5's
    adaptive steps, counts once). Every branch of a conditional counts, so data-dependent
    branches may count more than run.
    """
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match and "=" not in line.split("{")[0].split("(")[0]:
            current = match.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            computations[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    # How many times each computation runs per call: the entry once, a while body trip-count
    # times its caller, anything else called (fusions, async wrappers, branches) as its caller.
    runs: dict[str, int] = collections.defaultdict(int)

    def visit(name: str, times: int, depth: int = 0) -> None:
        if depth > 64 or name not in computations:
            return
        runs[name] += times
        for line in computations[name]:
            called = dict(_CALLED.findall(line))
            trips = _TRIP_COUNT.search(line)
            if trips is None and "condition" in called:
                trips = _scan_bound(computations.get(called["condition"], []))
            else:
                trips = int(trips.group(1)) if trips else 1
            for role, callee in called.items():
                visit(callee, times * (trips if role == "body" else 1), depth + 1)
            for group in _BRANCHES.findall(line):
                for callee in group.split(","):
                    visit(callee.strip().lstrip("%"), times, depth + 1)

    visit(entry, 1)
    # An async pair's groups are on its -start; its result shape on its -done.
    start_groups = {}
    for name in runs:
        for line in computations[name]:
            match = _INSTRUCTION.match(line)
            if match and match.group(2).endswith("-start"):
                start_groups[_result_name(line)] = line
    ops = []
    for name, times in runs.items():
        for line in computations[name]:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            shape, opcode = match.groups()
            kind = opcode[:-len("-done")] if opcode.endswith("-done") else opcode
            if kind not in COLLECTIVES:  # also skips the -start half of an async pair
                continue
            attributes = line
            if opcode.endswith("-done"):
                operand = re.search(r"-done\(%?([\w.\-]+)", line)
                attributes = start_groups.get(operand.group(1) if operand else "", line)
            ops.append(CollectiveOp(kind, times, shape_bytes(shape), replica_group(attributes, num_devices)))
    return ops


def _result_name(line: str) -> str:
    return line.split("=")[0].replace("ROOT", "").strip().lstrip("%")


_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)?\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{\{(\d+),(\d+)\}")


def replica_group(line: str, num_devices: int | None = None) -> tuple[int, ...]:
    """The logical device ids of the group that holds device 0, from an HLO collective's
    replica_groups in any of XLA's three spellings: explicit lists `{{0,1},{2,3}}`, iota
    `[2,2]<=[4]` (optionally transposed, `[2,4]<=[4,2]T(1,0)`), or named mesh axes
    `mesh['axis_0'=4,'axis_1'=2] {'axis_1'}` (the listed axes vary within a group). An empty list
    means every device (`num_devices`, or () when unknown). A collective-permute's group is its
    first source-target pair."""
    match = _GROUPS_MESH.search(line)
    if match:
        axes = re.findall(r"'(\w+)'=(\d+)", match.group(1))
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        varying = set(re.findall(r"'(\w+)'", match.group(2)))
        ids = np.arange(int(np.prod(sizes))).reshape(sizes)
        index = tuple(slice(None) if a in varying else 0 for a in names)
        return tuple(int(i) for i in ids[index].ravel())
    match = _GROUPS_IOTA.search(line)
    if match:
        shape = [int(x) for x in match.group(1).split(",")]
        dims = [int(x) for x in match.group(2).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if match.group(3):
            ids = ids.transpose([int(x) for x in match.group(3).split(",")])
        return tuple(int(i) for i in ids.reshape(shape)[0])
    match = _GROUPS_LIST.search(line)
    if match:
        if not match.group(1):
            return tuple(range(num_devices)) if num_devices else ()
        return tuple(int(i) for i in re.match(r"\{([\d,]*)\}", match.group(1)).group(1).split(",") if i)
    match = _PAIRS.search(line)
    if match:
        return (int(match.group(1)), int(match.group(2)))
    return tuple(range(num_devices)) if num_devices else ()


def _scan_bound(condition: list[str]) -> int:
    """N of a scan's loop condition `counter < N` (nothing else in it); 1 for any other loop, such
    as dopri5's adaptive steps, whose trip count depends on the data."""
    opcodes = [m.group(2) for m in map(_INSTRUCTION.match, condition) if m]
    bounds = _INT_CONSTANT.findall("\n".join(condition))
    plain = set(opcodes) <= {"parameter", "constant", "get-tuple-element", "compare"} and opcodes.count("compare") == 1
    return int(bounds[0]) if plain and len(bounds) == 1 and "direction=LT" in "\n".join(condition) else 1


@dataclasses.dataclass
class ProgramReport:
    """One compiled program on one chip (all sizes in bytes).

    A program the TPU compiler refuses for lack of HBM has `out_of_memory` set to the compiler's
    figures (what it needed and what the chip offers after its reservations) and no breakdown.
    """

    name: str
    arguments: int          # inputs held on the chip (the train state and batch, for the step)
    outputs: int
    aliased: int            # outputs written into donated argument buffers
    temporaries: int
    code: int
    hbm: float
    flops: float | None
    compile_seconds: float
    collectives: list[Collective]
    out_of_memory: tuple[float, float] | None = None   # (bytes needed, bytes usable), from the compiler
    ops: list[CollectiveOp] = dataclasses.field(default_factory=list, repr=False)
    step_time: roofline.StepTime | None = None          # the train step's predicted time

    @property
    def total(self) -> int:
        """Peak bytes per chip: arguments, outputs not aliasing them, temporaries and code."""
        if self.out_of_memory:
            return int(self.out_of_memory[0])
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @property
    def fits(self) -> bool:
        return self.out_of_memory is None and self.total <= self.hbm

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("ops", "step_time")}
        d.update(total=self.total, fits=self.fits, collectives=[c.as_dict() for c in self.collectives],
                 step_time=self.step_time.as_dict() if self.step_time else None)
        return d


# The TPU compiler's refusals, in the wordings of libtpu releases: the whole program's need, or
# its temporaries' alone (then the arguments come on top).
_OOM_TOTAL = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")
_OOM_TEMPORARIES = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                              r"\(([\d.]+)([KMGT]?)\)")
_UNIT = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def out_of_memory(error: Exception, argument_bytes: int = 0) -> tuple[float, float] | None:
    """(bytes needed, bytes usable) when `error` is the TPU compiler refusing a program that does
    not fit in HBM, else None. Where the compiler counts only the temporaries ("the total memory
    required for HLO temporaries (80.38G) exceeds available HBM (15.75G)"), `argument_bytes` (the
    inputs' bytes per chip) is added; where it counts the program ("Used 21.95G of 15.48G hbm"),
    its figure is taken as it is."""
    for pattern, plus in ((_OOM_TOTAL, 0), (_OOM_TEMPORARIES, argument_bytes)):
        match = pattern.search(str(error))
        if match:
            used, used_unit, capacity, capacity_unit = match.groups()
            return float(used) * _UNIT[used_unit] + plus, float(capacity) * _UNIT[capacity_unit]
    return None


def bytes_per_chip(abstract_args: Any) -> int:
    """Bytes one chip holds of a tree of ShapeDtypeStructs carrying NamedShardings."""
    return parallel.bytes_per_device(abstract_args, jax.tree.map(lambda x: x.sharding, abstract_args))


def compile_program(name: str, lowered, hbm: float, *, argument_bytes: int, flops: float | None = None
                    ) -> ProgramReport:
    """Compiles `lowered` for the topology and reads its report; an HBM overflow is a report too.

    argument_bytes: the inputs' bytes per chip (`bytes_per_chip`), for the compiler's refusals
    that count only temporaries."""
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - jax raises JaxRuntimeError; only the HBM overflow is expected
        needed = out_of_memory(e, argument_bytes)
        if needed is None:
            raise
        return ProgramReport(name=name, arguments=0, outputs=0, aliased=0, temporaries=0, code=0, hbm=hbm,
                             flops=flops, compile_seconds=time.perf_counter() - start, collectives=[],
                             out_of_memory=needed)
    return program_report(name, compiled, hbm, time.perf_counter() - start, flops=flops)


def program_report(name: str, compiled, hbm: float, compile_seconds: float, flops: float | None = None) -> ProgramReport:
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    return ProgramReport(
        name=name, arguments=int(memory.argument_size_in_bytes), outputs=int(memory.output_size_in_bytes),
        aliased=int(memory.alias_size_in_bytes), temporaries=int(memory.temp_size_in_bytes),
        code=int(memory.generated_code_size_in_bytes), hbm=hbm, flops=flops, compile_seconds=compile_seconds,
        collectives=collectives(text), ops=collective_ops(text))


@dataclasses.dataclass
class Report:
    topology: str
    device_kind: str
    chips: int
    mesh_shape: tuple[int, int]
    fsdp: bool
    fsdp_group: int   # chips per FSDP group (the mesh's 'fsdp' axis)
    attention_backend: str
    global_batch_size: int
    programs: list[ProgramReport]

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.programs)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(fits=self.fits, programs=[p.as_dict() for p in self.programs])
        return d

    def format(self) -> str:
        gib = lambda b: f"{b / GIB:.2f}"
        lines = [f"{self.topology} ({self.chips} x {self.device_kind}, {self.programs[0].hbm / GIB:.0f} GiB HBM "
                 f"per chip), mesh (data, model) = {self.mesh_shape}, fsdp={self.fsdp}"
                 + (f" in groups of {self.fsdp_group}" if self.fsdp else "") + ", "
                 f"attention={self.attention_backend}, global batch {self.global_batch_size}",
                 "",
                 "| program | arguments GiB | temporaries GiB | total GiB | of HBM | fits | GFLOPs per chip | compile s |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p in self.programs:
            flops = "n/a" if p.flops is None else f"{p.flops / 1e9:,.1f}"
            if p.out_of_memory:
                lines.append(f"| {p.name} | - | - | {gib(p.total)} | {100 * p.total / p.hbm:.0f}% | **NO** (compiler: "
                             f"{gib(p.out_of_memory[0])} of {gib(p.out_of_memory[1])} GiB usable) | {flops} | "
                             f"{p.compile_seconds:.1f} |")
                continue
            lines.append(f"| {p.name} | {gib(p.arguments)} | {gib(p.temporaries)} | {gib(p.total)} | "
                         f"{100 * p.total / p.hbm:.0f}% | {'yes' if p.fits else '**NO**'} | {flops} | "
                         f"{p.compile_seconds:.1f} |")
        for p in self.programs:
            if p.step_time:
                lines += ["", f"Predicted {p.name} time per chip ({self.device_kind} roofline, docs/compile_check.md): "
                          f"{p.step_time.format()}"]
        lines += ["", "Collectives per call, per chip (optimized HLO):"]
        for p in self.programs:
            found = ", ".join(f"{c.kind} {c.count} x ({c.bytes / 2**20:,.1f} MiB)" for c in p.collectives)
            lines.append(f"  {p.name}: {found or 'none'}")
        return "\n".join(lines)


# --- The check ---------------------------------------------------------------------------------

def dataset_classes(config: ml_collections.ConfigDict) -> int:
    """The dataset's class count from metadata alone. Latent mode on a host without the latent
    cache reads it from the dataset the cache is made from (config.latent.source)."""
    data = config.data
    if data.name == "latents" and not os.path.isfile(latents_data.info_path(data.latents_dir or ".")):
        data = ml_collections.ConfigDict(config.latent.source.to_dict())
        data.use_labels = config.data.use_labels
    return pipeline.num_classes(data)


def check(config: ml_collections.ConfigDict, topology: str, *, sampling_programs: bool = True,
          num_classes: int | None = None, hbm_gib: float = 0.0, count_flops: bool = True,
          log=print) -> Report:
    """Compiles the run's programs for the topology; returns the per-chip report.

    Raises ValueError (naming the field) when the config does not suit the topology's mesh.
    """
    devices = topology_devices(topology)
    mesh = parallel.mesh_for(config, devices)
    hbm = hbm_gib * GIB if hbm_gib else hbm_bytes(devices[0])
    setup = train.make_setup(config, mesh, dataset_classes=dataset_classes(config) if num_classes is None
                             else num_classes)
    with parallel.activation_sharding(mesh, parallel.logical_rules(config.fsdp)):
        backend = _resolved_backend(config)
    programs = [compile_train_step(setup, hbm, count_flops=count_flops, log=log)]
    if sampling_programs:
        programs += compile_sampling(setup, hbm, log=log)
    return Report(topology=topology, device_kind=devices[0].device_kind, chips=len(devices),
                  mesh_shape=parallel.mesh_shape(mesh), fsdp=bool(config.fsdp),
                  fsdp_group=int(mesh.shape["fsdp"]),
                  attention_backend=backend,
                  global_batch_size=config.train.global_batch_size, programs=programs)


def _resolved_backend(config) -> str:
    return attention.resolve_backend(config.model.attention_backend, presets.DTYPES[config.model.dtype])


def compile_train_step(setup: train.Setup, hbm: float, *, count_flops: bool = True, log=print) -> ProgramReport:
    shardings, abstract = train.state_shardings(setup)
    state = ckpt_lib.abstract_with_shardings(abstract, shardings)
    batch = step_cost.abstract_batch(setup, setup.config.train.global_batch_size)
    log(f"Compiling the train step (global batch {setup.config.train.global_batch_size}) ...")
    lowered = train.make_train_step(setup).lower(state, batch)
    flops = step_cost.model_flops_per_chip(setup) if count_flops else None
    report = compile_program("train step", lowered, hbm, argument_bytes=bytes_per_chip((state, batch)), flops=flops)
    if count_flops and flops and report.out_of_memory is None:
        log("Compiling the step at depth 1 and 2 for its HBM traffic ...")
        report.step_time = predict_step_time(setup, report, flops, step_cost.hbm_bytes_per_chip(setup))
    return report


def slice_shape(devices: Sequence[jax.Device]) -> tuple[int, ...]:
    """Chips along each physical axis of a slice, from its devices' coordinates."""
    coords = np.array([d.coords for d in devices])
    return tuple(int(n) for n in coords.max(axis=0) - coords.min(axis=0) + 1)


def predict_step_time(setup: train.Setup, report: ProgramReport, flops: float, hbm_bytes: float
                      ) -> roofline.StepTime:
    """The roofline of a compiled train step: its FLOPs, HBM bytes and every collective's group
    laid over the chips' physical coordinates (logical id i is the mesh's i-th device)."""
    devices = list(setup.mesh.devices.flat)
    chip = roofline.chip_for(devices[0].device_kind)
    shape = slice_shape(devices)
    coords = np.array([d.coords for d in devices])
    links = {}
    entries = []
    for op in report.ops:
        group = op.group or tuple(range(len(devices)))
        if group not in links:
            links[group] = roofline.group_links(chip, coords[list(group)], shape)
        entries.append((op.kind, op.count, op.bytes, links[group]))
    return roofline.step_time(chip, flops=flops, hbm_bytes=hbm_bytes, collectives=entries)


def compile_sampling(setup: train.Setup, hbm: float, *, log=print) -> list[ProgramReport]:
    """One program per segment, as `generate.generate` runs them on the training mesh."""
    config, mesh = setup.config, setup.mesh
    batch = train.sample_batch_size(setup)
    shardings, abstract = train.state_shardings(setup)
    # Sampling takes the EMA in the parameters' layout (train.sampling_params gathers ZeRO-1's split).
    params = ckpt_lib.abstract_with_shardings(abstract.ema_params, shardings.params)
    data_sharding = parallel.batch_sharding(mesh)
    labels = (jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data_sharding) if setup.num_classes > 0
              else None)
    height, width, channels = setup.image_shape
    shapes = pyramid.scale_shapes(height, width, config.num_scales)
    velocity_fn = generate.velocity_for(config, setup.graphdef, setup.num_classes)
    path = generate.path_from_config(config)
    steps = sampling.steps_per_segment(path, config.sample.steps)
    reports = []
    for (t0, t1, finest), n in zip(path.segments(), steps):
        states = [jax.ShapeDtypeStruct((batch, h, w, channels), jnp.float32, sharding=data_sharding)
                  for h, w in shapes[finest:]]
        name = f"sample segment t={t0:g}..{t1:g} ({len(states)} scale{'s' if len(states) > 1 else ''})"
        log(f"Compiling {name}, batch {batch}, {config.sample.method} ...")
        with generate.model_context(config, mesh):
            lowered = sampling.segment_program(velocity_fn, (params, labels), states, t0, t1,
                                               method=config.sample.method, num_steps=n,
                                               rtol=config.sample.rtol, atol=config.sample.atol)
        reports.append(compile_program(name, lowered, hbm, argument_bytes=bytes_per_chip((params, labels, states))))
    return reports


def shortfall_message(report: Report) -> str:
    lines = []
    for p in report.programs:
        if not p.fits:
            usable = p.out_of_memory[1] if p.out_of_memory else p.hbm
            lines.append(f"{p.name} does not fit: it needs {p.total / GIB:.2f} GiB per chip, "
                         f"{(p.total - usable) / GIB:.2f} GiB more than the {usable / GIB:.2f} GiB the compiler "
                         f"can use of a {report.device_kind}'s {p.hbm / GIB:.0f} GiB.")
    return "\n".join(lines + ["Shard more (config.fsdp=True, a 'model' axis in config.mesh_shape), turn on "
                              "config.model.remat, use a lower config.train.global_batch_size, or a larger "
                              "topology."])


# --- Command line ------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("topology", None, f"TPU topology to compile for, e.g. {TOPOLOGY_EXAMPLES}.")
    flags.DEFINE_bool("sampling", True, "Also compile the sampling program of every segment.")
    flags.DEFINE_integer("num_classes", None, "Dataset classes (default: from the dataset's metadata).")
    flags.DEFINE_float("hbm_gib", 0.0, "HBM per chip in GiB (default: the chip's).")
    flags.DEFINE_bool("flops", True, "Count FLOPs per chip (lowers the unrolled step once more).")
    flags.DEFINE_string("json", "", "Also write the report here as JSON.")
    flags.mark_flags_as_required(["config", "topology"])
    cli.define_verbose_flag()


@cli.one_line_errors
def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.setup_console(FLAGS.verbose)
    cli.resolve_config_paths(FLAGS.config)
    report = check(FLAGS.config, FLAGS.topology, sampling_programs=FLAGS.sampling, num_classes=FLAGS.num_classes,
                   hbm_gib=FLAGS.hbm_gib, count_flops=FLAGS.flops)
    print()
    print(report.format(), flush=True)
    if FLAGS.json:
        path = cli.resolve_path(FLAGS.json)
        with open(path, "w") as f:
            json.dump(report.as_dict(), f, indent=1)
        print(f"Wrote {path}")
    if not report.fits:
        print("\n" + shortfall_message(report), file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"\nFits: every program compiled for {report.topology} within {report.programs[0].hbm / GIB:.0f} GiB "
          "per chip.")


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)

"""How fast a compiled step can run on a TPU slice: a roofline from the chip's published figures.

Three terms bound a step's time on one chip:

    compute     = FLOPs per chip / peak bf16 FLOP/s
    HBM         = bytes the step reads and writes in HBM / HBM bandwidth
    collectives = sum over collectives of  factor * (n - 1) / n * B / bandwidth(group)

where B is the full array a collective assembles or reduces on each chip (an all-gather's result,
an all-reduce's operand, a reduce-scatter's result times n), n the chips in its group, and the
factor the ring algorithm's: 2 for an all-reduce (a reduce-scatter then an all-gather), 1 for an
all-gather, a reduce-scatter or an all-to-all. A group's bandwidth is that of the ICI links along
the physical torus axes its chips span: per axis, one link's one-way bandwidth, doubled where the
axis wraps around and the group spans all of it (a bidirectional ring); a group that spans several
axes uses all of their links at once. A collective-permute moves its bytes over one link.

The **lower bound** on the step time is the largest term (everything overlapped), the **upper
bound** max(compute, HBM) plus every collective (nothing overlapped). MFU = model FLOPs / (peak *
time), so the predicted MFU range is [FLOPs / (peak * upper), FLOPs / (peak * lower)].

What this leaves out: latency (a collective of a few KiB costs microseconds of setup, not its
bytes over bandwidth), contention between collectives that share links, strided groups whose
neighbours are several hops apart, and the gap between peak and what the MXUs reach on a given
matmul shape. The figures per chip and their sources are in docs/compile_check.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of one accelerator (docs/compile_check.md gives each one's source)."""

    name: str
    peak_flops: float        # bf16 FLOP/s per chip
    hbm_bandwidth: float     # bytes/s per chip
    ici_ports: int           # ICI links per chip (2 per torus axis)
    link_bandwidth: float    # bytes/s, one way, per link
    wraparound: str          # "cube": every axis wraps when all sides are multiples of 4;
    #                          "side16": an axis wraps only at the pod's full side of 16

    @property
    def axes(self) -> int:
        return self.ici_ports // 2


# `device.device_kind` -> figures. Bidirectional ICI bandwidth per chip / ports / 2 gives one
# link's one-way bandwidth: v5p 1200 GB/s / 6 / 2 = 100 GB/s, v5e 400 / 4 / 2 = 50,
# v6e 800 / 4 / 2 = 100. v4's per-chip ICI figure is not on its Cloud TPU page; 45 GB/s one way
# per link is from "How to Scale Your Model" (jax-ml), Part 2.
CHIPS = {
    "TPU v4": Chip("v4", 275e12, 1200 * GB, 6, 45 * GB, "cube"),
    "TPU v5 lite": Chip("v5e", 197e12, 819 * GB, 4, 50 * GB, "side16"),
    "TPU v5": Chip("v5p", 459e12, 2765 * GB, 6, 100 * GB, "cube"),
    "TPU v6 lite": Chip("v6e", 918e12, 1638 * GB, 4, 100 * GB, "side16"),
    # One GPU's figures (dense bf16, HBM), for a step compiled and timed on one local GPU
    # (benchmarks/step_roofline.py); NVLink is not modelled, so no collectives are predicted.
    "NVIDIA H100 80GB HBM3": Chip("h100", 989.4e12, 3350 * GB, 0, 0.0, "none"),
    "NVIDIA H200": Chip("h200", 989.4e12, 4800 * GB, 0, 0.0, "none"),
}

# Ring factor per collective kind (see the module docstring).
FACTORS = {"all-reduce": 2.0, "all-gather": 1.0, "reduce-scatter": 1.0, "all-to-all": 1.0}


def chip_for(device_kind: str) -> Chip:
    if device_kind not in CHIPS:
        raise ValueError(f"no roofline figures for {device_kind!r} (known: {sorted(CHIPS)}).")
    return CHIPS[device_kind]


def wraps(chip: Chip, slice_shape: Sequence[int], axis: int) -> bool:
    """Whether physical axis `axis` of a slice shaped `slice_shape` (chips per axis) has wraparound
    links. v4 and v5p: a slice whose sides are all multiples of 4 (whole 4x4x4 cubes) is a torus on
    every axis, a smaller one a mesh (Cloud TPU's v4 and v5p pages). v5e and v6e: only the full
    pod side of 16 wraps."""
    if chip.wraparound == "cube":
        return all(s % 4 == 0 for s in slice_shape)
    return slice_shape[axis] == 16


@dataclasses.dataclass(frozen=True)
class GroupLinks:
    """The physical axes a collective's group spans and the bandwidth it gets over them."""

    size: int                          # chips in the group
    axes: tuple[tuple[int, int, bool], ...]   # (physical axis, chips along it, wraps)
    bandwidth: float                   # bytes/s

    def describe(self) -> str:
        if not self.axes:
            return "none"
        return " x ".join(f"{'xyz'[a]}{n}{'(torus)' if w else ''}" for a, n, w in self.axes)


def group_links(chip: Chip, coords: np.ndarray, slice_shape: Sequence[int]) -> GroupLinks:
    """coords: [n, axes] physical coordinates of one group's chips."""
    coords = np.asarray(coords).reshape(len(coords), -1)
    axes, bandwidth = [], 0.0
    for a in range(coords.shape[1]):
        extent = len(np.unique(coords[:, a]))
        if extent < 2:
            continue
        wrap = wraps(chip, slice_shape, a) and extent == slice_shape[a]
        axes.append((a, extent, wrap))
        bandwidth += chip.link_bandwidth * (2 if wrap else 1)
    return GroupLinks(size=len(coords), axes=tuple(axes), bandwidth=bandwidth)


def collective_seconds(kind: str, result_bytes: float, links: GroupLinks) -> float:
    """Wire time of one collective on one chip (see the module docstring)."""
    n = links.size
    if n < 2 or links.bandwidth <= 0:
        return 0.0
    if kind == "collective-permute":
        return result_bytes / (links.bandwidth / len(links.axes))
    full = result_bytes * n if kind == "reduce-scatter" else result_bytes
    return FACTORS.get(kind, 1.0) * (n - 1) / n * full / links.bandwidth


@dataclasses.dataclass
class StepTime:
    """The roofline of one program on one chip (seconds; `collectives` per kind)."""

    compute: float
    hbm: float
    collectives: dict[str, float]
    flops: float
    peak_flops: float

    @property
    def communication(self) -> float:
        return float(sum(self.collectives.values()))

    @property
    def lower(self) -> float:
        return max(self.compute, self.hbm, self.communication)

    @property
    def upper(self) -> float:
        return max(self.compute, self.hbm) + self.communication

    @property
    def bound_by(self) -> str:
        terms = {"compute": self.compute, "HBM": self.hbm, "collectives": self.communication}
        return max(terms, key=terms.get)

    @property
    def mfu_range(self) -> tuple[float, float]:
        """(MFU if nothing overlaps, MFU if everything does)."""
        work = self.flops / self.peak_flops
        return work / self.upper, work / self.lower

    def as_dict(self) -> dict[str, Any]:
        low, high = self.mfu_range
        return dict(compute_s=self.compute, hbm_s=self.hbm, collectives_s=self.collectives,
                    communication_s=self.communication, lower_s=self.lower, upper_s=self.upper,
                    bound_by=self.bound_by, mfu_low=low, mfu_high=high)

    def format(self) -> str:
        low, high = self.mfu_range
        ms = lambda s: f"{1e3 * s:,.2f} ms"
        parts = ", ".join(f"{k} {ms(v)}" for k, v in sorted(self.collectives.items()))
        return (f"compute {ms(self.compute)}, HBM {ms(self.hbm)}, collectives {ms(self.communication)}"
                f"{' (' + parts + ')' if parts else ''}; step {ms(self.lower)} (all overlapped) to "
                f"{ms(self.upper)} (none); MFU {100 * low:.1f}% to {100 * high:.1f}%; bound by {self.bound_by}")


def step_time(chip: Chip, *, flops: float, hbm_bytes: float,
              collectives: Sequence[tuple[str, int, float, GroupLinks]]) -> StepTime:
    """collectives: (kind, executions per step, result bytes per execution, its group's links)."""
    per_kind: dict[str, float] = {}
    for kind, count, result_bytes, links in collectives:
        per_kind[kind] = per_kind.get(kind, 0.0) + count * collective_seconds(kind, result_bytes, links)
    return StepTime(compute=flops / chip.peak_flops, hbm=hbm_bytes / chip.hbm_bandwidth,
                    collectives=per_kind, flops=flops, peak_flops=chip.peak_flops)

"""Per-chip memory of the train step and the largest global batch that fits, measured by the TPU
compiler (lapflow_jax/compile_check.py) for the ImageNet 256 models on three pod slices. No TPU
is needed: the programs are compiled for the topologies' devices on this host.

    pip install -e '.[tpu]'
    python benchmarks/tpu_capacity.py --workers=2 --worker=0 &    # the cells, split over processes;
    python benchmarks/tpu_capacity.py --workers=2 --worker=1      # finished cells are skipped
    python benchmarks/tpu_capacity.py --table                     # markdown from the results

Cells: B/2 and XL/2 (32x32x4 latents, patch 2, 1000 classes), at 1 (DiT), 2 and 3 scales, on
v5e:8x8 (v5e-64: 64 chips, 16 GiB), v5p:4x4x4 (v5p-128: 64 chips, 95 GiB) and v6e:16x16 (v6e-256:
256 chips, 32 GiB), in three modes: DP (mesh chips x 1, with the B/2 config's ZeRO-1,
config.zero1), FSDP (chips x 1, config.fsdp) and FSDP + TP (chips/4 x 4, config.fsdp). Every model is bfloat16 with full remat, scanned layers and
splash attention (the configs of configs/imagenet256_*; remat and scan set here).

Per cell: the train step at the paper's global batch, 256 (a 3-scale batch must split into three
equal sub-batches over 'data', so 3 scales use the nearest batch that does: 192 on 64-way data),
then one more compile at a batch aimed past the edge (8x when nothing constrains it yet; a line
through the memory figures otherwise). The largest batch that fits is where the line through the
two compiles' per-chip memory meets the HBM the compiler offers (its own figure when it refused
a probe, e.g. 15.75 of v5e's 16 GiB; the nominal HBM otherwise): an estimate from two compiles,
printed with what the second compile showed (that batch fits, or was refused). A compile costs
40-160 s here, so the searches stop at two (MAX_PROBES; more narrows the bracket). A stored cell
with fewer probes than MAX_PROBES and SEARCH_SCALES ask for is continued, not redone.

The paper-batch compile also predicts the step time (the compile check's roofline: compute, HBM
bytes from two more compiles at depth 1 and 2, collectives over the topology's links): the table's
bounds (everything overlapped .. nothing), MFU range and binding term. A stored cell without them
(measured before they existed, on older code), or an error stored then (a refusal or a compiler
crash that the code since may have removed), is measured again whole, so an interrupted
regeneration resumes where it stopped.
Results go to benchmarks/results/tpu_capacity.jsonl, one line per cell.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ml_collections  # noqa: E402

from lapflow_jax import compile_check  # noqa: E402
from lapflow_jax import config as config_lib  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "tpu_capacity.jsonl"
PRESETS = ("B", "XL")
SCALES = (1, 2, 3)
TOPOLOGIES = {"v5e:8x8": 64, "v5p:4x4x4": 64, "v6e:16x16": 256}
MODES = {"DP": (1, False), "FSDP": (1, True), "FSDP + TP": (4, True)}  # name: (model axis, fsdp)
WINDOWS = {1: (0.0,), 2: (0.5, 0.0), 3: (2 / 3, 1 / 3, 0.0)}
PAPER_BATCH = 256
MAX_PROBES = 2
SEARCH_SCALES = (1, 2, 3)  # rows whose largest batch is searched (one more compile each)
MAX_BATCH = 2 ** 21  # a search stops above this global batch (">= 2,097,152")
GIB = 2.0 ** 30


def make_config(preset: str, num_scales: int, *, mesh_shape=(-1, 1), fsdp: bool = False,
                batch: int = PAPER_BATCH) -> ml_collections.ConfigDict:
    """The ImageNet 256 LapFlow config at this size and number of scales (1 = DiT)."""
    c = config_lib.config_from_file(REPO / "configs" / "imagenet256_b2_lapflow.py")
    c.model.preset = preset
    c.num_scales = num_scales
    c.window_starts = WINDOWS[num_scales]
    c.model.patch_sizes = (2,) * num_scales
    c.model.remat = "full"
    c.model.scan_layers = True
    c.model.attention_backend = "auto"
    c.pyramid.sigmas = (1.0,) * num_scales
    c.train.global_batch_size = batch
    c.mesh_shape = tuple(mesh_shape)
    c.fsdp = fsdp
    return c


def cells():
    for topology, chips in TOPOLOGIES.items():
        for preset in PRESETS:
            for scales in SCALES:
                for mode, (model, fsdp) in MODES.items():
                    yield dict(preset=preset, scales=scales, topology=topology, mode=mode,
                               mesh=(chips // model, model), fsdp=fsdp)


def key(cell) -> str:
    return f"{cell['preset']}/2 L={cell['scales']} {cell['topology']} {cell['mode']}"


def first_batch(unit: int) -> int:
    """The valid global batch (a multiple of `unit`) nearest the paper's 256."""
    return max(unit, round(PAPER_BATCH / unit) * unit)


def probe(cell, batch: int, *, step_time: bool = False) -> dict:
    """One compile of the cell's train step at `batch`; with step_time, also its predicted time
    (the compile check's roofline: two more compiles, at depth 1 and 2, for the HBM bytes)."""
    config = make_config(cell["preset"], cell["scales"], mesh_shape=cell["mesh"], fsdp=cell["fsdp"], batch=batch)
    report = compile_check.check(config, cell["topology"], sampling_programs=False, num_classes=1000,
                                 count_flops=step_time, log=lambda *_: None)
    step = report.programs[0]
    out = dict(batch=batch, fits=step.fits, total=step.total, arguments=step.arguments,
               temporaries=step.temporaries, compile_seconds=round(step.compile_seconds, 1), hbm=step.hbm,
               usable=step.out_of_memory[1] if step.out_of_memory else None,
               collectives={c.kind: [c.count, c.bytes] for c in step.collectives},
               step_time=step.step_time.as_dict() if step.step_time else None)
    print(f"  {key(cell)} batch {batch}: {step.total / GIB:.2f} GiB {'fits' if step.fits else 'does NOT fit'} "
          f"({step.compile_seconds:.0f} s)", flush=True)
    return out


def measure(cell, probes: list[dict] | None = None) -> dict:
    """The cell's probes (continuing `probes`, a stored result's, when given) and estimate."""
    result = dict(cell, key=key(cell))
    unit = cell["mesh"][0] * cell["scales"]
    batch = first_batch(unit)
    compile_check.topology_devices(cell["topology"])  # a missing TPU compiler stops here, not below
    if not probes:
        try:
            probes = [probe(cell, batch, step_time=True)]
        except ValueError as e:  # a mesh the model cannot be sharded on: say why, do not guess
            return error_result(cell, str(e).splitlines()[0])
    while len(probes) < (MAX_PROBES if cell["scales"] in SEARCH_SCALES else 1):
        guess = next_batch(probes, unit)
        if guess is None:
            break
        probes.append(probe(cell, guess))
    fitting = [p for p in probes if p["fits"]]
    refused = [p for p in probes if not p["fits"]]
    return dict(result, unit=unit, probes=probes, at_paper_batch=probes[0],
                largest_fitting=max((p["batch"] for p in fitting), default=0),
                smallest_refused=min((p["batch"] for p in refused), default=None),
                estimate=largest_batch_estimate(probes, unit))


def largest_batch_estimate(probes: list[dict], unit: int) -> int | None:
    """Where the line through the two probes nearest the edge meets the usable HBM (the compiler's
    figure where it refused a probe, else the nominal HBM), rounded down to the batch unit and
    kept inside what the probes showed (at least the largest fitting, below the smallest refused)."""
    if len(probes) < 2:
        return None
    usable = next((p["usable"] for p in probes if p["usable"]), probes[0]["hbm"])
    a, b = sorted(sorted(probes, key=lambda p: abs(p["total"] - usable))[:2], key=lambda p: p["batch"])
    slope = (b["total"] - a["total"]) / (b["batch"] - a["batch"])
    if slope <= 0:
        return None
    estimate = int((a["batch"] + (usable - a["total"]) / slope) // unit) * unit
    lo = max((p["batch"] for p in probes if p["fits"]), default=0)
    hi = min((p["batch"] for p in probes if not p["fits"]), default=None)
    estimate = max(estimate, lo)
    return min(estimate, hi - unit) if hi is not None else estimate


def next_batch(probes: list[dict], unit: int) -> int | None:
    """The next batch to compile, or None when the largest fitting batch is known closely enough.

    Aims a straight line through the two probes nearest the edge at the usable HBM (the
    compiler's figure once it has refused a probe, 97% of the nominal HBM before), a little past
    it while nothing has been refused (so the next probe brackets the edge), a little short of it
    while nothing fits.
    """
    lo = max((p["batch"] for p in probes if p["fits"]), default=0)
    hi = min((p["batch"] for p in probes if not p["fits"]), default=None)
    if hi is not None and (hi - lo <= unit or (lo and hi - lo <= lo / 8)):
        return None
    if hi == unit or (hi is None and lo >= MAX_BATCH):
        return None
    usable = next((p["usable"] for p in probes if p["usable"]), 0.97 * probes[0]["hbm"])
    near = sorted(probes, key=lambda p: abs(p["total"] - usable))[:2]
    a, b = sorted(near, key=lambda p: p["batch"]) if len(near) == 2 else near * 2
    slope = (b["total"] - a["total"]) / (b["batch"] - a["batch"]) if b["batch"] > a["batch"] else 0
    if hi is None:    # everything fitted so far: step past the edge
        guess = b["batch"] + (1.03 * usable - b["total"]) / slope if slope > 0 else 8 * lo
        guess = min(max(guess, 1.0625 * lo), 16 * lo, MAX_BATCH)
    elif not lo:      # nothing fitted yet: step under it
        guess = a["batch"] + (0.97 * usable - a["total"]) / slope if slope > 0 else hi / 4
        guess = min(guess, hi / 1.0625)
    else:             # bracketed: interpolate
        guess = a["batch"] + (usable - a["total"]) / slope if slope > 0 else (lo + hi) / 2
    guess = int(guess // unit) * unit
    guess = max(guess, lo + unit, unit)
    if hi is not None:
        guess = min(guess, hi - unit)
    return None if any(p["batch"] == guess for p in probes) else guess


def unfinished(result: dict) -> bool:
    """A stored cell whose search has fewer probes than it is due (SEARCH_SCALES grew since)."""
    return ("error" not in result and result["scales"] in SEARCH_SCALES and len(result["probes"]) < MAX_PROBES
            and next_batch(result["probes"], result["unit"]) is not None)


# 2: cells measured with the predicted step time (a result with a step time, or an error stored
# with format 2). Earlier cells are older code: an error among them may no longer hold (FSDP over
# 256 chips was refused before FSDP groups existed), so they are measured again too.
RESULT_FORMAT = 2


def error_result(cell, error: str) -> dict:
    """A cell that could not be measured, stored with the reason (a refusal or a crash)."""
    return dict(cell, key=key(cell), error=error, format=RESULT_FORMAT)


def stale(result: dict) -> bool:
    """A stored cell measured before RESULT_FORMAT (the table's predicted step times): measured
    again whole, errors included."""
    if "error" in result:
        return result.get("format", 1) < RESULT_FORMAT
    return "step_time" not in result["at_paper_batch"]


def load() -> dict[str, dict]:
    if not RESULTS.exists():
        return {}
    return {r["key"]: r for r in map(json.loads, RESULTS.read_text().splitlines())}


def error_text(result: dict) -> str:
    if "cannot shard these parameters evenly" in result["error"]:
        width = 768 if result["preset"] == "B" else 1152
        return f"FSDP cannot split the {width}-wide weights over {result['mesh'][0]} chips"
    if "a crash" in result["error"]:
        return "the TPU compiler crashed (SIGSEGV)"
    return result["error"][:90]


def predicted(step_time: dict | None) -> str:
    """The step-time columns: bounds (everything overlapped .. nothing), MFU range, binding term."""
    if not step_time:
        return "- | - | -"
    t = step_time
    return (f"{1e3 * t['lower_s']:,.1f} .. {1e3 * t['upper_s']:,.1f} | {100 * t['mfu_low']:.1f}% .. "
            f"{100 * t['mfu_high']:.1f}% | {t['bound_by']}")


def table(results: dict[str, dict]) -> str:
    lines = []
    for topology, chips in TOPOLOGIES.items():
        rows = [r for r in results.values() if r["topology"] == topology]
        if not rows:
            continue
        hbm = next((r["at_paper_batch"]["hbm"] for r in rows if "at_paper_batch" in r), 0) / GIB
        lines += [f"**{topology}** ({chips} chips, {hbm:.0f} GiB HBM each)", "",
                  "| model | scales | mode | mesh | batch | state GiB | temporaries GiB | total GiB per chip | "
                  "largest batch that fits (estimate; probe) | predicted step ms | MFU | bound by | compile s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for cell in cells():
            r = results.get(key(cell))
            if cell["topology"] != topology or r is None:
                continue
            head = f"| {cell['preset']}/2 | {cell['scales']}{' (DiT)' if cell['scales'] == 1 else ''} | " \
                   f"{cell['mode']} | {cell['mesh'][0]}x{cell['mesh'][1]} |"
            if "error" in r:
                lines.append(f"{head} - | - | - | - | {error_text(r)} | - | - | - | - |")
                continue
            p = r["at_paper_batch"]
            if p["fits"]:
                memory = f"{p['arguments'] / GIB:.2f} | {p['temporaries'] / GIB:.2f} | {p['total'] / GIB:.2f}"
            else:
                memory = f"- | - | {p['total'] / GIB:.2f} (refused)"
            largest = {None: "-", 0: "none"}.get(r.get("estimate"), f"~{r.get('estimate') or 0:,}")
            if not r["largest_fitting"] and r.get("smallest_refused") == r["unit"]:
                largest = "none"  # even the smallest batch that splits over 'data' is refused
            seen = [f"{p['batch']:,} {'fits' if p['fits'] else 'refused'}" for p in r["probes"][1:]]
            largest += f" ({', '.join(seen)})" if seen else ""
            lines.append(f"{head} {p['batch']} | {memory} | {largest} | {predicted(p.get('step_time'))} | "
                         f"{p['compile_seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print the tables from the results and stop")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--only", default="", help="substring of the cells' keys to run, e.g. 'XL/2 L=2'")
    parser.add_argument("--cell", default="", help="measure this one cell (its key) in this process")
    args = parser.parse_args()
    if args.table:
        print(table(load()))
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if args.cell:
        cell = next(c for c in cells() if key(c) == args.cell)
        start = time.perf_counter()
        stored = load().get(args.cell, {})
        probes = None if not stored or stale(stored) else stored.get("probes")
        result = dict(measure(cell, probes), seconds=round(time.perf_counter() - start, 1))
        with RESULTS.open("a") as f:
            f.write(json.dumps(result) + "\n")
        return
    for i, cell in enumerate(cells()):
        stored = load().get(key(cell))
        if i % args.workers != args.worker or args.only not in key(cell) or (
                stored and not unfinished(stored) and not stale(stored)):
            continue
        print(f"{key(cell)}, mesh {cell['mesh']}:", flush=True)
        # One process per cell: a compiler crash (libtpu has segfaulted on one cell here) is
        # recorded as that cell's result instead of ending the run.
        proc = subprocess.run([sys.executable, __file__, f"--cell={key(cell)}"])
        if proc.returncode:
            with RESULTS.open("a") as f:
                f.write(json.dumps(error_result(cell, f"the compile check exited with status {proc.returncode} "
                                                      "(a crash)")) + "\n")


if __name__ == "__main__":
    main()

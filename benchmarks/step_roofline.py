"""A paper config's train step on the local accelerator: its measured time beside the roofline.

    python benchmarks/step_roofline.py        # on a GPU: the B/2 baseline and 2-scale LapFlow, batch 256
    python benchmarks/step_roofline.py --configs=configs/imagenet256_xl2_lapflow.py --batch=64
    python benchmarks/step_roofline.py --smoke --json=/tmp/roofline.json    # CPU: a tiny stand-in

The compile check predicts a TPU step's time from the compiler alone (lapflow_jax.roofline,
docs/compile_check.md). This benchmark checks that prediction where a step can be timed: each
config's train step is compiled for ONE local device at --batch (default: the config's global
batch), timed on synthetic latents and labels, and set beside the same roofline:

    compute = model FLOPs per step / peak      (step_cost.model_flops_per_chip: XLA's count)
    HBM     = bytes accessed per step / bandwidth   (step_cost.hbm_bytes_per_chip: the local
              compiler's cost analysis of the step at depth 1 and 2, extrapolated to the depth)

One device, so no collectives: the roofline's lower and upper bounds coincide at max(compute,
HBM), the compile check's prediction with nothing to overlap. Two sets of ceilings, both printed:

    datasheet  roofline.CHIPS's figures for the device kind (H200: 989 TFLOP/s, 4.8 TB/s)
    measured   a bf16 8192^3 matrix product and an elementwise pass over 4 GiB, timed in this run

The ratio measured / predicted says how far the step is from its roofline (1.0: at it). On a TPU
the compile check prints the same terms from the same sources, so the ratio measured here is a
measure of how optimistic its MFU range is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from lapflow_jax import config as config_lib  # noqa: E402
from lapflow_jax import parallel, roofline, step_cost, train  # noqa: E402

DEFAULT_CONFIGS = "configs/imagenet256_b2_baseline.py,configs/imagenet256_b2_lapflow.py"
TRACED_STEPS = 3   # steps under the profiler with --trace_dir


def load_config(path: str, *, batch: int | None, attention_backend: str, smoke: bool):
    """The config file's get_config(), on one device at `batch` (a tiny model with --smoke)."""
    config = config_lib.config_from_file(path)
    config.mesh_shape = (1, 1)
    config.fsdp = False
    if batch:
        config.train.global_batch_size = batch
    if attention_backend:
        config.model.attention_backend = attention_backend
    if smoke:
        config.model.preset = "tiny"
        config.model.dtype = "float32"
        config.model.attention_backend = "xla"
    return config


def _seconds(fn, *args, repeats: int) -> float:
    """Median seconds of `fn(*args)` after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_ceilings(*, smoke: bool) -> roofline.Chip:
    """The device's reachable bf16 matmul rate and HBM bandwidth, timed here."""
    n = 1024 if smoke else 8192
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.bfloat16)
    flops = 2 * n ** 3 / _seconds(jax.jit(jnp.matmul), a, a, repeats=10)
    x = jnp.zeros(((16 if smoke else 1024) * 2 ** 20,), jnp.float32)   # 64 MiB / 4 GiB
    bandwidth = 2 * x.nbytes / _seconds(jax.jit(lambda v: v + 1.0), x, repeats=10)   # read + write
    return roofline.Chip("measured", flops, bandwidth, 0, 0.0, "none")


def time_train_step(setup: train.Setup, *, steps: int, trace_dir: str = "") -> dict:
    """Compiles the train step and times `steps` of it on synthetic inputs (after 2 warm-ups);
    with `trace_dir`, then traces 3 more steps there (jax.profiler, with a Perfetto JSON trace)."""
    batch = setup.config.train.global_batch_size
    rng = np.random.default_rng(0)
    inputs = {"image": rng.standard_normal((batch,) + tuple(setup.image_shape)).astype(np.float32)}
    if setup.num_classes > 0:
        inputs["label"] = rng.integers(0, setup.num_classes, (batch,)).astype(np.int32)
    data = parallel.global_batch(inputs, setup.mesh)
    state = train.create_state(setup, np.ones(setup.config.num_scales, np.float32))
    start = time.perf_counter()
    step = train.make_train_step(setup).lower(state, data).compile()
    compile_seconds = time.perf_counter() - start
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        state, metrics = step(state, data)
        loss = float(metrics["loss"])   # blocks until the step is done
        if i >= 2:
            times.append(time.perf_counter() - start)
    if not np.isfinite(loss):
        raise FloatingPointError("the timed train step gave a non-finite loss")
    if trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(TRACED_STEPS):
                state, metrics = step(state, data)
            float(metrics["loss"])
    return dict(compile_s=compile_seconds, step_s_median=float(np.median(times)), step_s_min=float(min(times)))


# Device kernels by what they do, first match wins (XLA GPU names: cuBLAS/nvjet/cutlass GEMMs,
# cuDNN's fused attention, memcpy, and XLA's own fusions; a TPU trace names its ops by HLO).
KERNEL_CLASSES = (("matmul", ("gemm", "nvjet", "cutlass", "cublas", "xmma", "convolution", "dot")),
                  ("attention", ("sdpa", "flash", "fmha", "softmax", "compute_dot_do_o")),
                  ("copy", ("memcpy", "memset", "copy", "dynamic_update_slice", "dynamic-update-slice")))


def kernel_breakdown(trace_dir: str | Path, steps: int) -> dict[str, dict[str, float]]:
    """Device time per step by kernel class, from the profiler trace(s) under trace_dir.

    Reads every *.trace.json.gz (Chrome trace format) below trace_dir, keeps the complete events
    ("ph": "X") of processes named /device:..., and sums their durations by KERNEL_CLASSES (else
    "other": XLA's elementwise and reduction fusions). Returns {class: {"ms_per_step", "kernels_per_step",
    "fraction"}}; empty where the trace has no device process (a CPU run)."""
    import gzip

    totals: dict[str, list[float]] = {}
    for f in sorted(Path(trace_dir).rglob("*.trace.json.gz")):
        events = json.loads(gzip.open(f).read())["traceEvents"]
        devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                   and str(e.get("args", {}).get("name", "")).startswith("/device:")}
        for e in events:
            if e.get("ph") == "X" and e.get("pid") in devices:
                name = e["name"].lower()
                kind = next((k for k, keys in KERNEL_CLASSES if any(key in name for key in keys)), "other")
                total = totals.setdefault(kind, [0.0, 0])
                total[0] += float(e["dur"])
                total[1] += 1
    busy = sum(t for t, _ in totals.values())
    return {k: {"ms_per_step": t / 1e3 / steps, "kernels_per_step": n / steps, "fraction": t / busy}
            for k, (t, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])}


def run_config(path: str, args, measured: roofline.Chip) -> dict:
    config = load_config(path, batch=args.batch, attention_backend=args.attention_backend, smoke=args.smoke)
    setup = train.make_setup(config, parallel.mesh_for(config, jax.devices()[:1]), dataset_classes=args.num_classes)
    flops = step_cost.model_flops_per_chip(setup)
    hbm_bytes = step_cost.hbm_bytes_per_chip(setup)
    result = dict(config=path, num_scales=config.num_scales, batch=config.train.global_batch_size,
                  gflops=flops / 1e9, hbm_gb=hbm_bytes / 1e9, **time_train_step(setup, steps=args.steps,
                                    trace_dir=args.trace_dir and f"{args.trace_dir}/{Path(path).stem}"))
    if args.trace_dir:
        result["kernels"] = kernel_breakdown(f"{args.trace_dir}/{Path(path).stem}", steps=TRACED_STEPS)
    chips = {"measured": measured}
    datasheet = roofline.CHIPS.get(jax.devices()[0].device_kind)
    if datasheet:
        chips["datasheet"] = datasheet
    for name, chip in chips.items():
        predicted = roofline.step_time(chip, flops=flops, hbm_bytes=hbm_bytes, collectives=())
        result[name] = dict(predicted.as_dict(), peak_flops=chip.peak_flops, hbm_bandwidth=chip.hbm_bandwidth,
                            measured_over_predicted=result["step_s_median"] / predicted.lower,
                            mfu_measured=flops / chip.peak_flops / result["step_s_median"])
    print(f"  {json.dumps(result)}", flush=True)
    return result


def print_report(results: list[dict], measured: roofline.Chip) -> None:
    print(f"\nTrain step on {common.device_description()}; ceilings measured here: "
          f"{measured.peak_flops / 1e12:.3g} TFLOP/s bf16, {measured.hbm_bandwidth / 1e9:,.0f} GB/s")
    headers = ["config", "batch", "GFLOPs", "HBM GB", "compile s", "measured ms (median)"]
    ceilings = [c for c in ("datasheet", "measured") if c in results[0]]
    for c in ceilings:
        headers += [f"{c}: compute / HBM ms", f"{c}: predicted ms", f"{c}: measured / predicted",
                    f"{c}: MFU predicted", f"{c}: MFU measured"]
    rows = []
    for r in results:
        row = [Path(r["config"]).stem, r["batch"], r["gflops"], r["hbm_gb"], r["compile_s"], 1e3 * r["step_s_median"]]
        for c in ceilings:
            p = r[c]
            row += [f"{1e3 * p['compute_s']:.1f} / {1e3 * p['hbm_s']:.1f}", f"{1e3 * p['lower_s']:.1f} ({p['bound_by']})",
                    f"{p['measured_over_predicted']:.2f}", f"{100 * p['mfu_high']:.1f}%",
                    f"{100 * p['mfu_measured']:.1f}%"]
        rows.append(row)
    print(common.markdown_table(headers, rows))
    for r in results:
        if r.get("kernels"):
            print(f"{Path(r['config']).stem}: device time per step by kernel class (trace): " + ", ".join(
                f"{k} {v['ms_per_step']:.1f} ms ({100 * v['fraction']:.0f}%, {v['kernels_per_step']:.0f} kernels)"
                for k, v in r["kernels"].items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated config files")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: each config's)")
    parser.add_argument("--attention_backend", default="", help="override config.model.attention_backend")
    parser.add_argument("--num_classes", type=int, default=1000, help="label classes of the synthetic data")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per config")
    parser.add_argument("--smoke", action="store_true", help="a tiny float32 model (checks the script on CPU)")
    parser.add_argument("--trace_dir", default="", help="also write a profiler trace of 3 steps per config here "
                        "and report device time by kernel class from it")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    measured = measure_ceilings(smoke=args.smoke)
    results = []
    for path in args.configs.split(","):
        results.append(run_config(path, args, measured))
        if args.json:   # after each config: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps({"args": vars(args), "device": common.device_description(),
                                                   "results": results}, indent=2))
    print_report(results, measured)
    return results


if __name__ == "__main__":
    main()

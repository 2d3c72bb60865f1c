"""Sampling cost: LapFlow vs the single-scale baseline at the same width, depth, resolution and NFE.

    python benchmarks/sampling.py                       # CPU defaults: 32x32x3, width 256, depth 6, patch 2
    python benchmarks/sampling.py --image_size 32 --channels 4 --preset B --dtype bfloat16   # B/2 latent

For the baseline (L = 1), LapFlow with 2 scales and T = 0.5 (the paper's setting) and with 3
scales (T = 1/3, 2/3), all with the same fixed-step solver and the same total NFE (split over
LapFlow's segments in proportion to their length), prints per segment the tokens per call, the
NFE and the XLA GFLOPs per call, then GFLOPs per sample (XLA counts 2 per multiply-add; DiT's
"GFLOPs" are MACs, shown as GMACs) and wall seconds per sample, and the baseline/LapFlow ratios
next to the token arithmetic (average tokens per call; attention's quadratic term and per-call
constants make the FLOPs ratio differ slightly from it).

Why wall time can gain less than FLOPs: on a small model each call has a fixed cost (dispatch,
the time/class embedding, per-scale adaLN projections, pyramid bookkeeping) that does not shrink
with tokens; LapFlow's coarse-only segment runs at a tiny token count where the hardware is
least efficient; and every segment is its own compiled loop.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402


def run(spec: common.ModelSpec, *, batch: int, nfe: int, method: str, guidance: float, repeats: int,
        settings=("baseline", "lapflow2", "lapflow3"), timed: bool = True) -> dict:
    """Measures every setting; returns {setting: measurement} plus ratios against the baseline."""
    from lapflow_jax import flops as flops_lib
    from lapflow_jax import paths, sampling

    per_call = 1 if method == "euler" else 2
    if nfe % per_call:
        raise ValueError(f"--nfe {nfe} must be a multiple of {per_call} for {method}.")
    results, runs = {}, {}
    for name in settings:
        starts = common.SETTINGS[name]
        steps = sampling.steps_per_segment(paths.MultiScalePath(starts), nfe // per_call)
        results[name], runs[name] = common.prepare_sampling(spec, starts, batch=batch, steps_per_segment=steps,
                                                            method=method, guidance=guidance, timed=timed)
    if timed:
        for name, t in common.time_interleaved(runs, repeats).items():
            results[name].update(seconds_per_sample=t["min"] / batch, seconds_per_sample_median=t["median"] / batch)
    for name in settings:
        print(f"  measured {name}: {json.dumps(results[name])}", flush=True)
    base = results["baseline"]
    for name, r in results.items():
        if name == "baseline":
            continue
        # Equal NFE is the comparison: rescale the baseline if rounding gave LapFlow a different total.
        scale = sum(r["nfe_per_segment"]) / sum(base["nfe_per_segment"])
        r["flops_ratio"] = base["gflops_per_sample"] * scale / r["gflops_per_sample"]
        r["time_ratio"] = base["seconds_per_sample"] * scale / r["seconds_per_sample"]
        r["token_ratio"] = flops_lib.token_ratio(r["window_starts"], (spec.patch,) * len(r["window_starts"]),
                                                 spec.image_size)
    return results


def print_report(spec: common.ModelSpec, results: dict, *, batch: int, method: str, guidance: float) -> None:
    print(f"\nSampling, {spec.image_size}x{spec.image_size}x{spec.channels}, width {spec.width}, depth {spec.depth}, "
          f"patch {spec.patch}, {spec.dtype}, batch {batch}, {method}, CFG {guidance}; {common.device_description()}")
    rows = []
    for name, r in results.items():
        rows.append([common.LABELS[name], r["tokens_per_segment"], r["nfe_per_segment"], r["gflops_per_call"],
                     r["gflops_per_sample"], r["gmacs_per_sample"], r["seconds_per_sample"] * 1e3,
                     r.get("seconds_per_sample_median", float("nan")) * 1e3,
                     f"{r['flops_ratio']:.3f}x" if "flops_ratio" in r else "1",
                     f"{r['time_ratio']:.3f}x" if "time_ratio" in r else "1",
                     f"{r['token_ratio']:.3f}x" if "token_ratio" in r else "1"])
    print(common.markdown_table(
        ["model", "tokens/call per segment", "NFE per segment", "GFLOPs/call per segment", "GFLOPs/sample",
         "GMACs/sample (DiT units)", "ms/sample (best)", "ms/sample (median)", "FLOPs ratio", "time ratio",
         "token ratio"], rows))
    print("ratios are baseline / LapFlow at equal NFE (> 1: LapFlow is cheaper); the time ratio uses the best "
          "of the repeats")


def parse_spec(args) -> common.ModelSpec:
    from lapflow_jax.models import presets

    width, depth, heads = presets.PRESETS[args.preset] if args.preset != "tiny" else (args.width, args.depth, args.heads)
    return common.ModelSpec(image_size=args.image_size, channels=args.channels, width=width, depth=depth, heads=heads,
                            patch=args.patch, dtype=args.dtype, preset=args.preset, num_classes=args.num_classes,
                            attention_backend=args.attention_backend)


def add_model_args(parser, *, image_size=32, channels=3, width=256, depth=6, heads=4, patch=2, dtype="float32"):
    parser.add_argument("--image_size", type=int, default=image_size)
    parser.add_argument("--channels", type=int, default=channels)
    parser.add_argument("--preset", default="tiny", help="tiny (use --width/--depth/--heads), S, B, L or XL")
    parser.add_argument("--width", type=int, default=width)
    parser.add_argument("--depth", type=int, default=depth)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--patch", type=int, default=patch)
    parser.add_argument("--dtype", default=dtype, choices=("float32", "bfloat16"))
    parser.add_argument("--num_classes", type=int, default=10, help="0: unconditional")
    parser.add_argument("--attention_backend", default="xla")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--nfe", type=int, default=24, help="total model calls (per sample)")
    parser.add_argument("--method", default="euler", choices=("euler", "heun"))
    parser.add_argument("--guidance", type=float, default=1.0, help="CFG scale (!= 1 doubles each call's batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flops_only", action="store_true", help="count GFLOPs only (no sampling is run)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    spec = parse_spec(args)
    results = run(spec, batch=args.batch, nfe=args.nfe, method=args.method, guidance=args.guidance,
                  repeats=args.repeats, timed=not args.flops_only)
    print_report(spec, results, batch=args.batch, method=args.method, guidance=args.guidance)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""Training cost: LapFlow vs the single-scale baseline at the same global batch.

    python benchmarks/training.py                  # CPU defaults: 32x32x3, width 256, depth 6, patch 2, batch 24

Times the project's compiled train step (pyramid, per-stage sub-batches, MoT, loss, AdamW, EMA)
on synthetic images for the baseline, LapFlow 2-scale (T = 0.5) and 3-scale, at the same global
batch, and prints step time, images/s and the step's XLA GFLOPs with baseline/LapFlow ratios.

Token arithmetic for training: the batch is split into equal sub-batches per stage f (finest
included scale). With 2 scales and patch p at both, stage 0 sees N + N/4 tokens per image and
stage 1 N/4, an average of 0.75 N: about 1.33x fewer FLOPs than the baseline's N, as in sampling.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.sampling import add_model_args, parse_spec  # noqa: E402


def training_token_ratio(window_starts, spec: common.ModelSpec) -> float:
    """Baseline / LapFlow tokens per image with equal sub-batches per stage."""
    L = len(window_starts)
    per_scale = [((spec.image_size >> k) // spec.patch) ** 2 for k in range(L)]
    lapflow = sum(sum(per_scale[f:]) for f in range(L)) / L
    return per_scale[0] / lapflow


def run(spec: common.ModelSpec, *, batch: int, repeats: int, settings=("baseline", "lapflow2", "lapflow3")) -> dict:
    results, runs = {}, {}
    for name in settings:
        starts = common.SETTINGS[name]
        if batch % len(starts):
            raise ValueError(f"--batch {batch} must be divisible by the {len(starts)} stages of {name}.")
        results[name], runs[name] = common.prepare_training(spec, starts, batch=batch)
    for name, t in common.time_interleaved(runs, repeats).items():
        results[name].update(seconds_per_step=t["min"], seconds_per_step_median=t["median"],
                             images_per_s=batch / t["min"])
        print(f"  measured {name}: {json.dumps(results[name])}", flush=True)
    base = results["baseline"]
    for name, r in results.items():
        if name != "baseline":
            r["flops_ratio"] = base["gflops_per_step"] / r["gflops_per_step"]
            r["time_ratio"] = base["seconds_per_step"] / r["seconds_per_step"]
            r["token_ratio"] = training_token_ratio(r["window_starts"], spec)
    return results


def print_report(spec: common.ModelSpec, results: dict, *, batch: int, peak_tflops: float | None = None) -> None:
    print(f"\nTraining, {spec.image_size}x{spec.image_size}x{spec.channels}, width {spec.width}, depth {spec.depth}, "
          f"patch {spec.patch}, {spec.dtype}, global batch {batch}; {common.device_description()}")
    headers = ["model", "sub-batch per stage", "s/step (best)", "s/step (median)", "images/s", "GFLOPs/step",
               "TFLOP/s per device", "FLOPs ratio", "time ratio", "token ratio"]
    if peak_tflops:
        headers.append("MFU")
    rows = []
    for name, r in results.items():
        r["tflops_per_s_per_device"] = r["gflops_per_step_per_device"] / r["seconds_per_step"] / 1e3
        row = [common.LABELS[name], r["stage_batch_sizes"], r["seconds_per_step"], r["seconds_per_step_median"],
               r["images_per_s"], r["gflops_per_step"], r["tflops_per_s_per_device"],
               f"{r['flops_ratio']:.3f}x" if "flops_ratio" in r else "1",
               f"{r['time_ratio']:.3f}x" if "time_ratio" in r else "1",
               f"{r['token_ratio']:.3f}x" if "token_ratio" in r else "1"]
        if peak_tflops:
            r["mfu"] = r["tflops_per_s_per_device"] / peak_tflops
            row.append(f"{100 * r['mfu']:.1f}%")
        rows.append(row)
    print(common.markdown_table(headers, rows))
    print("ratios are baseline / LapFlow at the same global batch (> 1: LapFlow is cheaper)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--batch", type=int, default=24, help="global batch (divisible by 1, 2 and 3 stages)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    spec = parse_spec(args)
    results = run(spec, batch=args.batch, repeats=args.repeats)
    print_report(spec, results, batch=args.batch)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()

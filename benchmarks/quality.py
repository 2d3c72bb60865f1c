"""Sample quality at CPU scale: LapFlow vs the single-scale baseline on Fashion-MNIST, same budget.

    nice -n 10 python benchmarks/quality.py            # ~15 min on 2 CPU cores (defaults)

Both models have the same width, depth and finest patch size; both train for the same number
of steps at the same batch (so LapFlow spends ~1.3x fewer FLOPs), with the same seeds, through
the project's own train loop (train.train) on class-conditional Fashion-MNIST padded to 32x32
(Debian package dataset-fashion-mnist). Then the eval mode (evaluate.py) samples
--num_samples images from each (balanced classes, the EMA weights) and measures, against as many
held-out test images:
  - fd_efficientnet: Fréchet distance of ImageNet EfficientNet-Lite0 features (not an FID:
    values are not comparable with published numbers);
  - swd: ProGAN's sliced Wasserstein distance on Laplacian-pyramid patches (x1e3).
Lower is better for both. Prints a table and writes small PNG grids (10 columns = the 10
classes) and quality.json into --out.

What it can show: whether the multi-scale model learns as well as the baseline per step at a
fraction of the FLOPs, on a tiny model and a short run. What it cannot: the paper's FID gap at
256 px in latent space (model, data and training budget are ~1000x smaller; a few hundred
samples give noisy, biased Fréchet distances; differences of a few percent are within noise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def make_config(args, num_scales: int):
    from lapflow_jax.config import base_config

    c = base_config()
    c.seed = args.seed
    c.num_scales = num_scales
    c.window_starts = {1: (0.0,), 2: (args.window, 0.0), 3: (2 / 3, 1 / 3, 0.0)}[num_scales]
    c.model.preset = "tiny"
    c.model.hidden_size = args.width
    c.model.depth = args.depth
    c.model.num_heads = args.heads
    c.model.patch_sizes = (args.patch,) * num_scales
    c.model.conditional = True
    c.data.name = "fashion_mnist"
    c.data.image_size = 32
    c.data.channels = 1
    c.data.fashion_mnist_pad_to = 32
    c.train.global_batch_size = args.batch
    c.train.num_steps = args.steps
    c.train.learning_rate = args.lr
    c.train.warmup_steps = min(100, args.steps // 10)
    c.train.schedule = "cosine"
    c.train.ema_decay = args.ema
    c.checkpoint.every_steps = args.steps
    c.checkpoint.keep = 1
    c.log.every_steps = max(1, args.steps // 10)
    c.sample.num_images = 20          # the end-of-training grid (+ coarse-to-fine strip)
    c.sample.batch_size = args.sample_batch
    c.sample.method = args.method
    c.sample.steps = args.sample_steps
    c.sample.guidance_scale = args.guidance
    c.mesh_shape = (1, 1)
    c.eval.metrics = ("fd_efficientnet", "swd")
    c.eval.num_samples = args.num_samples
    c.eval.reference_split = "test"
    c.eval.feature_batch_size = 50
    return c


def train_stats(workdir: Path) -> dict:
    """Mean steps/s and XLA GFLOPs per step from the run's metrics.jsonl (first report excluded:
    it includes compilation)."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "steps_per_s" in r][1:] or [r for r in records if "steps_per_s" in r]
    steps_per_s = sum(r["steps_per_s"] for r in timed) / len(timed)
    flops = [r["tflops_per_s_per_device"] * 1e3 / r["steps_per_s"] for r in timed if "tflops_per_s_per_device" in r]
    return {"steps_per_s": steps_per_s, "gflops_per_step": flops[0] if flops else None,
            "final_loss": records[-1]["loss"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--window", type=float, default=0.5, help="LapFlow's fine-scale window start T")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--num_samples", type=int, default=600)
    parser.add_argument("--sample_batch", type=int, default=200)
    parser.add_argument("--method", default="heun")
    parser.add_argument("--sample_steps", type=int, default=16)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/lapflow_quality")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    from lapflow_jax import evaluate, generate, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    cache = root / "reference_cache"
    rows = {}
    wall_start = time.perf_counter()
    for name, scales in (("baseline", 1), ("lapflow", 2)):
        config = make_config(args, scales)
        workdir = root / name
        t0 = time.perf_counter()
        summary = train.train(config, str(workdir))
        train_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = evaluate.evaluate_from_checkpoint(config, str(workdir), cache_dir=cache)
        eval_seconds = time.perf_counter() - t0
        stats = train_stats(workdir)
        sampling = result["sampling"]
        rows[name] = {"num_scales": scales, "window_starts": list(config.window_starts), "train_seconds": train_seconds,
                      "eval_seconds": eval_seconds, **stats, "sampling_nfe": sampling["nfe_total"],
                      "sampling_gflops_per_sample": sampling["gflops"]["gflops_per_sample"],
                      "sampling_seconds_per_sample": sampling["seconds_per_sample"], **result["metrics"]}
        # Small grids to commit: 6 rows x 10 classes of eval samples.
        with open(workdir / "eval" / f"step{summary['step']:07d}" / "samples" / "samples.npz", "rb") as f:
            images = np.load(f)["images"][:60].astype(np.float32) / 127.5 - 1.0
        generate.save_png(out / f"quality_{name}.png", generate.image_grid(images, columns=10))
        strips = sorted((workdir / "samples").glob("coarse_to_fine_step*.png"))
        if strips and scales > 1:  # one scale has one segment: its "strip" is just the samples
            shutil.copy(strips[-1], out / f"quality_{name}_coarse_to_fine.png")
        print(f"[{time.perf_counter() - wall_start:.0f}s] {name}: {json.dumps(rows[name])}", flush=True)
    reference = evaluate.dataset_images(make_config(args, 1).data, "test", 60)
    generate.save_png(out / "quality_reference.png", generate.image_grid(reference, columns=10))

    total = time.perf_counter() - wall_start
    base, lap = rows["baseline"], rows["lapflow"]
    cols = [("train s", "train_seconds", ".0f"), ("steps/s", "steps_per_s", ".2f"),
            ("GFLOP/step", "gflops_per_step", ".1f"), ("final loss", "final_loss", ".3f"),
            ("NFE", "sampling_nfe", ".0f"), ("GFLOP/sample", "sampling_gflops_per_sample", ".3f"),
            ("s/sample", "sampling_seconds_per_sample", ".4f"), ("FD-EffNet", "fd_efficientnet", ".2f"),
            ("SWD avg", "swd_avg", ".1f"), ("SWD 32", "swd_32", ".1f"), ("SWD 16", "swd_16", ".1f")]
    print(f"\nFashion-MNIST 32x32x1, class-conditional, {args.steps} steps x batch {args.batch}, width {args.width}, "
          f"depth {args.depth}, patch {args.patch}; {args.num_samples} samples ({args.method}, {args.sample_steps} "
          f"steps, CFG {args.guidance}) vs {args.num_samples} held-out test images; {jax.devices()[0].device_kind}")
    print("| model | " + " | ".join(c[0] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in (("1-scale baseline", base), (f"LapFlow 2-scale T={args.window}", lap)):
        print(f"| {name} | " + " | ".join(format(row[k], f) if row.get(k) is not None else "-" for _, k, f in cols)
              + " |")
    ratios = {"train_gflops": base["gflops_per_step"] / lap["gflops_per_step"] if lap["gflops_per_step"] else None,
              "train_time": base["train_seconds"] / lap["train_seconds"],
              "sample_gflops": base["sampling_gflops_per_sample"] / lap["sampling_gflops_per_sample"],
              "sample_time": base["sampling_seconds_per_sample"] / lap["sampling_seconds_per_sample"]}
    print("baseline / LapFlow: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items() if v is not None))
    print("(FLOPs ratios are exact; wall-time ratios only mean something if the machine was otherwise idle: "
          "the two models run one after the other. The final loss sums the scales' losses.)")
    print(f"total wall time {total:.0f}s; grids in {out}/quality_*.png")
    with open(out / "quality.json", "w") as f:
        json.dump({"args": vars(args), "rows": rows, "ratios": ratios, "wall_seconds": total,
                   "device": jax.devices()[0].device_kind}, f, indent=2)


if __name__ == "__main__":
    main()

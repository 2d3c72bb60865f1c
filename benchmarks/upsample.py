"""Super-resolution with a trained LapFlow (conditional.py) on Fashion-MNIST test images.

    nice -n 10 python benchmarks/upsample.py --workdir=<a quality-study model dir> [--num_images 256]

The model is one trained by benchmarks/quality.py (class-conditional Fashion-MNIST, 28x28 padded
to 32x32; its workdir holds checkpoints/ and config.json). Test images are area-downsampled by
2^m (m = 1: 2x from 16x16 with the 2-scale model; m = 2: 4x from 8x8 with the 3-scale one) and
upsampled k times by every sampler (inversion / replacement, with and without the per-step
projection P), null class, no guidance, the model's Heun grid; against bicubic and bicubic
projected to exact consistency. Reports PSNR of the mean of k, single-sample PSNR, calibration
((MSE of the mean - var / k) / var: 1 when the spread of the samples matches their error),
per-pixel std across samples, max |Down(output) - input| and seconds per image. Writes
--out/upsample_<name>.json, a grid (rows: input, bicubic, then each sampler's first samples)
and the outputs as .npz. Not yet measured: FD on the study's judge.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from lapflow_jax import conditional, config as config_lib, generate, sample as sample_lib, upsample  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_images(n):
    with gzip.open(FASHION / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(FASHION / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n].astype(np.int32)
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None], labels


def load_config(workdir):
    config = config_lib.base_config()
    saved = json.loads((Path(workdir) / "config.json").read_text())
    for key, value in saved.items():
        if key in config and isinstance(value, dict):
            for sub, v in value.items():
                if sub in config[key]:
                    config[key][sub] = tuple(v) if isinstance(v, list) else v
        elif key in config:
            config[key] = tuple(value) if isinstance(value, list) else value
    config.sample.guidance_scale = 1.0
    config.mesh_shape = (1, 1)
    return config


def psnr(a, b):
    return float(10 * np.log10(4.0 / np.mean((np.asarray(a, np.float64) - b) ** 2)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--name", default="2x")
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    config = load_config(args.workdir)
    config.sample.steps = args.steps
    config.upsample.samples_per_image = args.k
    setup, step, params, sigmas = sample_lib.restore_for_sampling(config, args.workdir)
    images, labels = test_images(args.num_images)
    x = sample_lib.from_uint8(images)
    m = config.num_scales - 1 if args.name == "4x" else 1
    constraint = conditional.Constraint(config.num_scales, m, tuple(float(s) for s in sigmas), config.pyramid.down,
                                        config.pyramid.up)
    low = np.asarray(constraint.down_m(jnp.asarray(x)))
    factor = 2 ** m
    bic = conditional.bicubic(low, factor)
    bic_p = np.asarray(constraint.project(jnp.asarray(bic), jnp.asarray(low)))
    results = {"model": str(args.workdir), "step": step, "num_images": args.num_images, "k": args.k,
               "factor": factor, "steps": args.steps, "method": config.sample.method,
               "bicubic": {"psnr": psnr(bic, x)}, "bicubic_projected": {"psnr": psnr(bic_p, x),
               "consistency": conditional.consistency_error(bic_p, low, constraint)}}
    kept = {"inputs": sample_lib.to_uint8(low), "bicubic": sample_lib.to_uint8(bic)}
    null = np.full((args.batch,), setup.num_classes, np.int32)
    for sampler, proj in (("inversion", False), ("inversion", True), ("replacement", False), ("replacement", True)):
        config.upsample.sampler, config.upsample.project_steps = sampler, proj
        outs, times = [], []
        for i in range(0, args.num_images, args.batch):
            start = time.perf_counter()
            samples, _, res = upsample.upsample_batch(config, setup.graphdef, params, sigmas, low[i:i + args.batch],
                                                      num_classes=setup.num_classes, rng=jax.random.key(5),
                                                      first_index=i, m=m, labels=null[:len(low[i:i + args.batch])])
            times.append(time.perf_counter() - start)
            outs.append(samples)
        s = np.concatenate(outs)  # [N, k, H, W, C]
        mean = s.mean(1)
        var = s.var(1, ddof=1).mean()
        mse_mean = np.mean((mean - x) ** 2)
        label = sampler + ("+P" if proj else "")
        results[label] = {
            "psnr_mean_of_k": psnr(mean, x),
            "psnr_single": float(np.mean([psnr(s[:, j], x) for j in range(args.k)])),
            "calibration": float((mse_mean - var / args.k) / var), "pixel_std": float(np.sqrt(var)),
            "consistency": conditional.consistency_error(s.reshape((-1,) + s.shape[2:]), np.repeat(low, args.k, 0),
                                                         constraint),
            "seconds_per_image": float(np.mean(times[1:] or times)) / args.batch,
            "nfe_inversion": list(res.nfe_inversion), "nfe_forward": list(res.nfe_forward)}
        kept[label] = sample_lib.to_uint8(s[:16])
        print(label, json.dumps(results[label]), flush=True)
    print("bicubic", results["bicubic"], "projected", results["bicubic_projected"], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"upsample_{args.name}.json").write_text(json.dumps(results, indent=2))
    np.savez_compressed(out / f"upsample_{args.name}.npz", **kept)
    rows = 8
    near = np.repeat(np.repeat(kept["inputs"][:rows], factor, 1), factor, 2)
    tiles = [near, kept["bicubic"][:rows]] + [kept[key][:rows, 0] for key in kept if key not in ("inputs", "bicubic")]
    grid = np.stack(tiles, 0).reshape((-1,) + near.shape[1:])  # one row per method
    generate.save_png(out / f"upsample_grid_{args.name}.png",
                      generate.image_grid(sample_lib.from_uint8(grid), columns=rows))


if __name__ == "__main__":
    main()

"""Super-resolution with a trained LapFlow (conditional.py) on Fashion-MNIST test images.

    nice -n 10 python benchmarks/upsample.py --workdir=<a quality-study model dir> [--num_images 256]

The model is one trained by benchmarks/quality.py (class-conditional Fashion-MNIST, 28x28 padded
to 32x32; its workdir holds checkpoints/ and config.json). Test images are area-downsampled by
2^m (m = 1: 2x from 16x16 with the 2-scale model; m = 2: 4x from 8x8 with the 3-scale one) and
upsampled k times by every sampler (inversion / replacement, with and without the per-step
projection P), null class, no guidance, the model's Heun grid; against bicubic and bicubic
projected to exact consistency. Reports PSNR of the mean of k, single-sample PSNR, calibration
((MSE of the mean - var / k) / var: 1 when the spread of the samples matches their error; also
before the projection into the pixel range, which narrows the samples more than it moves their mean),
per-pixel std across samples, max |Down(output) - input| (in float, and in uint8 levels of the
images the judges see) and seconds per image; and the Frechet
distance (FD) to the 10,000 test images with two judges: the quality study's own Fashion-MNIST CNN
(benchmarks/quality.py's Judge, retrained here the same way) and the eval mode's EfficientNet-Lite0
features (packaged ImageNet weights; --efficientnet_reference test images, the slow part on a
CPU). Every FD row scores one image per input (sample 0 of each sampler), so all rows have the
same N: the real originals (the floor at that N), bicubic, projected bicubic, each sampler, and
as many unconditional samples of the same model (null class, no guidance, the same Heun grid).
Writes --out/upsample_<name>.json, a grid (rows: input, bicubic, then each sampler's first
samples) and the outputs as .npz (the first 16 inputs of each method, and 16 unconditional
samples). Each sampler's outputs are kept in --cache, so a killed run resumes at the first
sampler not done.
"""

from __future__ import annotations

import argparse
import hashlib
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
from lapflow_jax.data import sources  # noqa: E402
from lapflow_jax.evaluation import efficientnet, frechet  # noqa: E402


def test_images(n, data_dir=""):
    """The first n Fashion-MNIST test images, padded to 32x32 as the study trains: (uint8 [n, 32, 32, 1],
    int32 labels [n])."""
    source = sources.FashionMnistSource("test", data_dir=data_dir, pad_to=32)
    records = [source[i] for i in range(min(n, len(source)))]
    return np.stack([r["image"] for r in records]), np.array([r["label"] for r in records], np.int32)


def data_key(data_dir: str) -> str:
    """A suffix for cache names that tells data folders apart ("" for the default one), so a cache
    shared between datasets never mixes their images or references."""
    return f"_{hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:10]}" if data_dir else ""


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


class Judges:
    """The FD judges, each against Fashion-MNIST's test images: the quality study's CNN
    (quality.Judge: the same classifier recipe, floor and test statistics) and EfficientNet-Lite0
    features (the eval mode's fd_efficientnet network) on the first `efficientnet_reference` test
    images, whose statistics are cached in `cache`."""

    def __init__(self, classifier_steps: int, efficientnet_reference: int, cache: Path, data_dir: str = ""):
        from benchmarks import quality

        qargs = quality.parse_args([f"--classifier_steps={classifier_steps}", f"--data_dir={data_dir}"])
        self.study = quality.Judge(qargs, quality.make_config(qargs, 1, 0, qargs.steps).data)
        self.network = efficientnet.load_efficientnet_lite0()
        stats = cache / f"efficientnet_test_stats_{efficientnet_reference}{data_key(data_dir)}.npz"
        if not stats.exists():
            reference = sample_lib.from_uint8(self.study.test_x[:efficientnet_reference])
            mu, sigma = frechet.feature_stats(efficientnet.features(self.network, reference))
            np.savez(stats, mu=mu, sigma=sigma)
        with np.load(stats) as f:
            self.reference = f["mu"], f["sigma"]

    def fd(self, images: np.ndarray) -> dict:
        """uint8 [N, H, W, 1] -> {"fd_classifier", "fd_efficientnet"}."""
        mu, sigma = frechet.feature_stats(efficientnet.features(self.network, sample_lib.from_uint8(images)))
        return {"fd_classifier": self.study.fd(images),
                "fd_efficientnet": float(frechet.frechet_distance(mu, sigma, *self.reference))}


def unconditional(config, setup, params, sigmas, num: int, batch: int) -> np.ndarray:
    """num samples of the model with the upsamplers' settings (null class, no guidance): uint8."""
    out = []
    for first in range(0, num, batch):
        n = min(batch, num - first)
        labels = np.full((batch,), setup.num_classes, np.int32) if setup.num_classes else None
        images = generate.generate(config, setup.graphdef, params, sigmas, image_shape=setup.image_shape,
                                   num_classes=setup.num_classes, rng=jax.random.key(11), labels=labels,
                                   batch=batch, first_index=first).images
        out.append(sample_lib.to_uint8(images[:n]))
    return np.concatenate(out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--name", default="2x")
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--method", default="heun", help="the solver (config.sample.method): euler, heun, dopri5")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--cache", default="/tmp/lapflow_upsample_cache",
                        help="each sampler's outputs and the judges' reference statistics (a rerun resumes)")
    parser.add_argument("--classifier_steps", type=int, default=1500, help="the study judge's training steps")
    parser.add_argument("--efficientnet_reference", type=int, default=2000,
                        help="test images behind EfficientNet-Lite0's reference statistics (10,000: all)")
    parser.add_argument("--data_dir", default="", help="folder of the Fashion-MNIST idx files (default: quality.py's)")
    parser.add_argument("--no_fd", action="store_true", help="skip the judges (PSNR and friends only)")
    parser.add_argument("--samplers", default="inversion,inversion+P,replacement,replacement+P",
                        help="comma-separated subset of the four samplers to run")
    args = parser.parse_args()
    config = load_config(args.workdir)
    config.sample.steps, config.sample.method = args.steps, args.method
    config.upsample.samples_per_image = args.k
    setup, step, params, sigmas = sample_lib.restore_for_sampling(config, args.workdir)
    images, labels = test_images(args.num_images, args.data_dir)
    x = sample_lib.from_uint8(images)
    m = config.num_scales - 1 if args.name.startswith("4x") else 1  # --name 4x...: from the coarsest scale
    constraint = conditional.Constraint(config.num_scales, m, tuple(float(s) for s in sigmas), config.pyramid.down,
                                        config.pyramid.up)
    low = np.asarray(constraint.down_m(jnp.asarray(x)))
    factor = 2 ** m
    bic = conditional.bicubic(low, factor)
    # Projected like the samples: the nearest consistent image within the pixel range, rounded to
    # uint8 block by block (conditional.project_box, to_uint8_consistent).
    bic_p = np.asarray(conditional.project_box(constraint.project(jnp.asarray(bic), jnp.asarray(low)), low, constraint))
    to_u8 = lambda images: conditional.to_uint8_consistent(images, low[:len(images)], constraint)
    results = {"model": str(args.workdir), "step": step, "num_images": args.num_images, "k": args.k,
               "factor": factor, "steps": args.steps, "method": config.sample.method,
               "bicubic": {"psnr": psnr(bic, x)}, "bicubic_projected": {"psnr": psnr(bic_p, x),
               "consistency": conditional.consistency_error(bic_p, low, constraint),
               "consistency_uint8_levels": conditional.uint8_consistency_levels(to_u8(bic_p), low, constraint)}}
    kept = {"inputs": sample_lib.to_uint8(low), "bicubic": sample_lib.to_uint8(bic)}
    null = np.full((args.batch,), setup.num_classes, np.int32)
    solver = "" if args.method == "heun" else f"_{args.method}"
    cache = Path(args.cache) / f"{args.name}_{Path(args.workdir).name}_step{step}_n{args.num_images}_k{args.k}_s{args.steps}{solver}_box{data_key(args.data_dir)}"
    cache.mkdir(parents=True, exist_ok=True)
    first_samples = {}  # label -> uint8 [N, H, W, C], one output per input (for FD)
    for sampler, proj in (("inversion", False), ("inversion", True), ("replacement", False), ("replacement", True)):
        config.upsample.sampler, config.upsample.project_steps = sampler, proj
        label = sampler + ("+P" if proj else "")
        if label not in args.samplers.split(","):
            continue
        done = cache / f"{label}.npz"
        if done.exists():  # an earlier run of the same settings made these
            with np.load(done) as f:
                kept[label], first_samples[label] = f["kept"], f["first"]
            results[label] = json.loads((cache / f"{label}.json").read_text())
            print(label, "(cached)", json.dumps(results[label]), flush=True)
            continue
        outs, plain, times = [], [], []
        for i in range(0, args.num_images, args.batch):
            start = time.perf_counter()
            samples, _, res = upsample.upsample_batch(config, setup.graphdef, params, sigmas, low[i:i + args.batch],
                                                      num_classes=setup.num_classes, rng=jax.random.key(5),
                                                      first_index=i, m=m, labels=null[:len(low[i:i + args.batch])])
            times.append(time.perf_counter() - start)
            outs.append(samples)
            plain.append(np.asarray(res.images).reshape(samples.shape))
        s = np.concatenate(outs)  # [N, k, H, W, C], projected within the pixel range (what is written)

        def calibration(samples):
            var = samples.var(1, ddof=1).mean()
            return float((np.mean((samples.mean(1) - x) ** 2) - var / args.k) / var), float(np.sqrt(var))

        mean = s.mean(1)
        cal, std = calibration(s)
        # The sampler's own spread, before the pixel-range projection (a contraction onto the feasible
        # set, which narrows the samples more than it moves their mean).
        cal_plain, std_plain = calibration(np.concatenate(plain))
        results[label] = {
            "psnr_mean_of_k": psnr(mean, x),
            "psnr_single": float(np.mean([psnr(s[:, j], x) for j in range(args.k)])),
            "calibration": cal, "pixel_std": std,
            "calibration_before_box": cal_plain, "pixel_std_before_box": std_plain,
            "consistency": conditional.consistency_error(s.reshape((-1,) + s.shape[2:]), np.repeat(low, args.k, 0),
                                                         constraint),
            "seconds_per_image": float(np.mean(times[1:] or times)) / args.batch,
            "nfe_inversion": list(res.nfe_inversion), "nfe_forward": list(res.nfe_forward)}
        kept[label] = np.stack([to_u8(s[:16, j]) for j in range(args.k)], 1)
        first_samples[label] = to_u8(s[:, 0])
        results[label]["consistency_uint8_levels"] = conditional.uint8_consistency_levels(
            np.concatenate([to_u8(s[:, j]) for j in range(args.k)]), np.tile(low, (args.k, 1, 1, 1)), constraint)
        np.savez(cache / f"{label}.npz", kept=kept[label], first=first_samples[label])
        (cache / f"{label}.json").write_text(json.dumps(results[label]))
        print(label, json.dumps(results[label]), flush=True)
    print("bicubic", results["bicubic"], "projected", results["bicubic_projected"], flush=True)
    if not args.no_fd:
        start = time.perf_counter()
        uncond_file = cache / "unconditional.npz"
        if not uncond_file.exists():
            np.savez(uncond_file, images=unconditional(config, setup, params, sigmas, args.num_images, args.batch))
        with np.load(uncond_file) as f:
            uncond = f["images"]
        kept["unconditional"] = uncond[:16]
        results["unconditional"] = {"seconds": time.perf_counter() - start}
        judges = Judges(args.classifier_steps, args.efficientnet_reference, Path(args.cache), args.data_dir)
        results["judges"] = {"classifier_test_accuracy": judges.study.floor["accuracy"],
                             "classifier_real_floor_fd": judges.study.floor["fd"],
                             "classifier_floor_num_real": judges.study.floor["num_real"],
                             "efficientnet_reference": args.efficientnet_reference}
        rows = {"real": sample_lib.to_uint8(x), "bicubic": sample_lib.to_uint8(bic),
                "bicubic_projected": to_u8(bic_p), **first_samples, "unconditional": uncond}
        for label, images in rows.items():
            results.setdefault(label, {}).update(judges.fd(images))
            print(label, "FD", {k: round(v, 3) for k, v in results[label].items() if k.startswith("fd")}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"upsample_{args.name}.json").write_text(json.dumps(results, indent=2))
    np.savez_compressed(out / f"upsample_{args.name}.npz", **kept)
    rows = 8
    near = np.repeat(np.repeat(kept["inputs"][:rows], factor, 1), factor, 2)
    tiles = [near, kept["bicubic"][:rows]] + [kept[key][:rows, 0] for key in kept
                                                  if key not in ("inputs", "bicubic", "unconditional")]
    grid = np.stack(tiles, 0).reshape((-1,) + near.shape[1:])  # one row per method
    generate.save_png(out / f"upsample_grid_{args.name}.png",
                      generate.image_grid(sample_lib.from_uint8(grid), columns=rows))


if __name__ == "__main__":
    main()

"""Sample quality at CPU scale: LapFlow (2 and 3 scales) vs the single-scale baseline on Fashion-MNIST.

    apt-get install -y dataset-fashion-mnist      # once: the data (Debian package, 30 MB, MIT)
    nice -n 10 python benchmarks/quality.py       # the full study, about 1 h 10 min on 2 idle cores

Class-conditional Fashion-MNIST, 28x28 zero-padded to 32x32x1. Every model has the same width,
depth, heads, finest patch size, batch, learning rate, EMA, sampler and guidance; only the
number of scales differs. Each trains through the project's own loop (train.train) with a
constant learning rate after warmup (so a checkpoint along the way is a fair snapshot, not a
point in the middle of a decay), saving every --eval_every steps.

Compute: the baseline trains --steps steps. A LapFlow step is cheaper (its coarse-only training
stages skip the fine tokens), so LapFlow trains as many steps as the baseline's compute buys
it: --steps x (baseline tokens / LapFlow tokens per training image), 1.33x for 2 scales and
1.78x for 3 at patch 8. The x-axis of every plot is the XLA-counted training TFLOPs
(metrics.jsonl), so "equal steps" and "equal compute" are both read off the same runs.

Metrics (all against Fashion-MNIST's 10,000 test images), with a judge trained here:
  - accuracy: a small CNN trained on the 60,000 training images (its test accuracy is the
    ceiling) labels class-conditional samples; the fraction labelled as the class asked for;
  - fd: Frechet distance of that CNN's penultimate features (the domain's FID), with the
    distance of 5,000 real training images to the test set as the floor;
  - swd: ProGAN's sliced Wasserstein distance (x1e3, average over the 32 and 16 px levels);
  - NFE: how many model calls adaptive dopri5 needs at --dopri_tol, and quality at fixed
    Euler/Heun NFE (--nfe_sweep), for each model's first seed.
Along training each checkpoint is scored on --eval_samples samples; the final checkpoints (and
LapFlow's checkpoint at the baseline's step count, the equal-steps point) on --final_samples.

Writes into --out: quality.json (every number), quality_curves.png (each metric against training
TFLOPs, one line per seed), quality_grid_<model>.png (rows = classes), quality_samples_<model>.npz
(--keep_samples final samples, uint8, with labels) and prints the tables and the wall time.

What it can show: whether, at a tiny scale and equal compute, the multi-scale model makes samples
at least as recognisable and as well distributed as the baseline. What it cannot: the paper's
FID gap at 256 px in latent space (the models, data and budgets are ~1000x smaller), and with two
seeds a difference smaller than the spread between seeds means nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
MODELS = {"baseline": 1, "lapflow2": 2, "lapflow3": 3}
LABELS = {"baseline": "1-scale baseline", "lapflow2": "LapFlow 2-scale (T=0.5)",
          "lapflow3": "LapFlow 3-scale (T=1/3, 2/3)"}
WINDOWS = {1: (0.0,), 2: (0.5, 0.0), 3: (2 / 3, 1 / 3, 0.0), 4: (0.75, 0.5, 0.25, 0.0)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3000, help="baseline training steps")
    p.add_argument("--eval_every", type=int, default=750, help="checkpoint and score every this many steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=8, help="finest patch size, the same for every model")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--seeds", default="0,1", help="seeds of the baseline and LapFlow 2-scale")
    p.add_argument("--lapflow3_seeds", default="0", help="seeds of LapFlow 3-scale ('' to skip it)")
    p.add_argument("--method", default="heun", help="sampler along training and for the final scores")
    p.add_argument("--nfe", type=int, default=20, help="sampler steps (config sample.steps) for the scores")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (same for all)")
    p.add_argument("--eval_samples", type=int, default=1000)
    p.add_argument("--final_samples", type=int, default=5000)
    p.add_argument("--keep_samples", type=int, default=1000, help="final samples saved per model (.npz)")
    p.add_argument("--sample_batch", type=int, default=500)
    p.add_argument("--nfe_sweep", default="euler:8,euler:16,heun:8,heun:16,heun:32",
                   help="method:steps pairs scored on --sweep_samples at the end (first seed)")
    p.add_argument("--sweep_samples", type=int, default=1000)
    p.add_argument("--dopri_tol", type=float, default=1e-5, help="dopri5 rtol = atol (LFM's setting)")
    p.add_argument("--dopri_samples", type=int, default=200)
    p.add_argument("--classifier_steps", type=int, default=1500)
    p.add_argument("--data_dir", default="", help=f"folder of the Fashion-MNIST idx files (default {FASHION_MNIST_DIR})")
    p.add_argument("--workdir", default="/tmp/lapflow_quality")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.steps % args.eval_every:
        p.error(f"--steps={args.steps} must be a multiple of --eval_every={args.eval_every}: the baseline's "
                "last step is LapFlow's equal-steps checkpoint")
    return args


def check_data(data_dir: str) -> None:
    """Stops with the command that installs the data, before anything is trained."""
    folder = Path(data_dir or FASHION_MNIST_DIR)
    if not (folder / "t10k-labels-idx1-ubyte.gz").exists() and not (folder / "t10k-labels-idx1-ubyte").exists():
        sys.exit(f"Fashion-MNIST is not in {folder}. Install it once with\n"
                 f"    sudo apt-get install -y dataset-fashion-mnist\n"
                 f"(Debian/Ubuntu; 30 MB, MIT), or pass --data_dir=FOLDER holding the four idx files.")


def start_run(data_dir: str) -> None:
    """What every Fashion-MNIST study script does before JAX starts: the data is there, the CPU
    unless JAX_PLATFORMS says otherwise, absl flags parsed (the training loop logs through absl)."""
    check_data(data_dir)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from absl import flags

    flags.FLAGS.mark_as_parsed()


def training_tokens(num_scales: int, patch, image_size: int) -> float:
    """Tokens the model sees per training image, averaged over the equal-size training stages
    (stage f feeds scales f..L-1, i.e. scale f and everything coarser). patch: one size for
    every scale, or one per scale (finest first)."""
    patches = (patch,) * num_scales if isinstance(patch, int) else tuple(patch)
    tokens = [(image_size // 2 ** k // patches[k]) ** 2 for k in range(num_scales)]
    return sum(sum(tokens[f:]) for f in range(num_scales)) / num_scales


def patch_sizes(patch: int, num_scales: int, image_size: int = 32) -> tuple[int, ...]:
    """`patch` at every scale, except where a coarse scale is smaller than it (4 scales of 32 px:
    the 4 px scale takes patch 4)."""
    return tuple(min(patch, image_size >> k) for k in range(num_scales))


def make_config(args, num_scales: int, seed: int, steps: int):
    from lapflow_jax.config import base_config

    c = base_config()
    c.seed = seed
    c.num_scales = num_scales
    c.window_starts = WINDOWS[num_scales]
    c.model.preset = "tiny"
    c.model.hidden_size = args.width
    c.model.depth = args.depth
    c.model.num_heads = args.heads
    c.model.patch_sizes = patch_sizes(args.patch, num_scales)
    c.model.conditional = True
    c.model.class_dropout = 0.1
    c.data.name = "fashion_mnist"
    c.data.data_dir = args.data_dir
    c.data.image_size = 32
    c.data.channels = 1
    c.data.fashion_mnist_pad_to = 32
    c.data.random_flip = True  # garments are left-right symmetric classes
    c.train.global_batch_size = args.batch
    c.train.num_steps = steps
    c.train.learning_rate = args.lr
    c.train.warmup_steps = min(args.warmup, steps // 2)
    c.train.schedule = "constant"
    c.train.ema_decay = args.ema
    c.checkpoint.every_steps = args.eval_every
    c.checkpoint.keep = 1000
    c.checkpoint.async_save = False
    c.log.every_steps = max(1, min(args.eval_every, steps) // 5)
    c.sample.num_images = 20
    c.sample.batch_size = args.sample_batch
    c.sample.method = args.method
    c.sample.steps = args.nfe
    c.sample.guidance_scale = args.guidance
    c.mesh_shape = (1, 1)
    return c


def gflops_per_step(workdir: Path) -> float:
    """XLA-counted GFLOPs of one train step, from the run's metrics.jsonl."""
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("tflops_per_s_per_device") and r.get("steps_per_s"):
            return r["tflops_per_s_per_device"] * 1e3 / r["steps_per_s"]
    raise RuntimeError(f"{workdir / 'metrics.jsonl'} has no throughput record to read FLOPs from")


def checkpoint_steps(workdir: Path, every: int, last: int) -> list[int]:
    """The checkpoints at multiples of `every` and the last one (the loop may save others too)."""
    steps = (int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    return sorted(s for s in steps if s % every == 0 or s == last)


def cached_classifier(cache, train_x, train_y, test_x, test_y, steps: int):
    """The study's CNN (classifier.train_classifier, seed 0): trained, or read back from `cache`.

    Training is deterministic on one CPU, so a kept copy is the same judge without its minutes of
    training; the file is keyed by the steps and a digest of the data, so another data set (a
    test's made-up one) never reads it. cache None: always train."""
    import hashlib

    import jax
    import numpy as np
    from flax import nnx
    from lapflow_jax.evaluation import classifier

    digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes()
                                     for a in (train_x, train_y, test_x, test_y))).hexdigest()[:16]
    path = Path(cache) / f"classifier_steps{steps}_{digest}.npz" if cache else None
    if path is not None and path.exists():
        graphdef, params = nnx.split(classifier.SmallCNN(train_x.shape[-1], 10, rngs=nnx.Rngs(0)), nnx.Param)
        leaves, treedef = jax.tree.flatten(params)
        with np.load(path) as f:
            loaded = [f[f"leaf{i}"] for i in range(len(leaves))]
            clf = classifier.Classifier(graphdef, jax.tree.unflatten(treedef, loaded), 10,
                                        test_accuracy=float(f["test_accuracy"]))
        return clf
    clf = classifier.train_classifier(train_x, train_y, num_classes=10, steps=steps,
                                      test_images=test_x, test_labels=test_y)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        leaves = jax.tree.leaves(clf.params)
        np.savez(path, test_accuracy=clf.test_accuracy, **{f"leaf{i}": np.asarray(x) for i, x in enumerate(leaves)})
    return clf


class Judge:
    """The classifier and the real-image statistics every sample set is compared with.

    cache: a folder that keeps the trained classifier (`cached_classifier`); None retrains it."""

    def __init__(self, args, data_config, cache=None):
        import numpy as np
        from lapflow_jax.evaluation import classifier, frechet, swd

        self.np, self.frechet, self.swd_lib = np, frechet, swd
        t0 = time.perf_counter()
        train_x, train_y = classifier.labelled_split(data_config, "train")
        self.test_x, self.test_y = classifier.labelled_split(data_config, "test")
        self.clf = cached_classifier(cache, train_x, train_y, self.test_x, self.test_y, args.classifier_steps)
        self.test_mu, self.test_sigma = frechet.feature_stats(self.clf.features(self.test_x))
        n_real = min(5000, len(train_x), len(self.test_x))
        real = train_x[np.random.default_rng(0).permutation(len(train_x))[:n_real]]
        self.real = real  # the floor's real images (training images the CNN has seen), for other judges
        self.floor = {"accuracy": self.clf.test_accuracy, "fd": self.fd(real),
                      "swd": self.swd(real), "num_real": n_real}
        self.seconds = time.perf_counter() - t0

    def fd(self, images) -> float:
        mu, sigma = self.frechet.feature_stats(self.clf.features(images))
        return float(self.frechet.frechet_distance(mu, sigma, self.test_mu, self.test_sigma))

    def swd(self, images) -> float:
        n = min(len(images), len(self.test_x))
        return float(self.swd_lib.swd(images[:n], self.test_x[:n])["swd_avg"])

    def score(self, images, labels) -> dict:
        return {"accuracy": self.clf.accuracy(images, labels), "fd": self.fd(images), "swd": self.swd(images),
                "num_samples": len(images)}


def sample(config, setup, params, sigmas, num: int, seed: int, *, method=None, steps=None, tol=None):
    """num class-balanced samples (image i has class i mod 10): (uint8 [num, H, W, C], labels, NFE/image)."""
    import jax
    import numpy as np
    from lapflow_jax import generate, sample as sample_lib

    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.sample.method = method or config.sample.method
        config.sample.steps = steps or config.sample.steps
        if tol is not None:
            config.sample.rtol = config.sample.atol = tol
    batch = min(int(config.sample.batch_size), num)
    images, nfe = [], []
    for first in range(0, num, batch):
        out = generate.generate(config, setup.graphdef, params, sigmas, image_shape=setup.image_shape,
                                num_classes=setup.num_classes, rng=jax.random.fold_in(jax.random.key(seed), first),
                                batch=batch, first_index=first)
        images.append(sample_lib.to_uint8(out.images))
        nfe.append(sum(out.nfe_per_segment))
    images = np.concatenate(images)[:num]
    return images, (np.arange(num) % setup.num_classes).astype(np.int32), float(np.mean(nfe))


def class_rows_grid(images, labels, per_class: int = 10):
    """Grid with one row per class, per_class samples each: uint8 [rows*H, cols*W, 3]."""
    import numpy as np
    from lapflow_jax import generate, sample as sample_lib

    rows = [images[labels == c][:per_class] for c in range(int(labels.max()) + 1)]
    return generate.image_grid(sample_lib.from_uint8(np.concatenate(rows)), columns=per_class)


def run_model(args, judge, name: str, seed: int, steps: int, root: Path, log) -> dict:
    """Trains one model, scores every checkpoint; returns its curve and final scores."""
    from lapflow_jax import sample as sample_lib
    from lapflow_jax import train

    scales = MODELS[name]
    config = make_config(args, scales, seed, steps)
    workdir = root / f"{name}_seed{seed}"
    t0 = time.perf_counter()
    train.train(config, str(workdir))
    train_seconds = time.perf_counter() - t0
    gflops = gflops_per_step(workdir)
    setup = train.make_setup(config)
    curve, finals = [], {}
    for step in checkpoint_steps(workdir, args.eval_every, steps):
        _, _, params, sigmas = sample_lib.restore_for_sampling(config, workdir, step=step, setup=setup)
        final = step == steps or step == args.steps
        num = args.final_samples if final else args.eval_samples
        images, labels, nfe = sample(config, setup, params, sigmas, num, seed=1000 + seed)
        point = {"step": step, "train_tflops": step * gflops / 1e3, "nfe": nfe,
                 **judge.score(images, labels)}
        curve.append(point)
        log(f"{name} seed {seed} step {step}: acc {point['accuracy']:.3f} fd {point['fd']:.2f} "
            f"swd {point['swd']:.1f} ({num} samples)")
        if final:
            finals["equal_flops" if step == steps else "equal_steps"] = point
            if step == steps:
                final_images, final_labels, final_params, final_sigmas = images, labels, params, sigmas
    finals.setdefault("equal_steps", finals["equal_flops"])
    out = {"model": name, "seed": seed, "num_scales": scales, "steps": steps, "gflops_per_step": gflops,
           "train_seconds": train_seconds, "curve": curve, **finals}
    out["_final"] = (config, setup, final_params, final_sigmas, final_images, final_labels)
    return out


def nfe_study(args, judge, config, setup, params, sigmas, seed: int) -> dict:
    """dopri5's NFE at the tolerance, and scores at fixed Euler/Heun step counts."""
    out = {}
    _, _, nfe = sample(config, setup, params, sigmas, args.dopri_samples, seed=2000 + seed, method="dopri5",
                       tol=args.dopri_tol)
    out["dopri5_nfe"] = nfe
    for item in filter(None, args.nfe_sweep.split(",")):
        method, steps = item.split(":")
        images, labels, nfe = sample(config, setup, params, sigmas, args.sweep_samples, seed=3000 + seed,
                                     method=method, steps=int(steps))
        out[f"{method}:{steps}"] = {"nfe": nfe, **judge.score(images, labels)}
    return out


def summarise(rows: list[dict], key: str, metric: str):
    import numpy as np

    vals = np.array([r[key][metric] for r in rows], np.float64)
    return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0


def plot_curves(results: dict, floor: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"baseline": "tab:gray", "lapflow2": "tab:blue", "lapflow3": "tab:orange"}
    metrics = (("accuracy", "classifier accuracy on samples (higher is better)"),
               ("fd", "Frechet distance, classifier features (lower is better)"),
               ("swd", "SWD x1e3 (lower is better)"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (metric, title) in zip(axes, metrics):
        for name, runs in results.items():
            for i, run in enumerate(runs):
                xs = [p["train_tflops"] for p in run["curve"]]
                ys = [p[metric] for p in run["curve"]]
                ax.plot(xs, ys, "o-", color=colours[name], alpha=0.9 - 0.3 * i, ms=3,
                        label=f"{LABELS[name]}" if i == 0 else None)
        ax.axhline(floor[metric], color="k", ls="--", lw=0.8,
                   label="real test accuracy (ceiling)" if metric == "accuracy" else "real vs real (floor)")
        ax.set_xlabel("training TFLOPs (XLA count)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    start_run(args.data_dir)
    import jax
    import numpy as np
    from lapflow_jax import cli, generate

    cli.setup_console(verbose=False)  # the training loops' progress lines, without other libraries' INFO

    wall = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - wall:6.0f}s] {msg}", flush=True)  # noqa: E731
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)

    judge = Judge(args, make_config(args, 1, 0, args.steps).data)
    log(f"classifier: test accuracy {judge.floor['accuracy']:.4f} ({judge.seconds:.0f}s); real-vs-real "
        f"fd {judge.floor['fd']:.2f}, swd {judge.floor['swd']:.1f}")

    seeds = {"baseline": args.seeds, "lapflow2": args.seeds, "lapflow3": args.lapflow3_seeds}
    base_tokens = training_tokens(1, args.patch, 32)
    results, nfe_results = {}, {}
    for name, scales in MODELS.items():
        seed_list = [int(s) for s in seeds[name].split(",") if s.strip()]
        if not seed_list:
            continue
        # Equal compute: the baseline's steps times its per-step cost over this model's.
        steps = int(math.ceil(args.steps * base_tokens / training_tokens(scales, args.patch, 32)))
        results[name] = []
        for seed in seed_list:
            run = run_model(args, judge, name, seed, steps, root, log)
            config, setup, params, sigmas, images, labels = run.pop("_final")
            if seed == seed_list[0]:
                keep = min(args.keep_samples, len(images))
                np.savez_compressed(out / f"quality_samples_{name}.npz", images=images[:keep],
                                    labels=labels[:keep])
                generate.save_png(out / f"quality_grid_{name}.png", class_rows_grid(images, labels))
                nfe_results[name] = nfe_study(args, judge, config, setup, params, sigmas, seed)
                log(f"{name}: NFE study {json.dumps(nfe_results[name])}")
            results[name].append(run)
            log(f"{name} seed {seed}: {steps} steps in {run['train_seconds']:.0f}s, "
                f"{run['gflops_per_step']:.2f} GFLOP/step")

    plot_curves(results, judge.floor, out / "quality_curves.png")
    total = time.perf_counter() - wall
    print(f"\nFashion-MNIST 32x32x1, class-conditional; width {args.width}, depth {args.depth}, patch {args.patch}, "
          f"batch {args.batch}, lr {args.lr} constant, EMA {args.ema}; {args.method} {args.nfe} steps, "
          f"CFG {args.guidance}; {args.final_samples} samples vs the 10,000 test images; "
          f"{jax.devices()[0].device_kind}")
    print(f"classifier test accuracy (ceiling) {judge.floor['accuracy']:.4f}; real-vs-real floor: "
          f"fd {judge.floor['fd']:.2f}, swd {judge.floor['swd']:.1f}")
    print("| model | seeds | steps | train TFLOPs | compare | accuracy | FD (classifier) | SWD |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        # The baseline's last checkpoint is both points; LapFlow's equal-steps point is its step --steps.
        for key in ("equal_flops",) if name == "baseline" else ("equal_steps", "equal_flops"):
            cells = [f"{m:.3f} ± {s:.3f}" if metric == "accuracy" else f"{m:.2f} ± {s:.2f}"
                     for metric in ("accuracy", "fd", "swd") for m, s in [summarise(runs, key, metric)]]
            point = runs[0][key]
            label = "equal steps and compute" if name == "baseline" else key.replace("_", " ").replace("flops", "compute")
            print(f"| {LABELS[name]} | {len(runs)} | {point['step']} | {point['train_tflops']:.3g} | {label} | "
                  + " | ".join(cells) + " |")
    print("(mean ± standard deviation over seeds; one seed gives ± 0)")
    print("\n| model | dopri5 NFE (tol %g) | " % args.dopri_tol
          + " | ".join(k for k in next(iter(nfe_results.values())) if k != "dopri5_nfe") + " |")
    print("|---|---|" + "---|" * (len(next(iter(nfe_results.values()))) - 1))
    for name, row in nfe_results.items():
        print(f"| {LABELS[name]} | {row['dopri5_nfe']:.0f} | "
              + " | ".join(f"acc {v['accuracy']:.3f}, FD {v['fd']:.2f}" for k, v in row.items() if k != "dopri5_nfe")
              + " |")
    print(f"\ntotal wall time {total:.0f}s ({total / 60:.1f} min); results in {out}")
    with open(out / "quality.json", "w") as f:
        json.dump({"args": vars(args), "floor": judge.floor, "classifier_seconds": judge.seconds,
                   "results": results, "nfe": nfe_results, "wall_seconds": total,
                   "device": jax.devices()[0].device_kind}, f, indent=2)
    return results


if __name__ == "__main__":
    main()

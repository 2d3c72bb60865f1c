"""Judges that cannot be tuned to: every study model scored by five measures, across guidance scales.

    # once per model workdir (quality.py's <name>_seed<k>, or any project workdir), appending cells:
    nice -n 15 python benchmarks/judges.py --models=<dir>/baseline_seed0,<dir>/lapflow2_seed0 \\
        --guidance=1,1.5,2,3 --samples=1000
    nice -n 15 python benchmarks/judges.py --models=<dir>/lapflow3_seed0 --guidance=3 --samples=1000
    python benchmarks/judges.py --table          # the table (stdout and judges.md) and the two plots

For each model workdir (its config.json and last checkpoint, read as benchmarks/upsample.py reads
them) and each guidance scale: --samples class-balanced samples (image i has class i mod 10) with
the study's sampler (quality.sample: Heun, 20 steps, sampling seed 1000 + the model's seed, so at
guidance 3 these are quality.py's final samples), scored against Fashion-MNIST's 10,000 test
images by
  - accuracy: the study's CNN (quality.Judge, kept trained in --cache) labels each sample as the
    class asked for;
  - fd_cnn: Frechet distance on that CNN's penultimate features (the study's FD);
  - fd_efficientnet: Frechet distance on EfficientNet-Lite0's 1280-d pooled features (packaged
    ImageNet weights, the eval mode's fd_efficientnet network; a judge nobody trained on this data),
    against the first --efficientnet_reference test images (statistics kept in --cache);
  - precision, recall: Kynkaenniemi et al.'s, k = 3, on the CNN features (evaluation/precision_recall):
    precision = samples inside the test images' manifold (fidelity), recall = test images inside the
    samples' manifold (coverage);
  - swd: ProGAN's sliced Wasserstein distance x1e3 on pixels (quality.Judge.swd).
The floor row ("real") scores --real random training images (quality.Judge's floor set) the same
way; its accuracy is the CNN's test accuracy. Frechet distances are biased upwards at small N:
compare rows of one N.

Each (model, seed, guidance, N) cell is one line appended to --out/judges.jsonl as soon as it is
scored, and skipped when already there: a killed run loses at most the cell in progress. The first
--keep samples of each cell are kept as --out/judges_samples_<model>_seed<k>_g<guidance>.npz
(`images` uint8 [n, 32, 32, 1], `labels`), for anyone's own judge.

--table: one row per (model, guidance, N), mean ± standard deviation over seeds (one seed: the
value), printed and written to judges.md; judges_fd_accuracy.png (each FD against accuracy) and
judges_precision_recall.png, one line per model through its guidance scales.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METRICS = ("accuracy", "fd_cnn", "fd_efficientnet", "precision", "recall", "swd")
HEADERS = {"accuracy": "accuracy (CNN) ↑", "fd_cnn": "FD, CNN ↓", "fd_efficientnet": "FD, EfficientNet-Lite0 ↓",
           "precision": "precision ↑", "recall": "recall ↑", "swd": "SWD x1e3 ↓"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="", help="comma-separated model workdirs (<name>_seed<k>)")
    p.add_argument("--guidance", default="1,1.5,2,3", help="comma-separated classifier-free guidance scales")
    p.add_argument("--samples", type=int, default=5000, help="samples per cell")
    p.add_argument("--real", type=int, default=5000, help="real training images of the floor row (0: no floor)")
    p.add_argument("--keep", type=int, default=1000, help="samples kept per cell as .npz (0: none)")
    p.add_argument("--method", default="heun", help="sampler (quality.py's)")
    p.add_argument("--nfe", type=int, default=20, help="sampler steps (quality.py's --nfe)")
    p.add_argument("--sample_batch", type=int, default=500)
    p.add_argument("--classifier_steps", type=int, default=1500, help="the study CNN's training steps (quality.py's)")
    p.add_argument("--efficientnet_reference", type=int, default=10000, help="test images behind its statistics")
    p.add_argument("--data_dir", default="", help="Fashion-MNIST idx files (default: quality.FASHION_MNIST_DIR)")
    p.add_argument("--cache", default="/tmp/lapflow_judges_cache", help="the trained CNN and reference statistics")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--table", action="store_true", help="print the table and write the plots, score nothing")
    args = p.parse_args(argv)
    if not args.table and not args.models:
        p.error("give --models (workdirs to score) or --table")
    return args


def model_name(workdir) -> tuple[str, int]:
    """'<dir>/lapflow2_seed1' -> ('lapflow2', 1); the seed is the one in its config.json."""
    config = json.loads((Path(workdir) / "config.json").read_text())
    return re.sub(r"_seed\d+$", "", Path(workdir).name), int(config["seed"])


def cell_key(row: dict) -> tuple:
    return row["model"], row["seed"], row["guidance"], row["num_samples"], row["method"], row["nfe_steps"]


def read_cells(path: Path) -> list[dict]:
    """The scored cells; a line cut short by a kill is dropped (that cell is scored again)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_cell(path: Path, row: dict) -> None:
    # A kill mid-write leaves a line without its newline: start a fresh line after it.
    cut = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if cut else "") + json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


class Judges:
    """Every judge against the test images: quality.Judge (CNN accuracy, its FD, SWD, the floor's
    real images), precision/recall on its features, and EfficientNet-Lite0's FD."""

    def __init__(self, args):
        import hashlib

        import numpy as np
        from benchmarks import quality
        from lapflow_jax import sample as sample_lib
        from lapflow_jax.evaluation import efficientnet, frechet

        t0 = time.perf_counter()
        qargs = quality.parse_args([f"--classifier_steps={args.classifier_steps}", f"--data_dir={args.data_dir}"])
        self.study = quality.Judge(qargs, quality.make_config(qargs, 1, 0, qargs.steps).data, cache=args.cache)
        self.test_features = self.study.clf.features(self.study.test_x)
        self.network = efficientnet.load_efficientnet_lite0()
        n_ref = min(args.efficientnet_reference, len(self.study.test_x))
        # mu, sigma of the first n_ref test images, keyed by a digest of them (a test's made-up data
        # never reads the real statistics).
        digest = hashlib.sha256(np.ascontiguousarray(self.study.test_x[:n_ref]).tobytes()).hexdigest()[:16]
        stats = Path(args.cache) / f"efficientnet_test_stats_{n_ref}_{digest}.npz"
        if not stats.exists():
            stats.parent.mkdir(parents=True, exist_ok=True)
            reference = sample_lib.from_uint8(self.study.test_x[:n_ref])
            mu, sigma = frechet.feature_stats(efficientnet.features(self.network, reference))
            np.savez(stats, mu=mu, sigma=sigma)
        with np.load(stats) as f:
            self.reference = f["mu"], f["sigma"]
        self.n_ref = n_ref
        self.seconds = time.perf_counter() - t0

    def precision_recall(self, features) -> tuple[float, float]:
        """Sample CNN features [N, D] -> (precision: samples inside the test images' manifold,
        recall: test images inside the samples'), k = 3."""
        from lapflow_jax.evaluation import precision_recall

        return precision_recall.precision_recall(self.test_features, features, k=3)

    def score(self, images, labels=None) -> dict:
        """uint8 [N, H, W, 1] (and their asked-for classes) -> every judge's number."""
        from lapflow_jax import sample as sample_lib
        from lapflow_jax.evaluation import efficientnet, frechet

        precision, recall = self.precision_recall(self.study.clf.features(images))
        mu, sigma = frechet.feature_stats(efficientnet.features(self.network, sample_lib.from_uint8(images)))
        return {"accuracy": self.study.clf.accuracy(images, labels) if labels is not None else
                self.study.clf.test_accuracy,
                "fd_cnn": self.study.fd(images),
                "fd_efficientnet": float(frechet.frechet_distance(mu, sigma, *self.reference)),
                "precision": precision, "recall": recall, "swd": self.study.swd(images)}


def sample_cell(args, workdir: Path, guidance: float):
    """The model's samples at one guidance scale: (uint8 images, labels, train step)."""
    from benchmarks import quality, upsample
    from lapflow_jax import sample as sample_lib

    config = upsample.load_config(workdir)  # the workdir's config.json (it sets guidance 1: set below)
    config.sample.guidance_scale = guidance
    config.sample.batch_size = args.sample_batch
    setup, step, params, sigmas = sample_lib.restore_for_sampling(config, workdir)
    images, labels, _ = quality.sample(config, setup, params, sigmas, args.samples, seed=1000 + int(config.seed),
                                       method=args.method, steps=args.nfe)
    return images, labels, step


def score(args) -> None:
    import numpy as np

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "judges.jsonl"
    done = {cell_key(r) for r in read_cells(path)}
    judges = None
    wall = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - wall:6.0f}s] {msg}", flush=True)  # noqa: E731

    def get_judges():
        nonlocal judges
        if judges is None:
            judges = Judges(args)
            log(f"judges ready in {judges.seconds:.0f}s: CNN test accuracy {judges.study.clf.test_accuracy:.4f}, "
                f"EfficientNet reference {judges.n_ref} test images")
        return judges

    base = {"method": args.method, "nfe_steps": args.nfe}
    if args.real:
        floor = {"model": "real", "seed": 0, "guidance": None, "num_samples": args.real, **base}
        if cell_key(floor) not in done:
            t0 = time.perf_counter()
            j = get_judges()
            real = j.study.real[:args.real]
            floor.update(num_samples=len(real), **j.score(real), seconds_judge=time.perf_counter() - t0)
            append_cell(path, floor)
            done.add(cell_key(floor))
            log(f"real floor: {json.dumps({k: floor[k] for k in METRICS})}")
    for workdir in filter(None, args.models.split(",")):
        workdir = Path(workdir)
        name, seed = model_name(workdir)
        for guidance in (float(g) for g in args.guidance.split(",")):
            row = {"model": name, "seed": seed, "guidance": guidance, "num_samples": args.samples, **base}
            if cell_key(row) in done:
                log(f"{name} seed {seed} guidance {guidance:g}: already scored")
                continue
            t0 = time.perf_counter()
            images, labels, step = sample_cell(args, workdir, guidance)
            t1 = time.perf_counter()
            scores = get_judges().score(images, labels)
            kept = out / f"judges_samples_{name}_seed{seed}_g{guidance:g}.npz" if args.keep else None
            if kept is not None:
                np.savez_compressed(kept, images=images[:args.keep], labels=labels[:args.keep])
            row.update(workdir=str(workdir), train_step=step, **scores, samples_file=kept and kept.name,
                       seconds_sample=t1 - t0, seconds_judge=time.perf_counter() - t1)
            append_cell(path, row)
            done.add(cell_key(row))
            log(f"{name} seed {seed} guidance {guidance:g} (step {step}, N {args.samples}): "
                + ", ".join(f"{k} {row[k]:.4g}" for k in METRICS)
                + f"; sampled in {row['seconds_sample']:.0f}s, judged in {row['seconds_judge']:.0f}s")


def summarise(rows: list[dict]) -> list[dict]:
    """Cells grouped by (model, guidance, N, sampler): each metric's mean and spread over seeds."""
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["guidance"], r["num_samples"], r["method"], r["nfe_steps"]), []).append(r)
    out = []
    for (model, guidance, n, method, steps), cells in groups.items():
        entry = {"model": model, "guidance": guidance, "num_samples": n, "method": method, "nfe_steps": steps,
                 "seeds": sorted(c["seed"] for c in cells)}
        for m in METRICS:
            vals = np.array([c[m] for c in cells], np.float64)
            entry[m] = (float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else None)
        out.append(entry)
    order = {"real": 0, "baseline": 1, "lapflow2": 2, "lapflow3": 3}
    return sorted(out, key=lambda e: (order.get(e["model"], 9), e["model"], e["guidance"] or 0, e["num_samples"]))


def table(rows: list[dict]) -> str:
    fmt = {"accuracy": "{:.3f}", "fd_cnn": "{:.2f}", "fd_efficientnet": "{:.1f}", "precision": "{:.3f}",
           "recall": "{:.3f}", "swd": "{:.1f}"}
    lines = ["| model | guidance | seeds | N | " + " | ".join(HEADERS[m] for m in METRICS) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    for e in summarise(rows):
        cells = []
        for m in METRICS:
            mean, spread = e[m]
            cells.append(fmt[m].format(mean) + ("" if spread is None else " ± " + fmt[m].format(spread)))
        label = "real (training images)" if e["model"] == "real" else e["model"]
        guidance = "" if e["guidance"] is None else f"{e['guidance']:g}"
        lines.append(f"| {label} | {guidance} | {','.join(map(str, e['seeds']))} | {e['num_samples']} | "
                     + " | ".join(cells) + " |")
    lines.append("(mean ± standard deviation over seeds where there are several; real: the CNN's test accuracy, "
                 "the training images it was trained on for the rest)")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> list[Path]:
    """FD (both feature sets) against accuracy, and precision against recall: one line per model and N
    through its guidance scales (labelled), each point the mean over seeds with a standard deviation bar
    on both axes, one marker per N (hollow for the larger N), the real floor in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = summarise(rows)
    colours = {"baseline": "tab:gray", "lapflow2": "tab:blue", "lapflow3": "tab:orange"}
    lines: dict[tuple, list[dict]] = {}
    for e in entries:
        if e["model"] != "real":
            lines.setdefault((e["model"], e["num_samples"]), []).append(e)
    floors = [e for e in entries if e["model"] == "real"]
    # One marker per N (FDs of different N are not comparable): filled circles for the smallest.
    markers = {n: m for n, m in zip(sorted({e["num_samples"] for e in entries}), "osD^v")}

    def draw(ax, x_metric, y_metric):
        for (model, n), pts in lines.items():
            pts = sorted(pts, key=lambda e: e["guidance"])
            xs, ys = [p[x_metric][0] for p in pts], [p[y_metric][0] for p in pts]
            # Bars: one standard deviation over seeds, on both axes (none where a point has one seed).
            xerr, yerr = ([p[m][1] or 0.0 for p in pts] for m in (x_metric, y_metric))
            seeds = len(set.intersection(*(set(p["seeds"]) for p in pts)))
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="-", marker=markers[n], color=colours.get(model),
                        label=f"{model} (N={n}, {seeds} seed{'s' * (seeds > 1)})", elinewidth=0.8, capsize=2,
                        ms=4 + 2 * (n != min(markers)), fillstyle="full" if n == min(markers) else "none")
            for p, x, y in zip(pts, xs, ys):
                ax.annotate(f"w={p['guidance']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for f in floors:
            ax.plot([f[x_metric][0]], [f[y_metric][0]], "k" + markers[f["num_samples"]], ms=7,
                    fillstyle="none" if f["num_samples"] != min(markers) else "full",
                    label=f"real (N={f['num_samples']})")
        ax.set_xlabel(HEADERS[x_metric])
        ax.set_ylabel(HEADERS[y_metric])
        ax.grid(alpha=0.3)

    paths = [out / "judges_fd_accuracy.png", out / "judges_precision_recall.png"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    draw(axes[0], "accuracy", "fd_cnn")
    draw(axes[1], "accuracy", "fd_efficientnet")
    axes[0].set_title("study CNN's FD against its accuracy", fontsize=10)
    axes[1].set_title("EfficientNet-Lite0 FD against the CNN's accuracy", fontsize=10)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=80)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    draw(ax, "recall", "precision")
    ax.set_title("precision against recall (k = 3, CNN features)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=80)
    plt.close(fig)
    return paths


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if args.table:
        from benchmarks import quality

        # The study's models and the floor; benchmarks/ablations.py tables the other cells of the file.
        rows = [r for r in read_cells(out / "judges.jsonl") if r["model"] in ("real", *quality.MODELS)]
        if not rows:
            sys.exit(f"no cells in {out / 'judges.jsonl'}: score some first")
        text = table(rows)
        (out / "judges.md").write_text(text + "\n")
        print(text)
        for p in plot(rows, out):
            print(f"wrote {p}")
        return
    from benchmarks import quality

    quality.start_run(args.data_dir)
    score(args)


if __name__ == "__main__":
    main()

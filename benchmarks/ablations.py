"""The paper's ablation table at CPU scale: attention pattern, window start T, number of scales, MoT
vs separate per-scale models, on quality.py's Fashion-MNIST recipe, scored by benchmarks/judges.py.

    apt-get install -y dataset-fashion-mnist      # once: the data
    # 1. train every model of the study (resumable: a finished workdir is skipped, a cut one resumes)
    nice -n 15 python benchmarks/ablations.py --train --seeds=0,1 --workdir=/tmp/lapflow_ablations
    # 2. score them, guidance 3 (the study's), 5,000 samples each; cells append to judges.jsonl
    nice -n 15 python benchmarks/judges.py --guidance=3 --samples=5000 --keep=0 \\
        --models=$(python benchmarks/ablations.py --list --seeds=0,1 --workdir=/tmp/lapflow_ablations)
    # 3. the table (stdout and ablations.md), from judges.jsonl
    python benchmarks/ablations.py --table

Every model is quality.py's (width 128, depth 4, 4 heads, finest patch 8, batch 64, lr 1e-3 constant,
EMA 0.995, Heun 20 steps, guidance 3) with one thing changed. The default LapFlow is 2 scales, T = 0.5,
block-causal attention, one MoT: `lapflow2`, the row every ablation shares (the paper's 3.53).
  - attention (config.model.attention_mask): block-causal / full / self-only; 2 scales.
  - window start T of the fine scale (config.window_starts = (T, 0)): 0.1 / 0.2 / 0.5 / 0.9; 2 scales.
  - number of scales 1-4: the judges study's baseline, lapflow2 and lapflow3, and lapflow4 (windows
    3/4, 1/2, 1/4, 0; patches 8, 8, 8, 4, since the 4 px scale cannot take a patch of 8).
  - architecture (config.model.architecture): one MoT / separate per-scale transformers, each reading
    its own scale and every coarser one (models.mot.SeparateScaleModels says how we read the paper).
Training budget: the number-of-scales row trains at equal compute, as quality.py does (the baseline's
--steps times the baseline's tokens per training image over the model's); every other row changes
nothing that a training step costs except the separate models, which train lapflow2's steps (equal
steps, as the paper's table holds its steps; their XLA-counted GFLOPs per step are in the table).

--table: for each ablation row, the paper's FID (ImageNet 256, its Table) beside our mean ± spread
over seeds of both Frechet distances (the study's CNN and EfficientNet-Lite0), the CNN's accuracy and
precision/recall, and per FD judge whether the paper's ordering of the settings reproduces: "yes" when
the full ranking matches, "best only" when only the best setting matches, else "no". With two seeds,
an ordering inside the seeds' spread is marked "(within spread)", and one from a single seed "(one seed)".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import judges, quality  # noqa: E402

# name -> (number of scales, config overrides, training budget: "compute" or "lapflow2_steps").
MODELS = {
    "baseline": (1, {}, "compute"),
    "lapflow2": (2, {}, "compute"),
    "lapflow3": (3, {}, "compute"),
    "lapflow4": (4, {}, "compute"),   # quality.patch_sizes: 8, 8, 8, 4
    "lapflow2_mask-full": (2, {"model.attention_mask": "full"}, "compute"),
    "lapflow2_mask-self": (2, {"model.attention_mask": "self"}, "compute"),
    "lapflow2_T0.1": (2, {"window_starts": (0.1, 0.0)}, "compute"),
    "lapflow2_T0.2": (2, {"window_starts": (0.2, 0.0)}, "compute"),
    "lapflow2_T0.9": (2, {"window_starts": (0.9, 0.0)}, "compute"),
    "lapflow2_separate": (2, {"model.architecture": "separate"}, "lapflow2_steps"),
}

# ablation -> [(setting label, model, paper FID)], in the paper's order of the setting.
ABLATIONS = {
    "attention pattern": [("block-causal", "lapflow2", 3.53), ("full", "lapflow2_mask-full", 3.91),
                          ("self-only", "lapflow2_mask-self", 5.19)],
    "window start T": [("0.1", "lapflow2_T0.1", 5.12), ("0.2", "lapflow2_T0.2", 4.37), ("0.5", "lapflow2", 3.53),
                       ("0.9", "lapflow2_T0.9", 4.92)],
    "number of scales": [("1", "baseline", 5.26), ("2", "lapflow2", 3.53), ("3", "lapflow3", 3.59),
                         ("4", "lapflow4", 5.12)],
    "architecture": [("MoT", "lapflow2", 3.53), ("separate", "lapflow2_separate", 3.60)],
}
JUDGED = ("fd_cnn", "fd_efficientnet")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="train --models x --seeds into --workdir")
    mode.add_argument("--list", action="store_true", help="print the workdirs of --models x --seeds, comma-separated")
    mode.add_argument("--table", action="store_true", help="the ablation table from --out/judges.jsonl")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--workdir", default="/tmp/lapflow_ablations")
    p.add_argument("--steps", type=int, default=3000, help="the baseline's training steps (quality.py's --steps)")
    p.add_argument("--save_every", type=int, default=1000, help="checkpoint interval (a cut run resumes from it)")
    p.add_argument("--guidance", type=float, default=3.0, help="the guidance scale whose cells the table reads")
    p.add_argument("--samples", type=int, default=5000, help="the N whose cells the table reads")
    p.add_argument("--data_dir", default="")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        p.error(f"--models: {unknown} not among {list(MODELS)}")
    return args


def model_config(args, name: str, seed: int):
    """quality.py's config for `name` (its scales, its overrides) at its training budget."""
    scales, overrides, budget = MODELS[name]
    qargs = quality.parse_args([f"--steps={args.steps}", f"--eval_every={args.steps}", f"--data_dir={args.data_dir}"])
    base_tokens = quality.training_tokens(1, qargs.patch, 32)
    if budget == "compute":
        steps = math.ceil(args.steps * base_tokens /
                          quality.training_tokens(scales, quality.patch_sizes(qargs.patch, scales), 32))
    else:  # lapflow2's steps
        steps = math.ceil(args.steps * base_tokens / quality.training_tokens(2, qargs.patch, 32))
    c = quality.make_config(qargs, scales, seed, steps)
    for field, value in overrides.items():
        node = c
        *parents, leaf = field.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    c.checkpoint.every_steps = args.save_every
    c.log.every_steps = 500
    return c


def workdirs(args) -> list[Path]:
    return [Path(args.workdir) / f"{name}_seed{seed}" for name in args.models.split(",")
            for seed in (int(s) for s in args.seeds.split(","))]


def train_all(args) -> None:
    import time

    from lapflow_jax import cli, train

    cli.setup_console(verbose=False)
    for workdir in workdirs(args):
        name, seed = workdir.name.rsplit("_seed", 1)
        config = model_config(args, name, int(seed))
        # Orbax names a checkpoint's folder by its step once the save is complete.
        final = workdir / "checkpoints" / str(config.train.num_steps)
        if final.is_dir():
            print(f"{workdir.name}: done ({config.train.num_steps} steps)", flush=True)
            continue
        t0 = time.perf_counter()
        train.train(config, str(workdir))
        if not final.is_dir():  # the loop saved and returned on a stop signal: a rerun resumes
            sys.exit(f"{workdir.name}: stopped before step {config.train.num_steps}; rerun to resume")
        print(f"{workdir.name}: {config.train.num_steps} steps in {time.perf_counter() - t0:.0f}s, "
              f"{quality.gflops_per_step(workdir):.2f} GFLOP/step", flush=True)


def ordering(settings: list[tuple[str, float, float | None]], paper: list[float]) -> str:
    """settings: (label, our mean, our spread) in the paper's order; lower is better for both."""
    ours = sorted(range(len(settings)), key=lambda i: settings[i][1])
    theirs = sorted(range(len(paper)), key=lambda i: paper[i])
    verdict = "yes" if ours == theirs else "best only" if ours[0] == theirs[0] else "no"
    if any(spread is None for _, _, spread in settings):
        return verdict + " (one seed)"   # no spread to tell a resolved ordering from noise
    # Adjacent settings of our ranking whose means are closer than their spreads' sum are not resolved.
    close = any(settings[b][1] - settings[a][1] < settings[a][2] + settings[b][2] for a, b in zip(ours, ours[1:]))
    return verdict + (" (within spread)" if close else "")


def table(args, rows: list[dict]) -> str:
    entries = {(e["model"], e["guidance"], e["num_samples"]): e for e in judges.summarise(rows)}
    fmt = {"accuracy": "{:.3f}", "fd_cnn": "{:.2f}", "fd_efficientnet": "{:.1f}", "precision": "{:.3f}",
           "recall": "{:.3f}"}
    shown = ("fd_cnn", "fd_efficientnet", "accuracy", "precision", "recall")
    lines = [f"Fashion-MNIST 32x32, guidance {args.guidance:g}, N = {args.samples} samples per seed; "
             "mean ± standard deviation over seeds.", "",
             "| ablation | setting | paper FID | seeds | " + " | ".join(judges.HEADERS[m] for m in shown) + " |",
             "|---|---|---|---|" + "---|" * len(shown)]
    verdicts = []
    for ablation, settings in ABLATIONS.items():
        found = [(label, entries.get((model, args.guidance, args.samples)), fid) for label, model, fid in settings]
        for label, e, fid in found:
            if e is None:
                lines.append(f"| {ablation} | {label} | {fid} | – | " + " | ".join("not scored" for _ in shown) + " |")
                continue
            cells = [fmt[m].format(e[m][0]) + ("" if e[m][1] is None else " ± " + fmt[m].format(e[m][1]))
                     for m in shown]
            lines.append(f"| {ablation} | {label} | {fid} | {','.join(map(str, e['seeds']))} | " + " | ".join(cells) + " |")
        if all(e is not None for _, e, _ in found):
            paper = [fid for _, _, fid in found]
            verdicts.append(f"| {ablation} | " + " | ".join(
                ordering([(label, e[m][0], e[m][1]) for label, e, _ in found], paper) for m in JUDGED) + " |")
    lines += ["", "| ablation | paper's ordering reproduced, FD CNN | FD EfficientNet-Lite0 |", "|---|---|---|",
              *verdicts]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        print(",".join(map(str, workdirs(args))))
        return
    if args.table:
        rows = judges.read_cells(Path(args.out) / "judges.jsonl")
        if not rows:
            sys.exit(f"no cells in {Path(args.out) / 'judges.jsonl'}: run benchmarks/judges.py first")
        text = table(args, rows)
        (Path(args.out) / "ablations.md").write_text(text + "\n")
        print(text)
        return
    quality.start_run(args.data_dir)
    train_all(args)


if __name__ == "__main__":
    main()

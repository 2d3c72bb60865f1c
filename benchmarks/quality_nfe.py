"""dopri5's NFE before and after the window-aware solver, on the Fashion-MNIST study models.

    # the models: quality.py's configs, seed 0, trained by quality.py's run (or any workdirs
    # holding them as <models_dir>/<name>_seed0), then
    nice -n 10 python benchmarks/quality_nfe.py --models_dir=/tmp/lapflow_quality

For the 1-scale baseline and LapFlow with 2 and 3 scales (quality.py's MODELS, same configs,
guidance 3), --samples class-balanced samples in one batch, solved from the same noise by:

  before       the solver as it was: one cold start per segment (step = segment length / initial
               steps), error RMS over all normalised scales of the whole batch (diffrax's
               Dopri5 + PIDController; `sampling.DOPRI5_RESTART` is it step for step, tested);
  carry        + the step size carried over each window start;
  carry+image  + the error measured on the reconstructed image (one step size for the batch);
  after        + per-sample step sizes (the default): "nfe" is the mean per sample, "batch nfe"
               what the batch paid (its slowest sample).

Equal quality: every solve is compared with a tight one of the same noise,
as the RMS over pixels of the image difference (pixel range [-1, 1]); the reference is Heun at
--ref_steps and half as many, Richardson-extrapolated (the correction's size is recorded); a solver at equal tolerance
that lands further from the exact solution is not cheaper at equal quality.

Where the steps go: for "before" and "after", accepted and rejected steps per sample in each of 20
bins of global time t (`SampleResult.dopri5_stats`), with the mean step size in the bin.

Writes <out>/quality_nfe.json and quality_nfe.md. Resumes: a (model, solver) already in the JSON
is not solved again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SOLVERS = ("before", "carry", "carry+image", "after")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models_dir", default="/tmp/lapflow_quality")
    p.add_argument("--models", default="baseline,lapflow2,lapflow3")
    p.add_argument("--train_steps", type=int, default=3000, help="the baseline's --steps of the quality run")
    p.add_argument("--tol", type=float, default=1e-5, help="dopri5 rtol = atol")
    p.add_argument("--samples", type=int, default=50,
                   help="one batch (CFG doubles it); the per-sample NFE does not depend on it, the batch NFE does")
    p.add_argument("--initial_steps", type=int, default=20, help="quality.py's --nfe (config sample.steps)")
    p.add_argument("--ref_steps", type=int, default=200,
                   help="Heun steps of the reference (with half as many, Richardson-extrapolated)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    return p.parse_args(argv)


def options(name: str):
    from lapflow_jax import sampling

    return {"before": sampling.DOPRI5_RESTART,
            "carry": sampling.Dopri5Options(carry_step=True, error_norm="state", per_sample=False),
            "carry+image": sampling.Dopri5Options(carry_step=True, error_norm="image", per_sample=False),
            "after": sampling.Dopri5Options()}[name]


def load(args, name: str):
    """(config, velocity_fn, model args, path, noise, to_image) of a trained study model."""
    import math

    import jax
    import numpy as np
    from benchmarks import quality
    from lapflow_jax import generate, pyramid, sample as sample_lib, sampling

    qargs = quality.parse_args([f"--steps={args.train_steps}", f"--eval_every={args.train_steps}"])
    scales = quality.MODELS[name]
    steps = int(math.ceil(qargs.steps * quality.training_tokens(1, qargs.patch, 32)
                          / quality.training_tokens(scales, qargs.patch, 32)))
    config = quality.make_config(qargs, scales, 0, steps)
    workdir = Path(args.models_dir) / f"{name}_seed0"
    setup, step, params, sigmas = sample_lib.restore_for_sampling(config, workdir)
    shapes = tuple(pyramid.scale_shapes(32, 32, scales))
    noise, labels = generate._noise_and_labels(jax.random.fold_in(jax.random.key(2000), 0), 0, shapes=shapes, channels=1,
                                               num_classes=setup.num_classes, batch=args.samples, sharding=None)
    velocity = generate.velocity_for(config, setup.graphdef, setup.num_classes)
    to_image = sampling.image_fn(tuple(float(s) for s in np.asarray(sigmas)), config.pyramid.up)
    return config, step, velocity, (params, labels), generate.path_from_config(config), noise, to_image


def step_table(stats, bins: int = 20) -> list[dict]:
    """Per global-time bin: mean accepted and rejected steps per sample, mean accepted step size."""
    import numpy as np

    accepted = sum(np.asarray(s["accepted_t"], np.float64) for s in stats).mean(0)
    rejected = sum(np.asarray(s["rejected_t"], np.float64) for s in stats).mean(0)
    return [{"t": [i / bins, (i + 1) / bins], "accepted": float(a), "rejected": float(r),
             "mean_step": float(1 / bins / a) if a else None} for i, (a, r) in enumerate(zip(accepted, rejected))]


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax.numpy as jnp
    import numpy as np
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    from lapflow_jax import sampling

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path_json = out / "quality_nfe.json"
    results = json.loads(path_json.read_text()) if path_json.exists() else {}
    results["args"] = vars(args)
    for name in args.models.split(","):
        row = results.setdefault(name, {})
        if all(s in row for s in SOLVERS):
            continue
        config, step, velocity, model_args, path, noise, to_image = load(args, name)
        row["train_step"] = step
        t0 = time.perf_counter()
        # Heun at ref_steps and ref_steps / 2, Richardson-extrapolated (Heun's error is O(h^2)).
        fine, coarse = (to_image(sampling.sample(velocity, model_args, path, noise, method="heun",
                                                 steps=n).residuals) for n in (args.ref_steps, args.ref_steps // 2))
        ref_image = (fine + (fine - coarse) / 3).block_until_ready()
        row["reference_richardson_correction_rms"] = float(jnp.sqrt(jnp.mean(jnp.square(fine - coarse) / 9)))
        print(f"{name}: reference (Heun {args.ref_steps}) in {time.perf_counter() - t0:.0f}s", flush=True)
        for solver in SOLVERS:
            if solver in row:
                continue
            t0 = time.perf_counter()
            res = sampling.sample(velocity, model_args, path, noise, method="dopri5", steps=args.initial_steps,
                                  rtol=args.tol, atol=args.tol, dopri5=options(solver), to_image=to_image)
            stats = res.dopri5_stats
            per_sample = np.sum([s["nfe"] for s in stats], axis=0)
            diff = to_image(res.residuals) - ref_image
            rms = jnp.sqrt(jnp.mean(jnp.square(diff), axis=(1, 2, 3)))
            row[solver] = {
                "batch_nfe": int(sum(res.nfe_per_segment)),
                "batch_nfe_per_segment": list(res.nfe_per_segment),
                "nfe_mean": float(per_sample.mean()), "nfe_min": int(per_sample.min()),
                "nfe_max": int(per_sample.max()),
                "nfe_mean_per_segment": [float(s["nfe"].mean()) for s in stats],
                "rejected_mean": float(np.sum([s["rejected"] for s in stats], axis=0).mean()),
                "h_start_mean": [float(s["h_start"].mean()) for s in stats],
                "image_rms_vs_tight": float(rms.mean()), "image_max_vs_tight": float(jnp.abs(diff).max()),
                "seconds": time.perf_counter() - t0,
                "step_table": step_table(stats)}
            print(f"{name} {solver}: batch NFE {row[solver]['batch_nfe']} {row[solver]['batch_nfe_per_segment']}, "
                  f"per-sample mean {row[solver]['nfe_mean']:.1f}, image RMS vs tight "
                  f"{row[solver]['image_rms_vs_tight']:.2e} ({row[solver]['seconds']:.0f}s)", flush=True)
            path_json.write_text(json.dumps(results, indent=1))
    write_markdown(results, out / "quality_nfe.md")


def write_markdown(results: dict, path: Path) -> None:
    args = results["args"]
    lines = [f"dopri5 at rtol = atol = {args['tol']:g}, {args['samples']} class-balanced samples in one batch, "
             f"CFG 3, initial step = segment / {args['initial_steps']} (quality.py's models, seed 0; command in "
             "benchmarks/README.md). NFE = model calls (a guided call counts once). Image RMS: pixel RMS "
             f"([-1, 1] range) against Heun with {args['ref_steps']} and {args['ref_steps'] // 2} steps from the same "
             "noise, Richardson-extrapolated. Batch NFE: what the batch paid (with per-sample steps, its "
             "slowest sample); per-sample NFE: what each sample needed.", "",
             "| model | train step | solver | NFE (batch) | NFE per segment (batch) | NFE per sample, mean [min, max] "
             "| rejected / sample | image RMS vs tight |", "|---|---|---|---|---|---|---|---|"]
    models = [m for m in ("baseline", "lapflow2", "lapflow3") if m in results]
    for m in models:
        for s in SOLVERS:
            r = results[m].get(s)
            if r:
                lines.append(f"| {m} | {results[m]['train_step']} | {s} | {r['batch_nfe']} | {r['batch_nfe_per_segment']} | "
                             f"{r['nfe_mean']:.1f} [{r['nfe_min']}, {r['nfe_max']}] | {r['rejected_mean']:.1f} | "
                             f"{r['image_rms_vs_tight']:.2e} |")
    lines += ["", "Where the steps go (mean per sample: accepted steps, rejected in brackets, per bin of t):", ""]
    bins = [f"{i / 20:.2f}" for i in range(20)]
    lines += ["| model | solver | " + " | ".join(bins) + " |", "|---|---|" + "---|" * 20]
    for m in models:
        for s in ("before", "after"):
            r = results[m].get(s)
            if r:
                lines.append(f"| {m} | {s} | " + " | ".join(
                    f"{b['accepted']:.1f}" + (f" ({b['rejected']:.1f})" if b["rejected"] else "")
                    for b in r["step_table"]) + " |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

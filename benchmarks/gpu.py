"""Accelerator benchmark: DiT-B/2 and XL/2, LapFlow vs the single-scale baseline at the paper's latent size, bf16.

    python benchmarks/gpu.py                       # on a GPU/TPU host: B/2 then XL/2, 32x32x4 latents, bf16
    python benchmarks/gpu.py --presets=XL --settings=baseline,lapflow2 --train_batch=32
    python benchmarks/gpu.py --smoke               # a tiny model on CPU: checks the script end to end

The same sampling and training measurements as benchmarks/sampling.py and training.py, for the
B preset (768 wide, 12 blocks, 12 heads) and the XL preset (1152 wide, 28 blocks, 16 heads), patch
2 on 32x32x4 latents (a 256 px image through the f = 8 autoencoder), compute in bfloat16
(parameters, optimizer state and loss float32), plus the model FLOPs utilisation of the train step:

    MFU = (XLA FLOPs of one compiled train step per device) / (step seconds) / (peak bf16 FLOP/s)

The peak comes from the device kind (dense bf16: H100/H200 SXM 989 TFLOP/s, A100 312, TPU v4
275, v5e 197, v5p 459, v6e 918) or --peak_tflops. The step is not rematerialised, so XLA's count
is the model's FLOPs. GFLOPs here are XLA's (2 per multiply-add); DiT-B/2's "23 GFLOPs" per
forward pass in the DiT paper are MACs (our GMACs column).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks import sampling as sampling_bench  # noqa: E402
from benchmarks import training as training_bench  # noqa: E402

# Dense bf16 peak TFLOP/s per device, by a substring of jax's device_kind (first match wins).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("A100", 312.0),
    ("L4", 121.0), ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0),
    ("TPU v5", 459.0), ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_kind.lower():
            return value
    return None


# Per preset: DiT's (width, depth, heads) and what fits one 80 GB card without rematerialisation.
# XL/2 drops the 3-scale setting by default: its train state (2.0B parameters with AdamW and EMA,
# 32 GB) next to the other two's would not leave room for the activations.
PRESETS = {
    "B": dict(size=(768, 12, 12), train_batch=240, settings="baseline,lapflow2,lapflow3"),
    "XL": dict(size=(1152, 28, 16), train_batch=64, settings="baseline,lapflow2"),
}


def run_preset(preset: str, args, peak: float | None) -> dict:
    """Sampling and training tables for one model size; returns their numbers."""
    defaults = PRESETS[preset]
    settings = tuple((args.settings or defaults["settings"]).split(","))
    if args.smoke:
        spec = common.ModelSpec(image_size=16, channels=4, width=64, depth=2, heads=2, patch=2, dtype="bfloat16",
                                num_classes=10, attention_backend="xla")
        sample_batch, nfe, train_batch, repeats = 4, 6, 6, 1
    else:
        width, depth, heads = defaults["size"]
        spec = common.ModelSpec(image_size=32, channels=4, width=width, depth=depth, heads=heads, patch=2,
                                dtype="bfloat16", preset=preset, num_classes=1000,
                                attention_backend=args.attention_backend)
        sample_batch, nfe, repeats = args.sample_batch, args.nfe, args.repeats
        train_batch = args.train_batch or defaults["train_batch"]
    print(f"\n## {preset}/2{' (smoke: a tiny stand-in)' if args.smoke else ''}", flush=True)
    sampled = sampling_bench.run(spec, batch=sample_batch, nfe=nfe, method="euler", guidance=args.guidance,
                                 repeats=repeats, settings=settings)
    sampling_bench.print_report(spec, sampled, batch=sample_batch, method="euler", guidance=args.guidance)
    trained = training_bench.run(spec, batch=train_batch, repeats=repeats, settings=settings)
    training_bench.print_report(spec, trained, batch=train_batch, peak_tflops=peak)
    common.release_cached_params()  # the next preset's models need the memory
    return {"sampling": sampled, "training": trained}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps: runs on CPU in a few minutes")
    parser.add_argument("--presets", default="B,XL", help=f"comma-separated, of {sorted(PRESETS)}")
    parser.add_argument("--sample_batch", type=int, default=64)
    parser.add_argument("--nfe", type=int, default=48, help="total Euler steps (divisible by 2 and 3 segments)")
    parser.add_argument("--guidance", type=float, default=1.0, help="CFG scale (1.5 for the paper's B/2 row)")
    parser.add_argument("--train_batch", type=int, default=0,
                        help="global batch, divisible by the stages of every setting (default: per preset, "
                             + ", ".join(f"{k} {v['train_batch']}" for k, v in PRESETS.items()) + ")")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attention_backend", default="auto")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="override the device's bf16 peak")
    parser.add_argument("--settings", default="", help="comma-separated, of baseline,lapflow2,lapflow3 "
                                                        "(default: per preset)")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    presets = args.presets.split(",")
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        parser.error(f"--presets: {unknown} not among {sorted(PRESETS)}")

    import jax

    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or peak_tflops(kind)
    if args.smoke and not peak:
        peak = 0.1  # a nominal CPU figure, only so that the smoke run exercises the MFU column
        print("smoke: assuming a 0.1 TFLOP/s peak for the MFU column")
    print(f"device: {common.device_description()}; bf16 peak {peak or 'unknown'} TFLOP/s per device", flush=True)
    results = {preset: run_preset(preset, args, peak) for preset in presets}
    if not peak:
        print(f"MFU: no bf16 peak known for device kind {kind!r}; pass --peak_tflops.")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": kind, "peak_tflops": peak,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()

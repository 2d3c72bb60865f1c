"""ImageNet 256, class-conditional, LapFlow XL/2 in SD-VAE latents (trained for CFG).

Everything as configs/imagenet256_b2_lapflow.py (same cached latents, 2 scales, T = 0.5, label
dropout 0.1) with the DiT-XL/2 size, sampled without guidance for the paper's comparison.

Paper (LapFlow, ICLR 2026, arXiv 2602.19461, as public summaries quote it),
ImageNet 256, XL/2 at 600K steps:

    LapFlow (this config)                  FID 14.38   20.5 GFLOPs
    LFM (imagenet256_xl2_baseline.py)      FID 28.37   29.1 GFLOPs
    DiT-XL/2                               FID 19.50
    Pyramidal Flow                         FID 17.10

The figures match unguided sampling (DiT-XL/2's 19.5 is its no-guidance FID), so this config
samples at guidance 1.0; the model is trained with label dropout, so
--config.sample.guidance_scale=1.5 gives guided samples. Schedule: batch 256, lr 1e-4 constant,
EMA 0.9999 as DiT [ours], 600k steps as the paper.

Commands (docs/latent.md; the latents are imagenet256_b2_lapflow.py's, cache once):

    python -m lapflow_jax.latents --config=configs/imagenet256_xl2_lapflow.py
    python -m lapflow_jax.main --config=configs/imagenet256_xl2_lapflow.py --workdir=workdirs/imagenet256_xl2_lapflow
    python -m lapflow_jax.main --config=configs/imagenet256_xl2_lapflow.py --workdir=workdirs/imagenet256_xl2_lapflow --mode=sample
    python -m lapflow_jax.main --config=configs/imagenet256_xl2_lapflow.py --workdir=workdirs/imagenet256_xl2_lapflow --mode=eval

Compile check (the TPU compiler on this host, no TPU; docs/compile_check.md), v5p-8, the slice
chosen by predicted step time for this batch:

    python -m lapflow_jax.compile_check --config=configs/imagenet256_xl2_lapflow.py --topology=v5p:2x2x1

Passes: mesh (data, model) = (4, 1), data parallel, splash attention, global batch 256. Per chip:
train step 67.22 GiB of 95 (20.07 state + 47.10 temporaries), sampling at most 7.65 GiB; 34.23
TFLOPs per step; compiled in 437 s here. Predicted step time (the roofline in
docs/compile_check.md): 148.4 ms with everything overlapped to 168.7 ms with nothing, MFU 44.2% to
50.2%, bound by HBM.

The same batch on v5p-128 (--topology=v5p:4x4x4 --config.fsdp=True: FSDP in groups of 32, 6.19 GiB
per chip) is predicted at 43.8 to 61.5 ms per step, MFU 7.6% to 10.6% (bound by HBM): faster per
step, far slower per chip. A larger slice pays off with a larger global batch.
"""

import os

from lapflow_jax.config import config_from_file


def get_config():
    c = config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet256_b2_lapflow.py"))
    c.model.preset = "XL"             # DiT-XL: 1152 wide, depth 28, 16 heads
    c.sample.guidance_scale = 1.0
    return c

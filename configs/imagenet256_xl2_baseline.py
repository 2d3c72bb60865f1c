"""ImageNet 256, class-conditional, XL/2 at 600K steps: single-scale baseline (LFM-style latent flow
matching).

Everything as configs/imagenet256_xl2_lapflow.py (autoencoder, cached latents, model size, optimiser,
sampler), but one scale on the whole [0, 1]: the MoT with L = 1 is a plain DiT/SiT velocity
model.

Paper (LapFlow, ICLR 2026, arXiv 2602.19461, as public summaries quote it): LFM FID 28.37 at 29.1
GFLOPs (LapFlow: 14.38 at 20.5 GFLOPs; DiT-XL/2 19.50).

Commands (the cached latents are imagenet256_xl2_lapflow.py's: cache once with either config):

    python -m lapflow_jax.latents --config=configs/imagenet256_xl2_baseline.py
    python -m lapflow_jax.main --config=configs/imagenet256_xl2_baseline.py --workdir=workdirs/imagenet256_xl2_baseline
    python -m lapflow_jax.main --config=configs/imagenet256_xl2_baseline.py --workdir=workdirs/imagenet256_xl2_baseline --mode=sample
    python -m lapflow_jax.main --config=configs/imagenet256_xl2_baseline.py --workdir=workdirs/imagenet256_xl2_baseline --mode=eval

Compile check (the TPU compiler on this host, no TPU; docs/compile_check.md), v5p-128:

    python -m lapflow_jax.compile_check --config=configs/imagenet256_xl2_baseline.py --topology=v5p:4x4x4 --config.fsdp=True

Passes: mesh (data, model) = (64, 1), FSDP in groups of 32, splash attention, global batch 256. Per
chip: train step 4.80 GiB of 95 (0.32 state + 4.45 temporaries), sampling at most 0.25 GiB; 2.85
TFLOPs per step; compiled in 47 s here. Predicted step time (the roofline in
docs/compile_check.md): 19.4 ms with everything overlapped to 26.0 ms with nothing, MFU 23.9% to
32.1%, bound by HBM.
"""

import os

from lapflow_jax.config import single_scale_baseline


def get_config():
    return single_scale_baseline(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet256_xl2_lapflow.py"))

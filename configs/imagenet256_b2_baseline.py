"""ImageNet 256, class-conditional (CFG 1.5), B/2: single-scale baseline (LFM-style latent flow
matching).

Everything as configs/imagenet256_b2_lapflow.py (autoencoder, cached latents, model size, optimiser,
sampler), but one scale on the whole [0, 1]: the MoT with L = 1 is a plain DiT/SiT velocity
model.

Paper (LapFlow, ICLR 2026, arXiv 2602.19461, as public summaries quote it): LFM FID 4.46 with CFG
1.5 (LapFlow: 4.12); one summary quotes 39.40 vs 36.50, probably unguided.

Commands (the cached latents are imagenet256_b2_lapflow.py's: cache once with either config):

    python -m lapflow_jax.latents --config=configs/imagenet256_b2_baseline.py
    python -m lapflow_jax.main --config=configs/imagenet256_b2_baseline.py --workdir=workdirs/imagenet256_b2_baseline
    python -m lapflow_jax.main --config=configs/imagenet256_b2_baseline.py --workdir=workdirs/imagenet256_b2_baseline --mode=sample
    python -m lapflow_jax.main --config=configs/imagenet256_b2_baseline.py --workdir=workdirs/imagenet256_b2_baseline --mode=eval

Compile check (the TPU compiler on this host, no TPU; docs/compile_check.md), v5litepod-8:

    python -m lapflow_jax.compile_check --config=configs/imagenet256_b2_baseline.py --topology=v5e:2x4

Passes: mesh (data, model) = (8, 1), data parallel with ZeRO-1 (config.zero1, as the LapFlow
config), splash attention, global batch 256. Per chip: train step 8.05 GiB of 16 (0.67 state + 7.36
temporaries), sampling at most 0.68 GiB; 4.44 TFLOPs per step; compiled in 43 s here. Predicted
step time (the roofline in docs/compile_check.md): 64.2 ms with everything overlapped to 73.3 ms
with nothing, MFU 30.7% to 35.1%, bound by HBM (52.6 GB per chip per step). Without ZeRO-1
(--config.zero1=False): 9.87 GiB (1.94 state), 69.9 GB of HBM traffic, 85.3 to 89.9 ms, MFU 25.0%
to 26.4%.
"""

import os

from lapflow_jax.config import single_scale_baseline


def get_config():
    return single_scale_baseline(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet256_b2_lapflow.py"))

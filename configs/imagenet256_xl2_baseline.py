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
"""

import os

from lapflow_jax.config import single_scale_baseline


def get_config():
    return single_scale_baseline(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet256_xl2_lapflow.py"))

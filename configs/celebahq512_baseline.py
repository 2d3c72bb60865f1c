"""CelebA-HQ 512, unconditional: single-scale baseline (LFM-style latent flow matching).

Everything as configs/celebahq512_lapflow.py (autoencoder, cached latents, model size, optimiser,
sampler), but one scale on the whole [0, 1]: the MoT with L = 1 is a plain DiT/SiT velocity
model.

Paper (LapFlow, ICLR 2026, arXiv 2602.19461, as public summaries quote it): LFM FID 6.35, 2.90
s/sample, 43.5 GFLOPs (LapFlow: 4.04, 2.60 s, 41.7 GFLOPs).

Commands (the cached latents are celebahq512_lapflow.py's: cache once with either config):

    python -m lapflow_jax.latents --config=configs/celebahq512_baseline.py
    python -m lapflow_jax.main --config=configs/celebahq512_baseline.py --workdir=workdirs/celebahq512_baseline
    python -m lapflow_jax.main --config=configs/celebahq512_baseline.py --workdir=workdirs/celebahq512_baseline --mode=sample
    python -m lapflow_jax.main --config=configs/celebahq512_baseline.py --workdir=workdirs/celebahq512_baseline --mode=eval
"""

import os

from lapflow_jax.config import single_scale_baseline


def get_config():
    return single_scale_baseline(os.path.join(os.path.dirname(os.path.abspath(__file__)), "celebahq512_lapflow.py"))

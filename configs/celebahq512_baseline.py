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
"""

import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "celebahq512_lapflow.py")
    spec = importlib.util.spec_from_file_location("celebahq512_lapflow", path)
    twin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(twin)
    c = twin.get_config()
    c.num_scales = 1
    c.window_starts = (0.0,)
    c.model.patch_sizes = (2,)
    return c

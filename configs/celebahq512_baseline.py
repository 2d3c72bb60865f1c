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

Compile check (the TPU compiler on this host, no TPU; docs/compile_check.md), v5p-8:

    python -m lapflow_jax.compile_check --config=configs/celebahq512_baseline.py --topology=v5p:2x2x1

Passes: mesh (data, model) = (4, 1), data parallel, splash attention, global batch 32. Per chip:
train step 28.66 GiB of 95 (6.81 state + 21.83 temporaries), sampling at most 2.81 GiB; 17.42
TFLOPs per step; compiled in 40 s here. Predicted step time (the roofline in
docs/compile_check.md): 56.1 ms with everything overlapped to 63.0 ms with nothing, MFU 60.3% to
67.6%, bound by HBM.
"""

import os

from lapflow_jax.config import single_scale_baseline


def get_config():
    return single_scale_baseline(os.path.join(os.path.dirname(os.path.abspath(__file__)), "celebahq512_lapflow.py"))

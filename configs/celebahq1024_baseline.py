"""CelebA-HQ 1024, unconditional: single-scale baseline (LFM-style latent flow matching).

Everything as configs/celebahq1024_lapflow.py (autoencoder, cached latents, model size, optimiser,
sampler), but one scale on the whole [0, 1]: the MoT with L = 1 is a plain DiT/SiT velocity
model.

Paper (LapFlow, ICLR 2026, arXiv 2602.19461, as public summaries quote it): LFM FID 8.12, NFE 100,
4.20 s/sample, 154.8 GFLOPs (LapFlow: 5.51, 94, 3.30 s, 148.2 GFLOPs).

Commands (the cached latents are celebahq1024_lapflow.py's: cache once with either config):

    python -m lapflow_jax.latents --config=configs/celebahq1024_baseline.py
    python -m lapflow_jax.main --config=configs/celebahq1024_baseline.py --workdir=workdirs/celebahq1024_baseline
    python -m lapflow_jax.main --config=configs/celebahq1024_baseline.py --workdir=workdirs/celebahq1024_baseline --mode=sample
    python -m lapflow_jax.main --config=configs/celebahq1024_baseline.py --workdir=workdirs/celebahq1024_baseline --mode=eval

Compile check (the TPU compiler on this host, no TPU; docs/compile_check.md), v5p-16:

    python -m lapflow_jax.compile_check --config=configs/celebahq1024_baseline.py --topology=v5p:2x2x2

Passes: mesh (data, model) = (8, 1), data parallel, splash attention, global batch 32. Per chip:
train step 46.98 GiB of 95 (6.81 state + 40.14 temporaries), sampling at most 2.74 GiB; 49.97
TFLOPs per step; compiled in 55 s here. Predicted step time (the roofline in
docs/compile_check.md): 108.9 ms with everything overlapped to 114.2 ms with nothing, MFU 95.3% to
100.0%, bound by compute.
"""

import os

from lapflow_jax.config import single_scale_baseline


def get_config():
    return single_scale_baseline(os.path.join(os.path.dirname(os.path.abspath(__file__)), "celebahq1024_lapflow.py"))

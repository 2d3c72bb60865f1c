"""CelebA-HQ 256, unconditional, single-scale baseline (LFM-style latent flow matching).

Everything as configs/celebahq256_lapflow.py (EQ-VAE latents, DiT-L/2, optimiser, sampler), but
one scale on the whole [0, 1]: the MoT with L = 1 is a plain DiT/SiT velocity model.

Paper (LapFlow, ICLR 2026, arXiv 2602.19461, as public summaries quote it), CelebA-HQ 256, DiT-L/2:
LFM FID 5.26, NFE 89, 1.70 s/sample, 22.1 GFLOPs (LapFlow: 3.53, 80, 1.51 s, 16.5 GFLOPs); its scale
ablation gives 5.26 for one scale too. (LFM's own paper used SD-VAE; this baseline keeps the
autoencoder of the LapFlow config so that only the multi-scale part differs.)

Commands (the cached latents are celebahq256_lapflow.py's: cache once with either config):

    python -m lapflow_jax.latents --config=configs/celebahq256_baseline.py
    python -m lapflow_jax.main --config=configs/celebahq256_baseline.py --workdir=workdirs/celebahq256_baseline
    python -m lapflow_jax.main --config=configs/celebahq256_baseline.py --workdir=workdirs/celebahq256_baseline --mode=sample
    python -m lapflow_jax.main --config=configs/celebahq256_baseline.py --workdir=workdirs/celebahq256_baseline --mode=eval

Compile check (the TPU compiler on this host, no TPU; docs/compile_check.md), v5p-8:

    python -m lapflow_jax.compile_check --config=configs/celebahq256_baseline.py --topology=v5p:2x2x1

Passes: mesh (data, model) = (4, 1), data parallel, splash attention, global batch 32. Per chip:
train step 14.82 GiB of 95 (6.81 state + 7.99 temporaries), sampling at most 2.63 GiB; 3.89 TFLOPs
per step; compiled in 41 s here. Predicted step time (the roofline in docs/compile_check.md): 40.8
ms with everything overlapped to 47.6 ms with nothing, MFU 17.8% to 20.8%, bound by HBM.

ZeRO-1 stays off here, unlike the LapFlow config this one is built from: with --config.zero1=True
the overlapped bound falls to 34.8 ms but the bound with nothing overlapped rises to 48.5 ms (the
all-gather of the new parameters, 6.85 ms, costs more than the 6.0 ms of HBM time it saves).
"""

import os

from lapflow_jax.config import single_scale_baseline


def get_config():
    c = single_scale_baseline(os.path.join(os.path.dirname(os.path.abspath(__file__)), "celebahq256_lapflow.py"))
    c.zero1 = False                   # it would raise the step's upper bound here (see above)
    return c

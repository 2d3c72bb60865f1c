"""CelebA-HQ 1024, unconditional, LapFlow in SD-VAE latent space.

DiT-L/2 MoT on the 128x128x4 latent, 2 scales (128x128 and 64x64), window start T = 0.5.

Paper (LapFlow, ICLR 2026, arXiv 2602.19461, as public summaries quote it),
CelebA-HQ 1024, DiT-L/2, SD-VAE:

    method                           FID    NFE  s/sample  GFLOPs
    LapFlow (this config)            5.51   94   3.30      148.2
    LFM (celebahq1024_baseline.py)   8.12   100  4.20      154.8

Everything as configs/celebahq512_lapflow.py (SD-VAE, DiT-L/2, 2 scales, T = 0.5, the LFM
schedule and sampler [ours]) at 1024 px, with memory settings for the larger latents. With patch 2
the finest scale has 4096 tokens; the GFLOPs quoted suggest the paper's 1024 px model sees fewer
(e.g. --config.model.patch_sizes="(4,2)"), so treat the token layout as unconfirmed.

Commands (docs/latent.md: get sd-vae-ft-ema as a local diffusers folder and convert it once;
prepare celeb_a_hq/1024 with tfds):

    python -m lapflow_jax.latents --convert_from=/path/to/sd-vae-ft-ema --convert_to=autoencoders/sd-vae-ft-ema
    python -m lapflow_jax.latents --config=configs/celebahq1024_lapflow.py
    python -m lapflow_jax.main --config=configs/celebahq1024_lapflow.py --workdir=workdirs/celebahq1024_lapflow
    python -m lapflow_jax.main --config=configs/celebahq1024_lapflow.py --workdir=workdirs/celebahq1024_lapflow --mode=sample
    python -m lapflow_jax.main --config=configs/celebahq1024_lapflow.py --workdir=workdirs/celebahq1024_lapflow --mode=eval

The cached latents (about 16 GB in float16) are shared with celebahq1024_baseline.py. On a
TPU pod, add --distributed to every command on every host.

Compile check (the TPU compiler on this host, no TPU; docs/compile_check.md), v5p-16:

    python -m lapflow_jax.compile_check --config=configs/celebahq1024_lapflow.py --topology=v5p:2x2x2

Passes: mesh (data, model) = (8, 1), data parallel with ZeRO-1 (config.zero1), splash attention,
global batch 32. Per chip: train step 35.94 GiB of 95 (4.67 state + 31.21 temporaries), sampling
at most 5.34 GiB; 36.22 TFLOPs per step; compiled in 49 s here. Predicted step time (the roofline
in docs/compile_check.md): 86.3 ms with everything overlapped to 107.6 ms with nothing, MFU 73.4%
to 91.5%, bound by HBM. Without ZeRO-1 (--config.zero1=False): 47.91 GiB, 114.0 to 124.7 ms, MFU
63.3% to 69.2%.
"""

import os

from lapflow_jax.config import config_from_file


def get_config():
    c = config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "celebahq512_lapflow.py"))
    c.model.patch_sizes = (2, 2)      # 4096 fine + 1024 coarse tokens
    # AdamW + EMA split over the 8 chips: both step bounds fall (114.0 .. 124.7 -> 86.3 .. 107.6 ms);
    # at 512 px and for the baseline the no-overlap bound does not, so they keep it off [ours]
    c.zero1 = True

    c.latent.shape = (128, 128, 4)
    c.latent.dtype = "bfloat16"       # encoder activations at 1024 px are large
    c.latent.source.tfds_name = "celeb_a_hq/1024"
    c.latent.source.image_size = 1024
    c.latent.encode_batch_size = 8
    c.latent.images_per_shard = 256
    c.latent.store_dtype = "float16"
    c.latent.decode_batch_size = 4
    c.data.latents_dir = "latents/celebahq1024_sd-vae-ft-ema"

    c.sample.num_images = 8
    c.sample.batch_size = 8
    return c

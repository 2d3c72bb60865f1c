"""CelebA-HQ 256, unconditional, LapFlow in EQ-VAE latent space: the paper's headline setting.

DiT-L/2 MoT on the 32x32x4 latent, 2 scales (32x32 and 16x16), window start T = 0.5.

Paper (LapFlow, ICLR 2026, arXiv 2602.19461, as public summaries quote it),
CelebA-HQ 256, DiT-L/2:

    method                          FID    NFE   s/sample  GFLOPs
    LapFlow (this config)           3.53   80    1.51      16.5
    LFM (celebahq256_baseline.py)   5.26   89    1.70      22.1
    Pyramidal Flow                  11.20  90    1.85      14.2

and its ablations at this resolution: EQ-VAE 3.53 vs SD-VAE 4.37; latent 3.53 vs pixel 8.63;
window start T = 0.1 / 0.2 / 0.5 / 0.9 -> 5.12 / 4.37 / 3.53 / 4.92; scales 1 / 2 / 3 / 4 ->
5.26 / 3.53 / 3.59 / 5.12; attention mask none / self-only / causal -> 3.91 / 5.19 / 3.53.

Settings the paper does not state follow LFM's DiT-L/2 CelebA-HQ 256 run (batch 32, lr 2e-4
constant, 500 epochs of the 30k images, dopri5 with rtol = atol = 1e-5) [ours].

Commands (docs/latent.md: get EQ-VAE as a local diffusers folder, convert it once, prepare
celeb_a_hq/256 with tfds):

    python -m lapflow_jax.latents --convert_from=/path/to/eq-vae --convert_to=autoencoders/eq-vae
    python -m lapflow_jax.latents --config=configs/celebahq256_lapflow.py
    python -m lapflow_jax.main --config=configs/celebahq256_lapflow.py --workdir=workdirs/celebahq256_lapflow
    python -m lapflow_jax.main --config=configs/celebahq256_lapflow.py --workdir=workdirs/celebahq256_lapflow --mode=sample
    python -m lapflow_jax.main --config=configs/celebahq256_lapflow.py --workdir=workdirs/celebahq256_lapflow --mode=eval

The cached latents (about 2 GB: 30k images x 2 flips x mean and std, float32) are shared with
celebahq256_baseline.py. On a TPU pod, add --distributed to every command on every host.

--mode=eval computes FID (config.eval.metrics; the paper's metric) and the EfficientNet Fréchet
distance of 50,000 samples against all 30,000 CelebA-HQ images: tfds's celeb_a_hq has only a
"train" split, and FIDs on CelebA-HQ are reported against it. FID needs the InceptionV3 weights
at weights/pt_inception-2015-12-05-6726825d.pth (config.eval.inception_weights); download once:

    mkdir -p weights && wget -P weights https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

Compile check (the TPU compiler on this host, no TPU; docs/compile_check.md), v5p-8:

    python -m lapflow_jax.compile_check --config=configs/celebahq256_lapflow.py --topology=v5p:2x2x1

Passes: mesh (data, model) = (4, 1), data parallel with ZeRO-1 (config.zero1: AdamW moments, EMA
and the update split over the 4 chips), splash attention, global batch 32. Per chip: train step
13.78 GiB of 95 (5.95 state + 7.79 temporaries), sampling at most 5.22 GiB; 2.92 TFLOPs per step;
compiled in 82 s here. Predicted step time (the roofline in docs/compile_check.md): 47.0 ms with
everything overlapped to 74.3 ms with nothing, MFU 8.5% to 13.5%, bound by HBM (129.9 GB per chip
per step; all-reduce 13.7 ms, all-gather of the new parameters 13.7 ms). Without ZeRO-1
(--config.zero1=False): 24.65 GiB (13.59 state), 168.7 GB of HBM traffic, 61.0 to 74.7 ms, MFU
8.5% to 10.4%.
"""

from lapflow_jax.config import base_config


def get_config():
    c = base_config()
    c.num_scales = 2
    c.window_starts = (0.5, 0.0)      # paper: T = 0.5 (best of its ablation); coarsest at 0.
    c.path_kind = "global"

    c.model.preset = "L"              # DiT-L: 1024 wide, depth 24, 16 heads
    c.model.patch_sizes = (2, 2)      # "L/2": 256 fine + 64 coarse tokens
    c.model.conditional = False
    c.model.class_dropout = 0.0
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True        # one compiled block: compiles several times faster [ours]

    c.latent.enabled = True
    c.latent.autoencoder = "autoencoders/eq-vae"
    c.latent.shape = (32, 32, 4)
    c.latent.source.name = "tfds"
    c.latent.source.tfds_name = "celeb_a_hq/256"
    c.latent.source.split = "train"
    c.latent.source.image_size = 256
    c.latent.source.use_labels = False
    c.latent.flip = True
    c.latent.encode_batch_size = 64

    c.data.name = "latents"
    c.data.latents_dir = "latents/celebahq256_eq-vae"
    c.data.random_flip = True         # LFM's RandomHorizontalFlip: the cached mirror half the time
    c.data.use_labels = False

    c.zero1 = True                    # AdamW + EMA split over the 4 chips: step bound 61 -> 47 ms [ours]

    c.train.global_batch_size = 32
    c.train.num_steps = 468_750       # 500 epochs x 30000 / 32
    c.train.learning_rate = 2e-4
    c.train.schedule = "constant"
    c.train.ema_decay = 0.9999

    c.sample.method = "dopri5"        # paper: adaptive dopri5, segment by segment
    c.sample.rtol = 1e-5
    c.sample.atol = 1e-5
    c.sample.num_images = 16
    c.sample.batch_size = 16

    c.checkpoint.every_steps = 5000
    c.log.every_steps = 100
    c.log.sample_every_steps = 25_000
    # --mode=eval: tfds's celeb_a_hq has only "train", so FID is against the training images,
    # as CelebA-HQ FIDs are reported (num_reference 0: min(50,000 samples, 30,000 images)).
    c.eval.reference_split = "train"
    c.eval.metrics = ("fid", "fd_efficientnet")
    c.eval.inception_weights = "weights/pt_inception-2015-12-05-6726825d.pth"
    return c

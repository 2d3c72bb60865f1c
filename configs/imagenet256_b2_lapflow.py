"""ImageNet 256, class-conditional with classifier-free guidance, LapFlow B/2 in SD-VAE latents.

DiT-B/2 MoT on the 32x32x4 latent, 2 scales (32x32 and 16x16), window start T = 0.5; label
dropout 0.1 trains the null class, sampling uses guidance scale 1.5.

Paper (LapFlow, ICLR 2026, arXiv 2602.19461, as public summaries quote it),
ImageNet 256, B/2, CFG 1.5:

    LapFlow (this config)               FID 4.12
    LFM (imagenet256_b2_baseline.py)    FID 4.46

(One summary instead quotes B/2 36.50 vs LFM 39.40, probably without guidance: sample with
--config.sample.guidance_scale=1.0 to compare.)

The paper does not state the scales, the window or the schedule for ImageNet: 2 scales with
T = 0.5 carry over its CelebA-HQ ablation's best, and batch 256, lr 1e-4 constant, EMA 0.9999 and
600k steps follow DiT and the paper's XL/2 run [ours].

Commands (docs/latent.md: get sd-vae-ft-ema as a local diffusers folder and convert it once;
prepare imagenet2012 with tfds, --manual_dir holding the ILSVRC2012 archives):

    python -m lapflow_jax.latents --convert_from=/path/to/sd-vae-ft-ema --convert_to=autoencoders/sd-vae-ft-ema
    python -m lapflow_jax.latents --config=configs/imagenet256_b2_lapflow.py
    python -m lapflow_jax.main --config=configs/imagenet256_b2_lapflow.py --workdir=workdirs/imagenet256_b2_lapflow
    python -m lapflow_jax.main --config=configs/imagenet256_b2_lapflow.py --workdir=workdirs/imagenet256_b2_lapflow --mode=sample
    python -m lapflow_jax.main --config=configs/imagenet256_b2_lapflow.py --workdir=workdirs/imagenet256_b2_lapflow --mode=eval

The cached latents (1.28M images x 2 flips x mean and std in float16: about 42 GB) are shared
by all four imagenet256_* configs. On a TPU pod, add --distributed to every command on every
host (caching splits the shards over the hosts).

--mode=eval computes FID (the paper's metric), sFID, Inception Score and precision/recall as ADM's
evaluator does (config.eval.metrics; docs/evaluation.md) of 50,000 samples with uniformly random
labels, against 50,000 ImageNet training images; the papers' numbers are against ADM's reference
batch instead: add --config.eval.reference_npz=VIRTUAL_imagenet256_labeled.npz (its stored
training-set statistics for FID and sFID, its 10,000 images for precision/recall). The samples
are also written in ADM's layout (eval/step<step>/samples_50000x256x256x3.npz). The metrics need
the InceptionV3 weights at weights/pt_inception-2015-12-05-6726825d.pth
(config.eval.inception_weights); download once:

    mkdir -p weights && wget -P weights https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

Compile check (the TPU compiler on this host, no TPU; docs/compile_check.md), v5litepod-8:

    python -m lapflow_jax.compile_check --config=configs/imagenet256_b2_lapflow.py --topology=v5e:2x4

Passes: mesh (data, model) = (8, 1), data parallel with ZeRO-1 (config.zero1: AdamW moments, EMA
and the update split over the 8 chips), splash attention, global batch 256. Per chip: train step
7.95 GiB of 16 (1.33 state + 6.59 temporaries), sampling at most 1.51 GiB; 3.32 TFLOPs per step;
compiled in 35 s here. Predicted step time (the roofline in docs/compile_check.md): 87.5 ms with
everything overlapped to 105.7 ms with nothing, MFU 15.9% to 19.2%, bound by HBM (71.7 GB per chip
per step; all-reduce 9.0 ms, all-gather of the new parameters 9.1 ms). Without ZeRO-1
(--config.zero1=False): 11.35 GiB (3.86 state), 99.2 GB of HBM traffic, 121.2 to 130.3 ms, MFU
12.9% to 13.9%.
"""

from lapflow_jax.config import base_config


def get_config():
    c = base_config()
    c.num_scales = 2
    c.window_starts = (0.5, 0.0)
    c.path_kind = "global"

    c.model.preset = "B"              # DiT-B: 768 wide, depth 12, 12 heads
    c.model.patch_sizes = (2, 2)
    c.model.conditional = True
    c.model.class_dropout = 0.1       # null-class training for classifier-free guidance
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True        # one compiled block: compiles several times faster [ours]

    c.latent.enabled = True
    c.latent.autoencoder = "autoencoders/sd-vae-ft-ema"
    c.latent.shape = (32, 32, 4)
    c.latent.source.name = "tfds"
    c.latent.source.tfds_name = "imagenet2012"
    c.latent.source.split = "train"
    c.latent.source.image_size = 256  # center crop of the short side, resized (as ADM / LFM)
    c.latent.source.use_labels = True
    c.latent.source.num_workers = 8   # JPEG decoding is the bottleneck on the host
    c.latent.flip = True
    c.latent.encode_batch_size = 64
    c.latent.store_dtype = "float16"

    c.data.name = "latents"
    c.data.latents_dir = "latents/imagenet256_sd-vae-ft-ema"
    c.data.random_flip = True
    c.data.use_labels = True

    c.zero1 = True                    # AdamW + EMA split over the 8 chips: step bound 121 -> 88 ms [ours]

    c.train.global_batch_size = 256
    c.train.num_steps = 600_000
    c.train.learning_rate = 1e-4
    c.train.schedule = "constant"
    c.train.ema_decay = 0.9999

    c.sample.method = "dopri5"
    c.sample.rtol = 1e-5
    c.sample.atol = 1e-5
    c.sample.guidance_scale = 1.5
    c.sample.num_images = 16
    c.sample.batch_size = 16

    c.checkpoint.every_steps = 10_000
    c.log.every_steps = 100
    c.log.sample_every_steps = 50_000
    # --mode=eval: ADM's metrics against 50,000 training images (or ADM's reference batch,
    # config.eval.reference_npz).
    c.eval.reference_split = "train"
    c.eval.metrics = ("fid", "sfid", "inception_score", "precision_recall")
    c.eval.inception_weights = "weights/pt_inception-2015-12-05-6726825d.pth"
    return c

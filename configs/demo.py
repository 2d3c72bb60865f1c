"""CPU demo: a tiny 2-scale LapFlow on 32x32 crops of scikit-image's CC0 photos (no download).

    python -m lapflow_jax.main --config=configs/demo.py --workdir=workdirs/demo

Trains for a few minutes on 2 CPU cores, then writes checkpoints, TensorBoard events and
samples/samples_step*.png (plus a coarse-to-fine strip) into the workdir.
"""

from lapflow_jax.config import base_config


def get_config():
    c = base_config()
    c.num_scales = 2
    c.window_starts = (0.5, 0.0)
    c.model.preset = "tiny"
    c.model.hidden_size = 128
    c.model.depth = 4
    c.model.num_heads = 4
    c.model.patch_sizes = (4, 2)   # 64 fine tokens + 64 coarse tokens per 32x32 image
    c.model.conditional = False
    c.data.name = "demo_photos"
    c.data.image_size = 32
    c.data.num_records = 4096
    c.train.global_batch_size = 32
    c.train.num_steps = 600
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 100
    c.train.schedule = "cosine"
    c.train.ema_decay = 0.995
    c.checkpoint.every_steps = 250
    c.log.every_steps = 50
    c.sample.num_images = 36
    c.sample.steps = 40
    return c

"""CPU demo: a small class-conditional 2-scale LapFlow on scikit-learn's handwritten digits.

    python -m lapflow_jax.main --config=configs/demo.py --workdir=workdirs/demo

The data ship inside scikit-learn (1,797 8x8 digits, upsampled to 32x32; no download). Trains
for a few minutes on 2 CPU cores, then writes Orbax checkpoints, TensorBoard events,
metrics.jsonl and samples/samples_step*.png (one column per digit, 0 to 9) plus a coarse-to-fine
strip into the workdir. Then, from the same workdir:

    python -m lapflow_jax.main --config=configs/demo.py --workdir=workdirs/demo --mode=sample
    python -m lapflow_jax.main --config=configs/demo.py --workdir=workdirs/demo --mode=eval

Patch 8 on both scales: the coarse 16x16 scale has 4 tokens and the fine 32x32 scale 16, so the
first half of sampling (coarse only) costs a quarter of the single-scale baseline's 16-token
calls, and LapFlow is the cheaper model, as in the paper (`--mode=sample` prints the ratio).
Coarse 8x8-pixel patches suit these images: the digits hold 8x8 pixels of information.
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
    c.model.patch_sizes = (8, 8)   # 16 fine + 4 coarse tokens; the baseline has 16
    c.model.conditional = True
    c.model.class_dropout = 0.1    # trains the null class that guidance needs
    c.data.name = "digits"
    c.data.image_size = 32
    c.data.channels = 1
    c.data.random_flip = False     # a mirrored digit is another glyph
    c.train.global_batch_size = 64
    c.train.num_steps = 2000
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 100
    c.train.schedule = "cosine"
    c.train.ema_decay = 0.995
    c.checkpoint.every_steps = 500
    c.log.every_steps = 200
    c.sample.num_images = 100      # ten per digit: one column per class
    c.sample.batch_size = 100
    c.sample.steps = 40
    c.sample.guidance_scale = 2.0
    c.eval.num_samples = 300     # the size of the digits' test split
    c.eval.reference_split = "test"
    c.eval.metrics = ("swd",)
    return c

"""Calibration of the 2x inversion samples before the box projection (plain projection, as the sampler
leaves them), over all pixels and over the pixels outside black input blocks; first 200 test images."""
import sys, json
import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, "/work/wt/i22")
from benchmarks.upsample import test_images, load_config
from lapflow_jax import conditional, sample as sample_lib, upsample
N, WORK = 200, "/work/notes/i23/models/lapflow2_seed0"
config = load_config(WORK); config.sample.steps = 20; config.upsample.samples_per_image = 8
setup, step, params, sigmas = sample_lib.restore_for_sampling(config, WORK)
x = sample_lib.from_uint8(test_images(N)[0]).astype(np.float64)
low = x.reshape(N, 16, 2, 16, 2, 1).mean((2, 4)).astype(np.float32)
black = np.repeat(np.repeat(low <= -1 + 1e-6, 2, 1), 2, 2)
res = {}
for name, box in (("plain_projection", False), ("box_projection", True)):
    if not box:
        orig = conditional.project_box; conditional.project_box = lambda images, low, c: images
    outs = []
    for i in range(0, N, 100):
        s, _, _ = upsample.upsample_batch(config, setup.graphdef, params, sigmas, low[i:i + 100], num_classes=setup.num_classes,
                                          rng=jax.random.key(5), first_index=i, m=1,
                                          labels=np.full((100,), setup.num_classes, np.int32))
        outs.append(s)
    if not box:
        conditional.project_box = orig
    s = np.concatenate(outs).astype(np.float64)
    def cal(mask):
        v = s.var(1, ddof=1)[mask].mean(); e = ((s.mean(1) - x) ** 2)[mask].mean()
        return {"calibration": (e - v / 8) / v, "pixel_std": float(np.sqrt(v)), "mse_mean": e}
    res[name] = {"all": cal(np.ones_like(black)), "outside_black_blocks": cal(~black), "black_blocks": cal(black),
                 "frac_outside_range": float(((s < -1) | (s > 1)).mean())}
    print(name, json.dumps(res[name]), flush=True)
open("/work/notes/i22_diag/diag4_n200.json", "w").write(json.dumps(res, indent=1))

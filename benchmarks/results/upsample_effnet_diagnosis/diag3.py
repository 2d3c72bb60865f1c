"""Is the fine scale of this model off for EfficientNet regardless of the sampler? FD of the quality
study's own guided samples (class-conditional, Heun 20, guidance 3), of real images with a little noise,
and the fine-detail power of each image set (2x: x - nearest_up(area_down(x)))."""
import sys, json
from pathlib import Path
import numpy as np
sys.path.insert(0, "/work/wt/i22")
from benchmarks.upsample import test_images
from lapflow_jax import sample as sample_lib
from lapflow_jax.evaluation import efficientnet, frechet
N = 1000
with np.load("/tmp/lapflow_upsample_cache/efficientnet_test_stats_2000.npz") as f:
    ref = f["mu"], f["sigma"]
net = efficientnet.load_efficientnet_lite0()
def fd(u8):
    mu, s = frechet.feature_stats(efficientnet.features(net, sample_lib.from_uint8(u8)))
    return float(frechet.frechet_distance(mu, s, *ref))
def detail_power(u8):
    x = sample_lib.from_uint8(u8)[..., 0].astype(np.float64)
    d = x.reshape(-1, 16, 2, 16, 2).mean((2, 4))
    return float(np.mean((x - np.repeat(np.repeat(d, 2, 1), 2, 2)) ** 2))
images, _ = test_images(N)
c2 = Path("/tmp/lapflow_upsample_cache/2x_lapflow2_seed0_step4000_n1000_k8_s20")
rows = {"real": images, "inversion_2x": np.load(c2 / "inversion.npz")["first"],
        "unconditional_null": np.load(c2 / "unconditional.npz")["images"]}
with np.load("/work/wt/i22/benchmarks/results/quality_samples_lapflow2.npz") as f:
    key = [k for k in f.files if f[k].dtype == np.uint8][0]; rows["study_guided_samples"] = f[key][:N]
rng = np.random.default_rng(0)
rows["real_plus_noise_2_levels"] = np.clip(np.rint(images + rng.normal(0, 2, images.shape)), 0, 255).astype(np.uint8)
res = {}
for name, u8 in rows.items():
    res[name] = {"detail_power": detail_power(u8)}
    if name != "real" and name != "inversion_2x" and name != "unconditional_null":
        res[name]["fd_efficientnet"] = fd(u8)
    print(name, res[name], flush=True)
Path("/work/notes/i22_diag/diag3.json").write_text(json.dumps(res, indent=1))

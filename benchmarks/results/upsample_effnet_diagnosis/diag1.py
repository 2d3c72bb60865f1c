"""EffNet FD diagnosis on the cached 2x outputs (N=1000, sample 0 of each input)."""
import sys, json, time
from pathlib import Path
import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, "/work/wt/i22")
from benchmarks.upsample import test_images
from lapflow_jax import conditional, sample as sample_lib, pyramid
from lapflow_jax.evaluation import efficientnet, frechet

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
cache = Path("/tmp/lapflow_upsample_cache")
c2 = cache / "2x_lapflow2_seed0_step4000_n1000_k8_s20"
with np.load(cache / "efficientnet_test_stats_2000.npz") as f:
    ref = f["mu"], f["sigma"]
net = efficientnet.load_efficientnet_lite0()
def fd(u8):
    mu, s = frechet.feature_stats(efficientnet.features(net, sample_lib.from_uint8(u8)))
    return float(frechet.frechet_distance(mu, s, *ref))

images, _ = test_images(N)
x = sample_lib.from_uint8(images)
low = np.asarray(pyramid.downsample(jnp.asarray(x), "area"))
bic = conditional.bicubic(low, 2)
up = np.repeat(np.repeat(low, 2, 1), 2, 2)
bic_p = bic + up - np.repeat(np.repeat(np.asarray(pyramid.downsample(jnp.asarray(bic), "area")), 2, 1), 2, 2)
inv = np.load(c2 / "inversion.npz")["first"][:N]
rep = np.load(c2 / "replacement.npz")["first"][:N]
unc = np.load(c2 / "unconditional.npz")["images"][:N]

def box_project(xf, low, f, lo=-1.0, hi=1.0, iters=60):
    """exact argmin ||z - xf|| s.t. block-mean(z) = low, lo <= z <= hi (per f x f block, bisection on the shift)."""
    b, H, W, c = xf.shape
    blk = xf.reshape(b, H // f, f, W // f, f, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, H // f, W // f, c, f * f).astype(np.float64)
    g = low[..., None].astype(np.float64)
    a = lo - blk.max(-1, keepdims=True); z = hi - blk.min(-1, keepdims=True)
    for _ in range(iters):
        mid = (a + z) / 2
        m = np.clip(blk + mid, lo, hi).mean(-1, keepdims=True)
        a = np.where(m < g, mid, a); z = np.where(m < g, z, mid)
    out = np.clip(blk + (a + z) / 2, lo, hi)
    return out.reshape(b, H // f, W // f, c, f, f).transpose(0, 1, 4, 2, 5, 3).reshape(b, H, W, c).astype(np.float32)

def blur(u8, s):
    r = np.arange(-2, 3); k = np.exp(-r**2 / (2 * s * s)); k /= k.sum()
    xf = sample_lib.from_uint8(u8)[..., 0]
    xp = np.pad(xf, ((0, 0), (2, 2), (2, 2)), mode="edge")
    y = sum(k[i] * xp[:, i:i + xf.shape[1], 2:-2] for i in range(5))
    yp = np.pad(y, ((0, 0), (0, 0), (2, 2)), mode="edge")
    y = sum(k[i] * yp[:, :, i:i + xf.shape[2]] for i in range(5))
    return sample_lib.to_uint8(y[..., None])

def cons_u8(u8):
    d = np.asarray(pyramid.downsample(jnp.asarray(sample_lib.from_uint8(u8)), "area")) - low
    return float(np.abs(d).max() * 127.5)

black = np.repeat(np.repeat(low <= -1 + 1e-6, 2, 1), 2, 2)  # pixels whose 2x2 input block is pure black
def stats(name, u8):
    bg = u8[black]
    return {"frac_nonzero_in_black_blocks": float((bg > 0).mean()), "mean_level_in_black_blocks": float(bg.mean()),
            "consistency_levels": cons_u8(u8)}

rows = {"real": sample_lib.to_uint8(x), "bicubic_projected": sample_lib.to_uint8(bic_p), "inversion": inv,
        "replacement": rep, "unconditional": unc}
rows["bicubic_projected_box"] = sample_lib.to_uint8(box_project(np.clip(bic_p, -1, 1), low, 2))
rows["inversion_box"] = sample_lib.to_uint8(box_project(sample_lib.from_uint8(inv), low, 2))
rows["replacement_box"] = sample_lib.to_uint8(box_project(sample_lib.from_uint8(rep), low, 2))
inv_f = sample_lib.from_uint8(inv)
rows["inversion_black_zeroed"] = sample_lib.to_uint8(np.where(black, -1.0, inv_f))
for s in (0.5, 0.8):
    rows[f"real_blur{s}"] = blur(rows["real"], s)
    rows[f"inversion_blur{s}"] = blur(inv, s)
bp = sample_lib.from_uint8(rows["bicubic_projected"])
for a in (0.25, 0.5, 0.75):
    rows[f"mix{a}"] = sample_lib.to_uint8(bp + a * (inv_f - bp))
res = {}
for name, u8 in rows.items():
    t = time.perf_counter()
    res[name] = {"fd_efficientnet": fd(u8), **stats(name, u8)}
    print(name, json.dumps(res[name]), f"{time.perf_counter() - t:.0f}s", flush=True)
Path(f"/work/notes/i22_diag/diag1_n{N}.json").write_text(json.dumps(res, indent=1))

"""EffNet FD vs the solver, the box projection and mean-of-k; 2x, first N test images, sample 0."""
import sys, json, time
from pathlib import Path
import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, "/work/wt/i22")
from benchmarks.upsample import test_images, load_config
from lapflow_jax import conditional, sample as sample_lib, upsample, pyramid
from lapflow_jax.evaluation import efficientnet, frechet

N = int(sys.argv[1]); WORK = "/work/notes/i23/models/lapflow2_seed0"
out_path = Path(f"/work/notes/i22_diag/diag2_n{N}.json")
res = json.loads(out_path.read_text()) if out_path.exists() else {}
with np.load("/tmp/lapflow_upsample_cache/efficientnet_test_stats_2000.npz") as f:
    ref = f["mu"], f["sigma"]
net = efficientnet.load_efficientnet_lite0()
def fd(u8):
    mu, s = frechet.feature_stats(efficientnet.features(net, sample_lib.from_uint8(u8)))
    return float(frechet.frechet_distance(mu, s, *ref))
images, _ = test_images(N)
x = sample_lib.from_uint8(images)
config = load_config(WORK)
setup, step, params, sigmas = sample_lib.restore_for_sampling(config, WORK)
constraint = conditional.Constraint(2, 1, tuple(float(s) for s in sigmas), "area", "bilinear")
low = np.asarray(constraint.down_m(jnp.asarray(x)))
black = np.repeat(np.repeat(low <= -1 + 1e-6, 2, 1), 2, 2)

def run(method, steps, k, sampler="inversion"):
    config.sample.method, config.sample.steps = method, steps
    config.upsample.samples_per_image, config.upsample.sampler, config.upsample.project_steps = k, sampler, False
    outs, nfe, t = [], None, time.perf_counter()
    for i in range(0, N, 100):
        s, _, r = upsample.upsample_batch(config, setup.graphdef, params, sigmas, low[i:i + 100], num_classes=setup.num_classes,
                                          rng=jax.random.key(5), first_index=i, m=1,
                                          labels=np.full((len(low[i:i + 100]),), setup.num_classes, np.int32))
        outs.append(s); nfe = (r.nfe_inversion, r.nfe_forward)
    return np.concatenate(outs), nfe, time.perf_counter() - t

def record(name, u8, **extra):
    if name in res: print(name, "(done)", res[name]); return
    bg = u8[black]
    res[name] = {"fd_efficientnet": fd(u8), "psnr": float(10 * np.log10(4 / np.mean((sample_lib.from_uint8(u8) - x) ** 2))),
                 "frac_nonzero_in_black_blocks": float((bg > 0).mean()),
                 "uint8_consistency_levels": conditional.uint8_consistency_levels(u8, low, constraint), **extra}
    print(name, json.dumps(res[name]), flush=True)
    out_path.write_text(json.dumps(res, indent=1))

record("real", sample_lib.to_uint8(x))
bic = conditional.bicubic(low, 2)
bp = np.asarray(constraint.project(jnp.asarray(bic), jnp.asarray(low)))
record("bicubic_projected_clip", sample_lib.to_uint8(bp))
record("bicubic_projected_box", conditional.to_uint8_consistent(conditional.project_box(bp, low, constraint), low, constraint))
for method, steps, k in (("heun", 20, 8), ("heun", 40, 1), ("heun", 80, 1), ("dopri5", 20, 1)):
    tag = f"{method}{steps if method != 'dopri5' else ''}"
    if f"inv_{tag}_box" in res: continue
    s, nfe, sec = run(method, steps, k)   # boxed floats [N, k, H, W, C]
    s0 = s[:, 0]
    record(f"inv_{tag}_box", conditional.to_uint8_consistent(s0, low, constraint), nfe=str(nfe), seconds=sec)
    if k > 1:
        # the old output: the plain projection, then the clip of to_uint8 (rebuild from the sampler's own call)
        mean = s.mean(1)
        record(f"inv_{tag}_mean_of_{k}", sample_lib.to_uint8(mean))
        np.savez_compressed(f"/work/notes/i22_diag/inv_{tag}_n{N}.npz", s=sample_lib.to_uint8(s))

"""AutoencoderKL port: numerics against diffusers' torch model, weight conversion, errors.

The reference is diffusers' own AutoencoderKL (a test-only dependency) with random weights,
saved by ``save_pretrained`` as safetensors and read back by our converter.
"""

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from lapflow_jax import autoencoder as ae  # noqa: E402

# float32 agreement with torch reached on the small configs: at most 5e-6 abs on the moments
# and on decoded images of magnitude ~3 (the full SD-VAE config, checked once outside the tests
# at 256x256: 1e-5 on the moments, 9e-5 on decoded values of magnitude ~5).
ATOL = 1e-4

SMALL = dict(
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    sample_size=32,
)
# Three levels, two resnets per level and no quant convs: the branches SMALL leaves out.
SMALL_DEEP = dict(
    block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256,
)


def _torch_vae(config: dict, seed: int):
    """diffusers AutoencoderKL with every parameter random (norm scales and biases included)."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:  # conv / linear weights keep a fan-in scale so activations stay O(1)
                fan_in = p[0].numel()
                p.copy_(noise / np.sqrt(fan_in))
    return model


def _torch_forward(model, x_nhwc: np.ndarray, z_nhwc: np.ndarray):
    with torch.no_grad():
        post = model.encode(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).latent_dist
        dec = model.decode(torch.from_numpy(z_nhwc).permute(0, 3, 1, 2)).sample
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
    return nhwc(post.mean), nhwc(post.logvar), nhwc(dec)


@nnx.jit
def _forward(model, x, z):
    mean, logvar = model.encode(x)
    return mean, logvar, model.decode(z)


def _inputs(config: dict, seed: int, batch: int = 2, size: int = 32):
    rs = np.random.RandomState(seed)
    x = rs.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    f = 2 ** (len(config["block_out_channels"]) - 1)
    z = rs.standard_normal((batch, size // f, size // f, config["latent_channels"]))
    return x, z.astype(np.float32)


def _copy_checkpoint(src: str, dst: str, *, tensors=None, config_edit=None) -> str:
    """A copy of a diffusers folder with replaced tensors and/or an edited config."""
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if config_edit:
        config_edit(config)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    if tensors is None:
        shutil.copy(os.path.join(src, ae.SAFETENSORS_NAME), dst)
    else:
        save_file(tensors, os.path.join(dst, ae.SAFETENSORS_NAME))
    return dst


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(folder, torch model) of SMALL saved with save_pretrained."""
    folder = str(tmp_path_factory.mktemp("small_vae"))
    model = _torch_vae(SMALL, seed=0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


@pytest.fixture(scope="module")
def small_loaded(small):
    model, config = ae.load_diffusers_vae(small[0])
    return model, config


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_matches_diffusers_small(small, small_loaded):
    folder, torch_model = small
    model, config = small_loaded
    assert config == ae.AutoencoderKLConfig.from_dict(SMALL)
    x, z = _inputs(SMALL, seed=1)
    ref_mean, ref_logvar, ref_dec = _torch_forward(torch_model, x, z)
    mean, logvar, dec = _forward(model, x, z)
    errs = {"mean": _max_abs(mean, ref_mean), "logvar": _max_abs(logvar, ref_logvar),
            "decode": _max_abs(dec, ref_dec)}
    print(f"\nfloat32 max abs error vs diffusers (SMALL): {errs}; output scales: "
          f"mean {np.abs(ref_mean).max():.2f}, decode {np.abs(ref_dec).max():.2f}")
    # The reference must be non-trivial for the comparison to mean anything.
    assert np.std(ref_mean) > 0.1 and np.std(ref_logvar) > 0.1 and np.std(ref_dec) > 0.1
    assert mean.shape == (2, 16, 16, 4) and dec.shape == (2, 32, 32, 3)
    for name, err in errs.items():
        assert err < ATOL, (name, err)


def test_matches_diffusers_deep_without_quant_convs(tmp_path):
    torch_model = _torch_vae(SMALL_DEEP, seed=3)
    torch_model.save_pretrained(str(tmp_path), safe_serialization=True)
    model, config = ae.load_diffusers_vae(tmp_path)
    assert model.quant_conv is None and model.post_quant_conv is None
    assert config.downsample_factor == 4
    x, z = _inputs(SMALL_DEEP, seed=4, batch=1)
    ref = _torch_forward(torch_model, x, z)
    out = _forward(model, x, z)
    errs = [_max_abs(a, b) for a, b in zip(out, ref)]
    print(f"\nfloat32 max abs error vs diffusers (SMALL_DEEP): {errs}")
    assert max(errs) < ATOL, errs


def test_latent_helpers(small_loaded):
    model, config = small_loaded
    x, _ = _inputs(SMALL, seed=5)
    key = jax.random.key(7)

    @nnx.jit
    def run(model, x, key):
        z = model.to_latent(x, key)
        return z, model.from_latent(z)

    z, x_hat = run(model, x, key)
    # The same shapes as in the other tests, so _forward is not compiled again.
    mean, logvar, x_ref = _forward(model, x, z / config.scaling_factor)
    np.testing.assert_allclose(x_hat, x_ref, rtol=1e-5, atol=1e-5)
    assert x_hat.shape == x.shape and x_hat.dtype == jnp.float32
    # to_latent = scaling_factor * (mean + exp(logvar / 2) * N(0, I)): the implied noise must
    # be a standard normal draw (2048 values), fixed by the key.
    noise = (np.asarray(z) / config.scaling_factor - mean) / np.exp(0.5 * np.asarray(logvar))
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1.0) < 0.1, (noise.mean(), noise.std())
    np.testing.assert_array_equal(run(model, x, key)[0], z)
    assert _max_abs(run(model, x, jax.random.key(8))[0], z) > 1e-3


def test_old_attention_names_load_the_same(small, small_loaded, tmp_path):
    folder, _ = small
    tensors = load_file(os.path.join(folder, ae.SAFETENSORS_NAME))
    old = {}
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for k, v in tensors.items():
        for new, legacy in renames.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".attentions.0.{new}.", f".attentions.0.{legacy}.")
                # Some LDM-era conversions store the projections as 1x1 convolutions.
                if legacy == "key" and v.ndim == 2:
                    v = v[:, :, None, None]
        old[k] = v
    assert any(".proj_attn." in k for k in old) and not any(".to_q." in k for k in old)
    legacy_folder = _copy_checkpoint(folder, str(tmp_path / "legacy"), tensors=old)
    legacy_model, _ = ae.load_diffusers_vae(legacy_folder)
    got = jax.tree.leaves(nnx.to_pure_dict(nnx.state(legacy_model)))
    want = jax.tree.leaves(nnx.to_pure_dict(nnx.state(small_loaded[0])))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_converted_round_trip_is_identical(small_loaded, tmp_path):
    model, config = small_loaded
    ae.save_converted(model, config, tmp_path / "conv")
    loaded, loaded_config = ae.load_converted(tmp_path / "conv")
    assert loaded_config == config
    x, z = _inputs(SMALL, seed=6)
    for a, b in zip(_forward(model, x, z), _forward(loaded, x, z)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ae.save_converted(model, config, tmp_path / "conv")
    with pytest.raises(FileNotFoundError, match="save_converted"):
        ae.load_converted(tmp_path / "nothing_here")


def test_bfloat16_compute_close_to_float32(small, small_loaded):
    model32, _ = small_loaded
    model16, _ = ae.load_diffusers_vae(small[0], dtype=jnp.bfloat16)
    params16 = jax.tree.leaves(nnx.state(model16))
    assert all(p.dtype == jnp.float32 for p in params16)
    x, z = _inputs(SMALL, seed=8)
    out32 = _forward(model32, x, z)
    out16 = _forward(model16, x, z)
    rel = [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(out16, out32)]
    print(f"\nbfloat16 relative error (mean, logvar, decode): {rel}")
    assert all(o.dtype == jnp.float32 for o in out16)
    assert max(rel) < 2e-2, rel
    assert max(rel) > 0  # bf16 really ran in bf16


@pytest.mark.slow
def test_sd_vae_config_round_trip_of_a_photo(tmp_path):
    """Full SD-VAE architecture (84M params, random weights): astronaut 256x256 on the CPU."""
    from skimage import data, transform

    torch_model = _torch_vae(SD_VAE, seed=11)
    torch_model.save_pretrained(str(tmp_path), safe_serialization=True)
    del torch_model
    start = time.perf_counter()
    model, config = ae.load_diffusers_vae(tmp_path)
    load_s = time.perf_counter() - start
    assert config == ae.AutoencoderKLConfig()  # the defaults are SD-VAE's
    photo = transform.resize(data.astronaut(), (256, 256), anti_aliasing=True)
    x = (photo[None] * 2.0 - 1.0).astype(np.float32)

    graphdef, state = nnx.split(model)

    @jax.jit
    def round_trip(state, x, key):
        model = nnx.merge(graphdef, state)
        z = model.to_latent(x, key)
        return z, model.from_latent(z)

    start = time.perf_counter()
    compiled = round_trip.lower(state, x, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    z, x_hat = jax.block_until_ready(compiled(state, x, jax.random.key(0)))
    run_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gflop = float(cost.get("flops", float("nan"))) / 1e9
    print(f"\nSD-VAE config on CPU: load {load_s:.1f} s, compile {compile_s:.1f} s, "
          f"encode->decode of 256x256 {run_s:.1f} s ({gflop:.0f} GFLOP, "
          f"{gflop / run_s:.0f} GFLOP/s)")
    assert z.shape == (1, 32, 32, 4) and x_hat.shape == (1, 256, 256, 3)
    assert bool(jnp.all(jnp.isfinite(x_hat))) and float(jnp.std(x_hat)) > 1e-3


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_missing_weights_file(small, tmp_path):
    folder = str(tmp_path / "no_weights")
    os.makedirs(folder)
    shutil.copy(os.path.join(small[0], "config.json"), folder)
    expected = r"no_weights.*diffusion_pytorch_model\.safetensors"
    with pytest.raises(FileNotFoundError, match=expected):
        ae.load_diffusers_vae(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ae.load_diffusers_vae(tmp_path / "does_not_exist")


def test_missing_key(small, tmp_path):
    tensors = load_file(os.path.join(small[0], ae.SAFETENSORS_NAME))
    del tensors["decoder.conv_out.bias"]
    folder = _copy_checkpoint(small[0], str(tmp_path / "ck"), tensors=tensors)
    with pytest.raises(ValueError, match=r"1 missing keys: decoder\.conv_out\.bias") as err:
        ae.load_diffusers_vae(folder)
    assert ae.SAFETENSORS_NAME in str(err.value)


def test_unexpected_key(small, tmp_path):
    tensors = load_file(os.path.join(small[0], ae.SAFETENSORS_NAME))
    tensors["encoder.extra_layer.weight"] = np.zeros((3,), np.float32)
    folder = _copy_checkpoint(small[0], str(tmp_path / "ck"), tensors=tensors)
    with pytest.raises(ValueError, match=r"1 unexpected keys: encoder\.extra_layer\.weight"):
        ae.load_diffusers_vae(folder)


def test_unsupported_block_type(small, tmp_path):
    def edit(config):
        config["down_block_types"][0] = "AttnDownEncoderBlock2D"

    folder = _copy_checkpoint(small[0], str(tmp_path / "ck"), config_edit=edit)
    with pytest.raises(ValueError, match=r"config\.json.*unsupported down_block_types "
                                         r"\['AttnDownEncoderBlock2D'\]"):
        ae.load_diffusers_vae(folder)


def test_wrong_architecture(small, tmp_path):
    def more_latents(config):
        config["latent_channels"] = 16

    folder = _copy_checkpoint(small[0], str(tmp_path / "ck"), config_edit=more_latents)
    with pytest.raises(ValueError, match=r"shape mismatches: .*encoder\.conv_out\.weight"):
        ae.load_diffusers_vae(folder)

    def other_class(config):
        config["_class_name"] = "AutoencoderTiny"

    folder = _copy_checkpoint(small[0], str(tmp_path / "ck2"), config_edit=other_class)
    with pytest.raises(ValueError, match="AutoencoderTiny"):
        ae.load_diffusers_vae(folder)


def test_config_errors(small, tmp_path):
    path = os.path.join(small[0], "config.json")
    with open(path) as f:
        raw = json.load(f)
    d = dict(raw)
    del d["layers_per_block"]
    with pytest.raises(ValueError, match=r"my\.json: missing required .*layers_per_block"):
        ae.AutoencoderKLConfig.from_dict(d, source="my.json")
    with pytest.raises(ValueError, match="does not divide"):
        ae.AutoencoderKLConfig.from_dict(dict(raw, norm_num_groups=24))
    # diffusers' own defaults fill optional fields (early SD-VAE configs lack scaling_factor).
    d = {k: raw[k] for k in ("block_out_channels", "layers_per_block", "latent_channels",
                             "down_block_types", "up_block_types", "norm_num_groups")}
    assert ae.AutoencoderKLConfig.from_dict(d).scaling_factor == 0.18215
    # to_dict / from_dict round trip
    config = ae.AutoencoderKLConfig.from_dict(raw)
    assert ae.AutoencoderKLConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_bad_input_shapes(small_loaded):
    model, _ = small_loaded
    with pytest.raises(ValueError, match=r"x must be \(B, H, W, 3\)"):
        model.encode(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="divisible by 2"):
        model.encode(jnp.zeros((1, 31, 32, 3)))
    with pytest.raises(ValueError, match=r"z must be \(B, H, W, 4\)"):
        model.decode(jnp.zeros((1, 16, 16, 8)))

"""The upsample mode in latent mode (upsample.py; pixel mode's tests are in test_conditional.py).

A tiny random AutoencoderKL (f = 2, as tests/test_latents.py's, with a shift and a scaling factor
that are not 0 and 1 so that a wrong normalisation shows) and a tiny random LapFlow on its 8x8x4
latents (2 scales): 8x8 RGB inputs, 2x to 16x16. Random weights: the
constraints and the encode path do not need a trained model.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from lapflow_jax import autoencoder as ae
from lapflow_jax import conditional, latents, train, upsample
from lapflow_jax.data import latents as latents_data
from test_config import one_device_mesh
from test_latents import TINY_AE
from test_train import tiny_config

SIGMAS = (0.3, 0.9)  # per-scale normalisation of the latent pyramid (finest first)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(config, setup, params) of a latent-mode LapFlow beside a converted tiny autoencoder."""
    root = tmp_path_factory.mktemp("upsample_latent")
    ae_config = ae.AutoencoderKLConfig(**TINY_AE, scaling_factor=0.5, shift_factor=0.1)
    ae.save_converted(ae.AutoencoderKL(ae_config, seed=0), ae_config, root / "ae")
    config = tiny_config(**{
        "latent.enabled": True, "data.name": "latents", "latent.shape": (8, 8, 4),
        "latent.autoencoder": str(root / "ae"), "latent.encode_batch_size": 2, "pyramid.sigmas": SIGMAS,
        "upsample.samples_per_image": 2, "upsample.batch_size": 2, "sample.steps": 4,
        "latent.source.name": "demo_photos", "latent.source.image_size": 16, "latent.source.channels": 3})
    setup = train.make_setup(config, one_device_mesh(), dataset_classes=10)
    params = train.create_state(setup, np.asarray(SIGMAS, np.float32)).params
    # Random normal parameters: the initial model's zero-initialised output layer gives velocity 0
    # (and demo_run's sin pattern a fine field that ignores the coarse scale): both samplers would
    # then give the same output.
    leaves, treedef = jax.tree.flatten(params)
    params = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(jax.random.key(i), a.shape, a.dtype)
                                          for i, a in enumerate(leaves)])
    return config, setup, params


def low_inputs(n=3, seed=0):
    """uint8 [n, 8, 8, 3] with black and white pixels among them (there the clip to [0, 255] bites)."""
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([0, 0, 1, 60, 128, 200, 254, 255, 255], np.uint8), (n, 8, 8, 3))


@pytest.mark.parametrize("sampler,variation_t0", [("inversion", 0.0), ("replacement", 0.0), ("inversion", 0.95)])
def test_latent_constraint_holds_on_the_latents_coarse_scale(model, sampler, variation_t0):
    """max |Down(latent out) - y| <= 1e-5, y the Down of the input's latent, for both samplers and for
    variations (full-size inputs, their latent's coarse scale kept; from t0 = 0.95 the output stays
    near the input's latent: its distance relative to the latent's fine detail is small; the random
    model's large velocity moves it some way even over [0.95, 1])."""
    config, setup, params = model
    config = config.copy_and_resolve_references()
    config.upsample.sampler, config.upsample.variation_t0 = sampler, variation_t0
    inputs = low_inputs(2)
    if variation_t0:
        inputs = np.repeat(np.repeat(inputs, 2, 1), 2, 2)
    out = upsample.latent_upsample_batch(config, setup.graphdef, params, SIGMAS, inputs,
                                         num_classes=setup.num_classes, rng=jax.random.key(0), first_index=0, m=1)
    assert out.result.images.shape == (4, 8, 8, 4) and out.latent_low.shape == (2, 4, 4, 4)
    assert out.samples.shape == out.decoded.shape == (2, 2, 16, 16, 3) and out.low.shape == (2, 8, 8, 3)
    constraint = upsample.model_constraint(config, SIGMAS, 1)
    err = conditional.consistency_error(out.result.images, np.repeat(out.latent_low, 2, 0), constraint)
    print(f"{sampler}: latent max |Down(out) - y| = {err:.2e} (|y| up to {np.abs(out.latent_low).max():.2f})")
    assert err <= 1e-5, err
    if variation_t0:
        _, z = upsample.latent_inputs(config, inputs, 1)
        z = np.repeat(np.asarray(z), 2, 0)
        detail = z - np.asarray(constraint.image([np.zeros_like(z), *constraint.known(constraint.down_m(z))]))
        dist = float(np.linalg.norm(np.asarray(out.result.images) - z) / np.linalg.norm(detail))
        print(f"variation from t0 = {variation_t0}: distance to the input's latent / its fine detail = {dist:.3f}")
        assert dist < 0.8, dist  # 0.40 measured; 3.39 when the sampler ignores the reference (a fresh draw)


def test_latent_mode_reports_pixel_consistency_and_writes_consistent_uint8(model, tmp_path):
    """upsample_to_dir in latent mode: the latent constraint is exact, the decoded pixels' error is
    reported (and is not 0: the decoder is not the encoder's inverse), and with project_decoded
    the written uint8 files' 2x2 means are the uint8 inputs exactly; without it they are not."""
    config, setup, params = model
    inputs = low_inputs(3)
    np.savez(tmp_path / "low.npz", images=inputs)
    config = config.copy_and_resolve_references()
    config.upsample.input = str(tmp_path / "low.npz")
    summaries, files = {}, {}
    for project in (True, False):
        config.upsample.project_decoded = project
        out = tmp_path / f"out_{project}"
        summaries[project] = upsample.upsample_to_dir(config, setup, params, SIGMAS, out, seed=1)
        files[project] = dict(np.load(out / "upsampled.npz"))
        print(project, summaries[project])
    on, off = summaries[True], summaries[False]
    assert on["latent"] and on["max_latent_consistency_error"] <= 1e-5, on
    # Same seed, same samples: the decoded images' error does not depend on the pixel projection.
    assert on["max_decoded_consistency_error"] == off["max_decoded_consistency_error"]
    assert 0 < on["mean_decoded_consistency_error"] <= on["max_decoded_consistency_error"] < np.inf, on
    assert on["max_consistency_error"] <= 1e-5 and on["max_consistency_error_uint8_levels"] == 0.0, on
    assert off["max_consistency_error"] == pytest.approx(off["max_decoded_consistency_error"], rel=1e-5)
    for project, arrays in files.items():
        assert arrays["samples"].shape == (3, 2, 16, 16, 3) and arrays["inputs"].shape == (3, 8, 8, 3)
        assert np.array_equal(arrays["inputs"], inputs)
        down = arrays["samples"].astype(np.float64).reshape(3, 2, 8, 2, 8, 2, 3).mean((3, 5))
        miss = np.abs(down - inputs[:, None]).max()
        print(f"project_decoded={project}: uint8 files max |Down(output) - input| = {miss} levels")
        assert (miss == 0.0) if project else (miss > 1.0), miss


def test_input_latent_is_normalised_as_training_latents(model):
    """The known value y is the Down of the latent the training pipeline gives the same image: the
    cache's encoder (latents.py, on uint8 levels) for the posterior moments, then
    data/latents.py's SampleLatent with std = 0 (the mean of its draws) for shift and scaling.
    Super-resolution: the image is the clipped bicubic of the input; variations: the input itself."""
    config, setup, params = model
    config = config.copy_and_resolve_references()
    inputs = low_inputs(2, seed=1)
    graphdef, state, ae_config = latents._autoencoder(*latents._decoder_key(config)[:2])
    cache_encode, _ = latents._make_encoder(nnx.merge(graphdef, state), flip=False, store_dtype="float32", batch=2)
    info = {"variants": ["center"], "scaling_factor": ae_config.scaling_factor, "shift_factor": ae_config.shift_factor}
    normalise = latents_data.SampleLatent(num_records=2, info=info, random_flip=False, use_labels=False, seed=0)

    def training_latents(levels):  # float uint8 levels [B, 16, 16, 3] -> [B, 8, 8, 4]
        mean, std = (np.asarray(a) for a in cache_encode(np.asarray(levels, np.float32)))
        return np.stack([normalise.map_with_index(i, {"mean": mean[i], "std": 0 * std[i], "label": 0})["image"]
                         for i in range(len(levels))])

    constraint = upsample.model_constraint(config, SIGMAS, 1)
    bicubic = np.clip(conditional.bicubic(inputs / 127.5 - 1.0, 2), -1, 1)
    for variation, images, levels in ((0.0, inputs, (bicubic + 1) * 127.5),
                                      (0.5, np.repeat(np.repeat(inputs, 2, 1), 2, 2), None)):
        config.upsample.variation_t0 = variation
        levels = images.astype(np.float32) if levels is None else levels
        low, z = upsample.latent_inputs(config, images, 1)
        expect = training_latents(levels)
        err = float(np.abs(np.asarray(constraint.down_m(z)) - np.asarray(constraint.down_m(expect))).max())
        print(f"variation_t0={variation}: max |y - Down(training latent)| = {err:.2e} "
              f"(|y| up to {np.abs(np.asarray(constraint.down_m(expect))).max():.2f})")
        assert err <= 1e-4, err
        assert np.abs(np.asarray(low) - inputs / 127.5 + 1.0).max() <= 1e-6


def test_latent_split_inputs_come_from_the_pixel_source(model):
    """config.upsample.split in latent mode reads the pixel dataset config.latent.source (config.data
    holds latents, not images) and downsamples it with the model's Down (area: 2x2 mean)."""
    config, _, _ = model
    config = config.copy_and_resolve_references()
    config.upsample.num_images = 3
    low, names, originals = upsample.split_inputs(config, "test")
    assert originals.shape == (3, 16, 16, 3) and low.shape == (3, 8, 8, 3) and names[0] == "test00000"
    expect = originals.astype(np.float64).reshape(3, 8, 2, 8, 2, 3).mean((2, 4))
    assert np.abs(low - expect).max() <= 0.5 + 1e-3, np.abs(low - expect).max()

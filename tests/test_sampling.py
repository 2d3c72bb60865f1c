"""The sample mode: batched, resumable by index, sharded over devices, previews, NFE and GFLOPs; the
split of the sampler's steps over segments; guidance refuses a model without a null class."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lapflow_jax import config as config_lib
from lapflow_jax import generate, parallel, sample, sampling, train
from lapflow_jax.models import build_model
from lapflow_jax.paths import MultiScalePath


def tiny_config(**overrides):
    """A 2-scale, 32-wide, 1-block model on 16x16 RGB (no data is read: sigmas are given)."""
    c = config_lib.base_config()
    c.model.hidden_size, c.model.depth, c.model.num_heads = 32, 1, 2
    c.model.patch_sizes = (2, 2)
    c.model.conditional = True          # demo_photos has labels: a class-conditional model
    c.pyramid.sigmas = (0.3, 1.0)
    c.data.image_size = 16
    c.train.global_batch_size = 4
    c.sample.method = "euler"
    c.sample.steps = 4
    c.sample.batch_size = 2
    c.sample.previews = True
    c.sample.gflops = False
    c.mesh_shape = (1, 1)
    c.update_from_flattened_dict(overrides)
    return c


def _setup_and_params(config, devices):
    setup = train.make_setup(config, parallel.make_mesh(config.mesh_shape, devices))

    @jax.jit  # one program (eagerly, every parameter shape compiles its own ops); no optimizer state
    def init():
        model = build_model(config, image_shape=setup.image_shape, num_classes=setup.num_classes, rngs=nnx.Rngs(0))
        leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(nnx.state(model)))
        # DiT zero-initialises adaLN and the output layer (velocity 0); fill them with a cheap
        # deterministic pattern so sampling integrates a non-trivial field.
        leaves = [jnp.where(x == 0, 0.05 * jnp.sin(1.7 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) + i), x)
                  for i, x in enumerate(leaves)]
        return jax.tree.unflatten(treedef, leaves)

    return setup, init(), np.asarray(config.pyramid.sigmas, np.float32)


@pytest.fixture(scope="module")
def single():
    config = tiny_config()
    setup, params, sigmas = _setup_and_params(config, jax.devices()[:1])
    return config, setup, params, sigmas


def test_resume_by_index_reproduces_the_uninterrupted_run(single, tmp_path, monkeypatch):
    config, setup, params, sigmas = single
    summary = sample.generate_to_dir(config, setup, params, sigmas, tmp_path, num_images=5, previews=True, seed=3)
    first = np.load(tmp_path / "samples.npz")
    assert first["images"].shape == (5, 16, 16, 3) and first["images"].dtype == np.uint8
    # Balanced classes: image i has class i mod num_classes, across batch boundaries.
    np.testing.assert_array_equal(first["labels"], np.arange(5) % setup.num_classes)
    assert summary["nfe_per_segment"] == [2.0, 2.0] and summary["nfe_total"] == 4.0
    assert sorted(p.name for p in tmp_path.glob("batch*.npz")) == ["batch00000.npz", "batch00001.npz",
                                                                    "batch00002.npz"]
    for name in ("grid.png", "coarse_to_fine.png", "summary.json", "settings.json"):
        assert (tmp_path / name).exists(), name

    # Previews: one per segment end; the last is the sample itself, the first (coarse scale
    # only) is not.
    part = np.load(tmp_path / "batch00000.npz")
    assert part["previews"].shape == (2, 2, 16, 16, 3)
    np.testing.assert_array_equal(part["previews"][-1], part["images"])
    assert np.abs(part["previews"][0].astype(float) - part["images"]).mean() > 1.0

    # Lose one batch and the merged file: a rerun makes only that batch, bit-identically.
    (tmp_path / "batch00001.npz").unlink()
    (tmp_path / "samples.npz").unlink()
    calls = []
    real = generate.generate
    monkeypatch.setattr(generate, "generate", lambda *a, **k: calls.append(k["first_index"]) or real(*a, **k))
    sample.generate_to_dir(config, setup, params, sigmas, tmp_path, num_images=5, previews=True, seed=3)
    assert calls == [2]
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["images"], first["images"])

    # Other settings must not be mixed into the same directory.
    with pytest.raises(ValueError, match="sample.steps: earlier 4, now 6"):
        sample.generate_to_dir(tiny_config(**{"sample.steps": 6}), setup, params, sigmas, tmp_path, num_images=5,
                               previews=True, seed=3)


def test_sharded_over_devices_matches_one_device(single):
    config, setup, params, sigmas = single
    config2 = tiny_config(**{"mesh_shape": (2, 1), "sample.batch_size": 4})
    setup2 = train.make_setup(config2, parallel.make_mesh((2, 1), jax.devices()[:2]))
    params2 = jax.device_put(params, parallel.named(setup2.mesh, setup2.param_specs))
    rng = jax.random.key(5)
    one = generate.generate(config2, setup.graphdef, params, sigmas, image_shape=setup.image_shape,
                            num_classes=setup.num_classes, rng=rng, batch=4)
    two = generate.generate(config2, setup2.graphdef, params2, sigmas, image_shape=setup.image_shape,
                            num_classes=setup.num_classes, rng=rng, batch=4, mesh=setup2.mesh)
    assert np.abs(one.images).mean() > 0.05
    np.testing.assert_allclose(two.images, one.images, atol=1e-5)
    with pytest.raises(ValueError, match="config.sample.batch_size"):
        generate.generate(config2, setup2.graphdef, params2, sigmas, image_shape=setup.image_shape,
                          num_classes=setup.num_classes, rng=rng, batch=3, mesh=setup2.mesh)


@pytest.mark.slow  # diffrax's dopri5 compiles slowly on CPU: ~30 s on its own
def test_guidance_and_dopri5_report_their_cost(single, tmp_path):
    config, setup, params, sigmas = single
    cfg = tiny_config(**{"sample.method": "dopri5", "sample.guidance_scale": 2.0, "sample.gflops": True,
                         "sample.previews": False})
    summary = sample.generate_to_dir(cfg, setup, params, sigmas, tmp_path, num_images=2, previews=False, seed=0)
    nfe = summary["nfe_per_segment"]
    # Dopri5: 1 + 6 per step, at least one step per segment.
    assert len(nfe) == 2 and all(n >= 7 and (n - 1) % 6 == 0 for n in nfe), nfe
    gflops = summary["gflops"]
    assert gflops["nfe_per_segment"] == [int(n) for n in nfe]
    assert gflops["gflops_per_sample"] == pytest.approx(
        sum(n * g for n, g in zip(gflops["nfe_per_segment"], gflops["gflops_per_call_per_segment"])))
    assert gflops["baseline_over_lapflow"] > 1.0
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == "dopri5"


@pytest.mark.parametrize("starts", [(0.0,), (0.5, 0.0), (2 / 3, 1 / 3, 0.0), (0.1, 0.0), (0.9, 0.0),
                                    (0.99, 0.5, 0.0), (0.75, 0.5, 0.25, 0.0), (0.97, 0.9, 0.02, 0.0)])
def test_steps_per_segment_sum_to_the_requested_total(starts):
    """Largest-remainder rounding: exactly the total, every segment >= 1, each share within one
    step of its exact proportion (plus one per segment shorter than a step, lifted to 1)."""
    path = MultiScalePath(starts)
    lengths = [t1 - t0 for t0, t1, _ in path.segments()]
    for total in range(len(starts), 400):
        steps = sampling.steps_per_segment(path, total)
        assert sum(steps) == total and min(steps) >= 1, (total, steps)
        quotas = [total * length for length in lengths]
        slack = 1 + sum(q < 1 for q in quotas)
        assert all(abs(n - q) < slack for n, q in zip(steps, quotas)), (total, steps, quotas)
    with pytest.raises(ValueError, match="config.sample.steps must be >= "):
        sampling.steps_per_segment(path, len(starts) - 1)


def test_steps_per_segment_known_splits():
    three = MultiScalePath((2 / 3, 1 / 3, 0.0))
    assert sampling.steps_per_segment(three, 50) == (17, 17, 16)   # rounding each share gave 51
    assert sampling.steps_per_segment(three, 100) == (34, 33, 33)
    assert sampling.steps_per_segment(MultiScalePath((0.5, 0.0)), 40) == (20, 20)
    assert sampling.steps_per_segment(MultiScalePath((0.99, 0.0)), 10) == (9, 1)  # 9.9 + 0.1, lifted


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_guidance_needs_the_null_class_row(dropout):
    """Behind the config check: a guided velocity on a model without a null-class row (trained with
    class_dropout 0) is refused while tracing, instead of JAX clamping the index to a real class."""
    from lapflow_jax.models import mot

    model = nnx.eval_shape(lambda: mot.MoT(image_shape=(8, 8, 1), num_scales=2, patch_sizes=(2, 2), hidden_size=16,
                                           depth=1, num_heads=2, num_classes=3, class_dropout=dropout,
                                           rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)  # abstract: nothing is computed or compiled
    fn = sampling.guided_velocity_fn(graphdef, 2.0, model.null_class)
    states, t, labels = [jnp.ones((2, 4, 4, 1))], jnp.full((2,), 0.25), jnp.array([0, 2])
    if dropout:
        assert jax.eval_shape(fn, (state, labels), states, t)[0].shape == (2, 4, 4, 1)
    else:
        with pytest.raises(ValueError, match="guidance needs the null class 3, but the model's class embedding has 3"):
            jax.eval_shape(fn, (state, labels), states, t)


# --- dopri5 across window starts -----------------------------------------------------------------

def toy_velocity(args, states, t):
    """A nonlinear, time-varying field on every active scale (cheap; adaptive steps vary along t)."""
    tt = t[:, None, None, None]
    return [args * jnp.sin(6 * tt) * x + jnp.cos(2 * x) * (1 + 3 * tt ** 2) for x in states]


TOY_PATH = MultiScalePath((2 / 3, 1 / 3, 0.0), "global")
TOY_IMAGE = sampling.image_fn((0.3, 0.5, 1.0), "bilinear")


def toy_noise(batch, seed=0):
    return [jax.random.normal(jax.random.key(seed + k), (batch, 16 >> k, 16 >> k, 1)) for k in range(3)]


def toy_sample(noise, options, tol=1e-5, **kwargs):
    return sampling.sample(toy_velocity, jnp.float32(2.0), TOY_PATH, noise, method="dopri5", steps=30, rtol=tol,
                           atol=tol, dopri5=options, to_image=TOY_IMAGE, **kwargs)


def test_dopri5_without_the_changes_is_diffrax_step_for_step():
    noise = toy_noise(4)
    ours = toy_sample(noise, sampling.DOPRI5_RESTART)
    states, nfe = [], []
    for t0, t1, finest in TOY_PATH.segments():
        states = [TOY_PATH.entry_noise_scale(finest) * noise[finest]] + states
        states, n = sampling._dopri5_segment_diffrax(toy_velocity, jnp.float32(2.0), states, t0, t1, 1e-5, 1e-5,
                                                     initial_steps=10)
        nfe.append(int(n))
    assert ours.nfe_per_segment == tuple(nfe) == (19, 37, 37)
    for a, b in zip(ours.residuals, states):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_window_start_does_not_reset_the_step_size():
    noise = toy_noise(4)
    carried = toy_sample(noise, sampling.Dopri5Options())
    cold = toy_sample(noise, sampling.Dopri5Options(carry_step=False))
    lengths = [t1 - t0 for t0, t1, _ in TOY_PATH.segments()]
    # The step each segment starts with, per sample: the first segment's is the cold start; after a
    # window start it is the step the previous segment ended with, not (segment length) / 10 again.
    for seg, length in zip(carried.dopri5_stats, lengths):
        assert seg["h_start"].shape == (4,)
    np.testing.assert_allclose(carried.dopri5_stats[0]["h_start"], lengths[0] / 10, rtol=1e-6)
    for i in (1, 2):
        np.testing.assert_allclose(cold.dopri5_stats[i]["h_start"], lengths[i] / 10, rtol=1e-6)
        assert carried.dopri5_stats[i]["h_start"].min() > 3 * lengths[i] / 10
    # ...and it is the step the previous segment handed over: rerun segment 0 alone and read it.
    t0, t1, finest = TOY_PATH.segments()[0]
    _, h_out, _ = sampling._dopri5_segment(toy_velocity, jnp.float32(2.0), [noise[2]], t0, t1,
                                           jnp.full((4,), lengths[0] / 10), 1e-5, 1e-5,
                                           options=sampling.Dopri5Options(), to_image=TOY_IMAGE, num_absent=2)
    np.testing.assert_array_equal(carried.dopri5_stats[1]["h_start"], np.asarray(h_out))
    # The step actually used after the boundary is that one: no ramp-up, so the carried solve
    # needs fewer evaluations after each window start.
    for i in (1, 2):
        assert carried.dopri5_stats[i]["nfe"].mean() < cold.dopri5_stats[i]["nfe"].mean()
        assert carried.dopri5_stats[i]["accepted"].mean() < cold.dopri5_stats[i]["accepted"].mean()


@pytest.mark.parametrize("options", [sampling.Dopri5Options(), sampling.Dopri5Options(per_sample=False),
                                     sampling.DOPRI5_RESTART], ids=["carried", "batch_norm", "restart"])
def test_dopri5_matches_a_tight_fixed_step_solve(options):
    noise = toy_noise(4)
    exact = sampling.sample(toy_velocity, jnp.float32(2.0), TOY_PATH, noise, method="heun", steps=3000)
    for tol, bound in ((1e-5, 2e-4), (1e-7, 2e-5)):
        out = toy_sample(noise, options, tol=tol)
        err = max(float(jnp.abs(a - b).max()) for a, b in zip(out.residuals, exact.residuals))
        assert err < bound, (tol, err)


def test_per_sample_steps_do_not_couple_samples():
    big, small = toy_noise(16), None
    small = [x[:4] for x in big]
    out16 = toy_sample(big, sampling.Dopri5Options())
    out4 = toy_sample(small, sampling.Dopri5Options())
    # The same steps and the same values, bit for bit: the toy field is batch-invariant, and so is
    # the solver (its error norm is computed row by row; vectorised over the batch, XLA's
    # reconstruction dots round a row's norm differently at batch 4 and 16, and samples then
    # differ by ~5e-7).
    for a, b in zip(out4.dopri5_stats, out16.dopri5_stats):
        for key in ("nfe", "accepted", "rejected", "accepted_t", "h_start"):
            np.testing.assert_array_equal(a[key], b[key][:4])
    per_sample = max(float(jnp.abs(a - b[:4]).max()) for a, b in zip(out4.residuals, out16.residuals))
    # One step size for the batch couples them: the same first four samples change with batch-mates.
    shared16 = toy_sample(big, sampling.Dopri5Options(per_sample=False))
    shared4 = toy_sample(small, sampling.Dopri5Options(per_sample=False))
    shared = max(float(jnp.abs(a - b[:4]).max()) for a, b in zip(shared4.residuals, shared16.residuals))
    assert per_sample == 0 and shared > 1e-5, (per_sample, shared)
    # What the batch pays is what its slowest sample needs.
    assert out16.nfe_per_segment == tuple(int(s["nfe"].max()) for s in out16.dopri5_stats)


THREE_SCALES = {"num_scales": 3, "model.patch_sizes": (2, 2, 2), "pyramid.sigmas": (0.3, 0.5, 1.0),
                "window_starts": (2 / 3, 1 / 3, 0.0), "model.hidden_size": 64, "model.num_heads": 4,
                "sample.method": "dopri5", "sample.previews": False}


def test_dopri5_sample_i_is_the_same_bits_at_sample_batch_4_and_16():
    """Through the sample mode's generate, 3 scales, guided: with config.sample.rows_per_call the
    first four samples of a batch of 16 are bit-identical to a batch of 4. Without it they are not
    (XLA's CPU dots round a row differently at another batch size: ~5e-7 here), and the solver
    alone (its per-sample steps and row-by-row norm) is checked bit for bit on a batch-invariant
    field in test_per_sample_steps_do_not_couple_samples."""
    made = {}
    for rows in (0, 4):
        config = tiny_config(**THREE_SCALES, **{"sample.rows_per_call": rows, "sample.guidance_scale": 2.0,
                                                "model.class_dropout": 0.1, "sample.batch_size": 16})
        setup, params, sigmas = _setup_and_params(config, jax.devices()[:1])
        for batch in (4, 16):
            made[rows, batch] = np.asarray(generate.generate(
                config, setup.graphdef, params, sigmas, image_shape=setup.image_shape,
                num_classes=setup.num_classes, rng=jax.random.key(7), batch=batch).images)
    assert np.abs(made[4, 4]).mean() > 0.05
    np.testing.assert_array_equal(made[4, 4], made[4, 16][:4])
    # The chunked batch is the same field: equal to the one-call batch to float rounding.
    np.testing.assert_allclose(made[4, 16], made[0, 16], atol=1e-5)
    assert np.abs(made[0, 4] - made[0, 16][:4]).max() > 0, "one call per batch is batch-invariant here: " \
        "the test no longer shows what rows_per_call is for"


def test_sample_mode_with_rows_per_call_counts_its_gflops(tmp_path):
    """The sample mode with chunked calls: its GFLOPs count (one-sample calls) ignores the chunking."""
    config = tiny_config(**{"sample.rows_per_call": 2, "sample.gflops": True, "sample.previews": False})
    setup, params, sigmas = _setup_and_params(config, jax.devices()[:1])
    summary = sample.generate_to_dir(config, setup, params, sigmas, tmp_path, num_images=2, previews=False, seed=0)
    assert summary["gflops"]["gflops_per_sample"] > 0


def test_chunked_velocity_on_a_mesh_equals_one_device():
    config = tiny_config(**THREE_SCALES, **{"sample.rows_per_call": 2, "sample.batch_size": 8,
                                            "train.global_batch_size": 6})
    setup, params, sigmas = _setup_and_params(config, jax.devices()[:1])
    config.mesh_shape = (2, 1)
    setup2 = train.make_setup(config, parallel.make_mesh((2, 1), jax.devices()[:2]))
    params2 = jax.device_put(params, parallel.named(setup2.mesh, setup2.param_specs))
    kwargs = dict(image_shape=setup.image_shape, num_classes=setup.num_classes, rng=jax.random.key(5), batch=8)
    one = generate.generate(config, setup.graphdef, params, sigmas, **kwargs)
    two = generate.generate(config, setup2.graphdef, params2, sigmas, mesh=setup2.mesh, **kwargs)
    np.testing.assert_allclose(two.images, one.images, atol=1e-5)
    with pytest.raises(ValueError, match="config.sample.rows_per_call"):
        generate.generate(config, setup2.graphdef, params2, sigmas, mesh=setup2.mesh, **{**kwargs, "batch": 6})


def test_step_table_counts_every_step():
    out = toy_sample(toy_noise(4), sampling.Dopri5Options())
    for seg, (t0, t1, _) in zip(out.dopri5_stats, TOY_PATH.segments()):
        np.testing.assert_array_equal(seg["accepted_t"].sum(1), seg["accepted"])
        np.testing.assert_array_equal(seg["rejected_t"].sum(1), seg["rejected"])
        np.testing.assert_array_equal(seg["nfe"], 1 + 6 * (seg["accepted"] + seg["rejected"]))
        bins = np.nonzero(seg["accepted_t"].sum(0))[0]
        assert bins.min() >= int(t0 * 20) and bins.max() <= min(int(t1 * 20), 19)


def test_image_norm_weighs_each_scale_by_its_share_of_the_image():
    # sigmas (0.3, 0.5, 1.0): an error of 1 per element on the finest residual moves every pixel by
    # 0.3; a constant error of 1 on the coarsest (upsampled to every pixel) moves every pixel by 1.
    # RMS over the image, atol only: 0.3 and 1.0 (the normalised-state RMS would give
    # sqrt(256/336) = 0.87 and sqrt(16/336) = 0.22 for the same errors: the reverse ranking).
    shapes = [(2, 16, 16, 1), (2, 8, 8, 1), (2, 4, 4, 1)]
    zero = [jnp.zeros(s) for s in shapes]
    fine = [jnp.ones(shapes[0])] + zero[1:]
    coarse = zero[:2] + [jnp.ones(shapes[2])]
    norm = lambda err, image: sampling._scaled_rms(err, zero, zero, 0.0, 1.0, to_image=image, num_absent=0)
    np.testing.assert_allclose(norm(fine, TOY_IMAGE), [0.3, 0.3], rtol=1e-6)
    np.testing.assert_allclose(norm(coarse, TOY_IMAGE), [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(norm(fine, None), [np.sqrt(256 / 336)] * 2, rtol=1e-6)
    np.testing.assert_allclose(norm(coarse, None), [np.sqrt(16 / 336)] * 2, rtol=1e-6)
    # With the finest scale absent (its window has not started) the image is made of the rest.
    np.testing.assert_allclose(sampling._scaled_rms(coarse[1:], zero[1:], zero[1:], 0.0, 1.0, to_image=TOY_IMAGE,
                                                    num_absent=1), [1.0, 1.0], rtol=1e-6)


def test_config_names_the_dopri5_norm_field():
    c = config_lib.base_config()
    c.sample.dopri5_norm = "pixels"
    with pytest.raises(ValueError, match="config.sample.dopri5_norm='pixels'"):
        config_lib.validate(c)


def test_dopri5_sample_runs_of_the_old_solver_are_not_resumed_with_the_new(tmp_path):
    # settings.json of a dopri5 run made before the dopri5_* fields existed: it used the cold-start,
    # state-norm, batch-step solver; resuming it with the new default would mix two solvers' batches.
    config = tiny_config(**{"sample.method": "dopri5"})
    sample._check_settings(config, tmp_path, seed=0, primary=True)
    recorded = json.loads((tmp_path / "settings.json").read_text())
    old = {k: v for k, v in recorded.items() if "dopri5_" not in k}
    (tmp_path / "settings.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="sample.dopri5_carry_step: earlier False, now True"):
        sample._check_settings(config, tmp_path, seed=0, primary=True)
    with config.unlocked():
        config.sample.dopri5_carry_step, config.sample.dopri5_norm, config.sample.dopri5_per_sample = False, "state", False
    sample._check_settings(config, tmp_path, seed=0, primary=True)  # the old solver: accepted
    # Other methods record no dopri5 fields (their earlier runs' settings stay valid).
    heun = tiny_config(**{"sample.method": "heun"})
    (tmp_path / "heun").mkdir()
    sample._check_settings(heun, tmp_path / "heun", seed=0, primary=True)
    assert not any("dopri5" in k for k in json.loads((tmp_path / "heun" / "settings.json").read_text()))

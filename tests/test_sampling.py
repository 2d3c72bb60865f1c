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

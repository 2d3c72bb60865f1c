"""Coarse-conditioned sampling (conditional.py), measured on Gaussian data without a network.

The block-causal Gaussian field of tests/test_flow_gaussian.py is what a perfect LapFlow model
learns, so everything the samplers claim can be checked exactly there:

- consistency: Down^m(output) equals the input to float rounding, for every sampler, solver,
  2 and 3 scales, 2x and 4x, area and binomial filters;
- the inversion inverts: integrating the stored start state forward gives y back to the solver's
  tolerance;
- the inversion sampler's conditional law is the Gaussian conditional (Schur complement) of the
  unconditional sampler's own joint law, read off exactly with unit-vector noise as the
  unconditional test does; the replacement sampler's is not.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_flow_gaussian as gauss  # the ideal fields and the unconditional affine read-off
from lapflow_jax import conditional, pyramid
from lapflow_jax.paths import MultiScalePath

SIDE = gauss.SIDE


def suffix_laws(levels, down="area", up="bilinear"):
    """(means, covs) per active suffix of scales, the args of the Gaussian fields."""
    mu, sigma = gauss.gaussian_data()
    basis = jnp.eye(SIDE * SIDE, dtype=jnp.float64).reshape(-1, SIDE, SIDE, 1)
    mats = [np.asarray(s).reshape(SIDE * SIDE, -1).T for s in pyramid.decompose(basis, levels, down=down, up=up)]
    means, covs = [], []
    for f in range(levels):
        a = np.concatenate(mats[f:], axis=0)
        means.append(jnp.asarray(a @ mu))
        covs.append(jnp.asarray(a @ sigma @ a.T))
    return (tuple(means), tuple(covs)), mu, sigma


def field(path):
    return functools.partial(gauss.block_causal_velocity, path)


def _float32_field(path, args, states, t):
    # In float32 the ideal field's Cholesky fails at t = 1 (the data covariance of the pyramid is
    # rank-deficient and the 1e-8 floor is below float32's resolution): stop just short of it.
    # Consistency does not depend on the field's accuracy.
    return gauss.block_causal_velocity(path, args, states, jnp.minimum(t, 0.995))


def gaussian_images(n, seed=0):
    mu, sigma = gauss.gaussian_data()
    rng = np.random.default_rng(seed)
    x = mu + rng.standard_normal((n, SIDE * SIDE)) @ np.linalg.cholesky(sigma).T
    return x.reshape(n, SIDE, SIDE, 1)


CONSISTENCY_CASES = [  # (window starts, unknown scales m, down, up)
    ((0.5, 0.0), 1, "area", "bilinear"),
    ((2 / 3, 1 / 3, 0.0), 1, "area", "bilinear"),
    ((2 / 3, 1 / 3, 0.0), 2, "area", "bilinear"),
    ((0.5, 0.0), 1, "binomial", "binomial"),
    ((2 / 3, 1 / 3, 0.0), 2, "binomial", "binomial"),
]


def run_sampler(starts, m, down, up, *, sampler, method, project_steps=False, final_projection=True, k=2,
                steps=12, reference=None, t_start=None):
    """float32, as the model runs: B = 2 inputs, k samples each."""
    path = MultiScalePath(starts)
    levels = len(starts)
    args, _, _ = suffix_laws(levels, down, up)
    args = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), args)
    constraint = conditional.Constraint(levels, m, (1.0,) * levels, down, up)
    images = jnp.asarray(gaussian_images(2), jnp.float32)
    low = constraint.down_m(images)
    keys = jax.random.split(jax.random.key(1), m + 1)
    noise = [jax.random.normal(keys[s], (2 * k, SIDE >> s, SIDE >> s, 1)) for s in range(m)]
    extra = conditional.replacement_noise_like(keys[-1], low, constraint, k) if sampler == "replacement" else None
    out = conditional.conditional_sample(functools.partial(_float32_field, path), args, path, constraint, low,
                                         noise, sampler=sampler, samples_per_input=k, method=method, steps=steps, rtol=1e-4, atol=1e-4,
                                         project_steps=project_steps, final_projection=final_projection,
                                         replacement_noise=extra, reference=reference, t_start=t_start)
    return out, low, constraint


@pytest.mark.slow  # 20 cases x 3 solvers, compiled each: about 6 minutes on 2 cores
@pytest.mark.parametrize("starts,m,down,up", CONSISTENCY_CASES)
@pytest.mark.parametrize("sampler,project_steps", [("inversion", False), ("inversion", True),
                                                   ("replacement", False), ("replacement", True)])
def test_output_is_consistent_with_the_input(starts, m, down, up, sampler, project_steps):
    """max |Down^m(output) - input| <= 1e-5 (measured at most ~1e-6 in float32)."""
    for method in ("euler", "heun", "dopri5"):
        out, low, constraint = run_sampler(starts, m, down, up, sampler=sampler, method=method,
                                           project_steps=project_steps)
        err = conditional.consistency_error(out.images, jnp.repeat(low, 2, axis=0), constraint)
        print(f"{sampler} P={project_steps} {method} {starts} m={m} {down}/{up}: max |D out - in| {err:.2e}")
        assert err <= 1e-5, err
        assert out.images.shape == (4, SIDE, SIDE, 1)
        assert np.isfinite(np.asarray(out.images)).all()


def test_output_is_consistent_fast():
    """The fast subset of the test above: 3 scales, 4x, binomial filters (CG projection), Heun."""
    for sampler in conditional.SAMPLERS:
        out, low, constraint = run_sampler((2 / 3, 1 / 3, 0.0), 2, "binomial", "binomial", sampler=sampler,
                                           method="heun")
        err = conditional.consistency_error(out.images, jnp.repeat(low, 2, axis=0), constraint)
        assert err <= 1e-5, err


@pytest.mark.parametrize("starts,m,down,up", [CONSISTENCY_CASES[0], CONSISTENCY_CASES[2], CONSISTENCY_CASES[4]])
def test_without_the_final_projection_the_output_is_not_consistent(starts, m, down, up):
    """The deliberate mistake the consistency test guards against: no final projection."""
    out, low, constraint = run_sampler(starts, m, down, up, sampler="inversion", method="heun",
                                       final_projection=False)
    err = conditional.consistency_error(out.images, jnp.repeat(low, 2, axis=0), constraint)
    print(f"no final projection {starts} m={m} {down}/{up}: max |D out - in| {err:.2e}")
    assert err > 1e-2, err


def box_case(m, down, seed=0):
    """Images whose projection leaves the pixel range: noisy blocks around black and white inputs
    (what a sample looks like in Fashion-MNIST's black background), and interior ones."""
    rng = np.random.default_rng(seed)
    constraint = conditional.Constraint(3, m, (1.0, 1.0, 1.0), down, down if down == "binomial" else "bilinear")
    f = 2 ** m
    low_u8 = rng.choice(np.array([0, 0, 1, 3, 128, 200, 254, 255], np.uint8), (4, 16 // f, 16 // f, 1))
    low = low_u8.astype(np.float32) / 127.5 - 1.0
    x = np.repeat(np.repeat(low, f, 1), f, 2) + rng.normal(0, 0.05, (4, 16, 16, 1)).astype(np.float32)
    return constraint, low_u8, low, x


@pytest.mark.parametrize("m", [1, 2])
def test_box_projection_is_consistent_in_range_and_nearest(m):
    """project_box: Down^m(z) = low to float rounding, z in [-1, 1], and z = clip(x + lambda_block)
    (the KKT conditions of the nearest such point, area down). The plain projection followed by the
    clip that any image file applies misses the input where the clip bites."""
    constraint, _, low, x = box_case(m, "area")
    z = np.asarray(conditional.project_box(x, low, constraint))
    err = conditional.consistency_error(z, low, constraint)
    print(f"m={m}: box projection max |D z - low| {err:.2e}, range [{z.min()}, {z.max()}]")
    assert err <= 1e-5 and z.min() >= -1.0 and z.max() <= 1.0
    f = 2 ** m
    blocks = lambda a: a.reshape(4, 16 // f, f, 16 // f, f).transpose(0, 1, 3, 2, 4).reshape(-1, f * f)
    xb, zb = blocks(x), blocks(z)
    for xi, zi in zip(xb, zb):
        free = (zi > -1) & (zi < 1)
        if free.any():
            shift = np.median((zi - xi)[free])
            assert np.allclose((zi - xi)[free], shift, atol=1e-5)
            assert (xi[zi <= -1] + shift <= -1 + 1e-5).all() and (xi[zi >= 1] + shift >= 1 - 1e-5).all()
    clipped = np.clip(np.asarray(constraint.project(jnp.asarray(x), jnp.asarray(low))), -1, 1)
    plain = conditional.consistency_error(clipped, low, constraint)
    print(f"m={m}: project then clip: max |D out - low| {plain:.2e} ({plain * 127.5:.1f} levels)")
    assert plain > 1e-2


def test_box_projection_binomial_is_consistent_and_nearly_in_range():
    """Binomial down (alternating clip and projection): consistent, and in range to 1e-2. The input
    is the Down of an image in range (an arbitrary low-resolution image need not be one: the
    filters overlap)."""
    constraint, _, _, truth = box_case(1, "binomial")
    truth = np.clip(truth, -1, 1)
    low = np.asarray(constraint.down_m(jnp.asarray(truth)))
    x = truth + np.random.default_rng(1).normal(0, 0.05, truth.shape).astype(np.float32)
    z = np.asarray(conditional.project_box(x, low, constraint))
    err = conditional.consistency_error(z, low, constraint)
    print(f"binomial: max |D z - low| {err:.2e}, range [{z.min()}, {z.max()}]")
    assert err <= 1e-5 and z.min() >= -1.0 - 1e-2 and z.max() <= 1.0 + 1e-2


@pytest.mark.parametrize("m", [1, 2])
def test_uint8_outputs_downsample_exactly_to_a_uint8_input(m):
    """Area down, uint8 input: the written uint8 image's 2^m x 2^m block means are the input's levels
    exactly (project_box, then to_uint8_consistent); sample.to_uint8 of the plain projection (the
    files before this) misses by levels where the clip bites."""
    constraint, low_u8, low, x = box_case(m, "area")
    out = conditional.to_uint8_consistent(conditional.project_box(x, low, constraint), low, constraint)
    f = 2 ** m
    down = out.astype(np.float64).reshape(4, 16 // f, f, 16 // f, f, 1).mean((2, 4))
    assert np.abs(down - low_u8).max() == 0.0, np.abs(down - low_u8).max()
    from lapflow_jax import sample as sample_lib
    before = sample_lib.to_uint8(constraint.project(jnp.asarray(x), jnp.asarray(low)))
    miss = np.abs(before.astype(np.float64).reshape(down.shape[:2] + (f,) + down.shape[2:3] + (f, 1)).mean((2, 4))
                  - low_u8).max()
    print(f"m={m}: uint8 of the plain projection misses the input by {miss:.2f} levels")
    assert miss >= 1.0


@pytest.mark.parametrize("starts,m,method,tol", [
    ((0.5, 0.0), 1, "heun", 1e-4), ((2 / 3, 1 / 3, 0.0), 2, "heun", 1e-4), ((2 / 3, 1 / 3, 0.0), 1, "euler", 5e-2),
    ((0.5, 0.0), 1, "dopri5", 1e-4)])
def test_inversion_round_trip(starts, m, method, tol):
    """forward(inverse(y)) = y to the solver's tolerance (relative to |y|; Heun 50 steps, Euler
    first order, dopri5 at rtol = atol = 1e-6)."""
    path = MultiScalePath(starts)
    levels = len(starts)
    with jax.enable_x64(True):
        args, _, _ = suffix_laws(levels)
        constraint = conditional.Constraint(levels, m, (1.0,) * levels)
        y = constraint.known(constraint.down_m(jnp.asarray(gaussian_images(3))))
        plan = conditional.forward_plan(path, path.window_starts[m - 1], 50)
        traj = conditional.invert(field(path), args, path, y, plan, method=method, rtol=1e-6, atol=1e-6)
        back = conditional.round_trip(field(path), args, traj, rtol=1e-6, atol=1e-6)
        err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(back, y))
        moved = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(traj.start_states, y))
    print(f"round trip {starts} m={m} {method}: relative error {err:.2e} (the start state is {moved:.2f} away)")
    assert err < tol, err
    assert moved > 0.3  # it went somewhere: noise is not the data


# --- The conditional law on Gaussian data -----------------------------------------------------------

def conditional_law(sampler, starts=(0.5, 0.0), method="heun", steps=gauss.STEPS, mistake=None):
    """The sampler's conditional law of the fine scale given the coarse one, read off exactly.

    The output is affine in (coarse input c, fine noise n, replacement noise e): feeding c0 and
    c0 + e_i, and per input n = 0, unit vectors e_j, then e = unit vectors, gives the conditional
    mean at c0, its gain d mean / d c, and the conditional covariance G G^T. Returns those and the
    unconditional sampler's joint (mean, covariance) in residual space (fine first).
    """
    path = MultiScalePath(starts)
    levels = len(starts)
    with jax.enable_x64(True):
        (m_joint, big_m), _, _ = gauss.affine_map(path, method, "block_causal")
        args, _, _ = suffix_laws(levels)
        constraint = conditional.Constraint(levels, 1, (1.0,) * levels)
        d_fine, d_coarse = SIDE * SIDE, m_joint.size - SIDE * SIDE
        cov = big_m @ big_m.T
        # A typical coarse input: mean plus a draw from its own law.
        c_mean, c_cov = m_joint[d_fine:], cov[d_fine:, d_fine:]
        c0 = c_mean + np.linalg.cholesky(c_cov + 1e-9 * np.eye(d_coarse)) @ np.random.default_rng(3).standard_normal(d_coarse)
        inputs = np.concatenate([c0[None], c0[None] + np.eye(d_coarse)])  # [1 + dc, dc]
        half = SIDE // 2
        known_shapes = [(SIDE >> s, SIDE >> s) for s in range(1, levels)]
        if levels != 2:
            raise NotImplementedError
        low = jnp.asarray(inputs.reshape(-1, half, half, 1))
        rows = 1 + d_fine + d_coarse
        fine_noise = np.zeros((rows, d_fine))
        fine_noise[1:1 + d_fine] = np.eye(d_fine)
        rep_noise = np.zeros((rows, d_coarse))
        rep_noise[1 + d_fine:] = np.eye(d_coarse)
        b = inputs.shape[0]
        noise = [jnp.asarray(np.tile(fine_noise, (b, 1)).reshape(-1, SIDE, SIDE, 1))]
        extra = [jnp.asarray(np.tile(rep_noise, (b, 1)).reshape(-1, *known_shapes[0], 1))]
        context = mistake() if mistake else _null()
        with context:
            out = conditional.conditional_sample(field(path), args, path, constraint, low, noise, sampler=sampler,
                                                 samples_per_input=rows, method=method, steps=steps, rtol=1e-6,
                                                 atol=1e-6, replacement_noise=extra)
        fine = np.asarray(out.residuals[0]).reshape(b, rows, d_fine)
    mean = fine[0, 0]
    gain = (fine[1:, 0] - fine[0, 0]).T                  # [df, dc]
    g = (fine[0, 1:] - fine[0, 0]).T                     # [df, df + dc]
    return {"mean": mean, "gain": gain, "cov": g @ g.T, "c0": c0}, (m_joint, cov)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def schur_errors(law, joint):
    """Relative errors of a sampler's conditional law against the Gaussian conditional of `joint`."""
    m_joint, cov = joint
    d = SIDE * SIDE
    c_ff, c_fc, c_cc = cov[:d, :d], cov[:d, d:], cov[d:, d:]
    gain = np.linalg.solve(c_cc, c_fc.T).T
    want_mean = m_joint[:d] + gain @ (law["c0"] - m_joint[d:])
    want_cov = c_ff - gain @ c_fc.T
    rel = lambda got, want: float(np.linalg.norm(got - want) / np.linalg.norm(want))
    return {"mean": rel(law["mean"], want_mean), "gain": rel(law["gain"], gain), "cov": rel(law["cov"], want_cov)}


def test_inversion_draws_from_the_samplers_own_conditional():
    """Inversion: conditional mean, gain and covariance of the fine scale equal the Schur complement
    of the unconditional sampler's joint law to the unconditional test's tolerance (Heun, 100
    steps: measured in the printout); replacement misses by far more."""
    law, joint = conditional_law("inversion")
    inv = schur_errors(law, joint)
    law_r, _ = conditional_law("replacement")
    rep = schur_errors(law_r, joint)
    print(f"inversion: {inv}\nreplacement: {rep}")
    assert max(inv.values()) < gauss.TOL["heun"], inv
    assert rep["mean"] > 20 * gauss.TOL["heun"] and rep["cov"] > 20 * gauss.TOL["heun"], rep


def test_inversion_without_time_order_misses_the_conditional(monkeypatch):
    """Deliberate mistake: the stored coarse states read in the wrong time order (not flipped after
    the backward solve). The Schur test must fail on it."""
    original = conditional._grid_state

    def reversed_grid(traj, t0, t1, t):
        return original(jnp.flip(traj, 0), t0, t1, t)

    monkeypatch.setattr(conditional, "_grid_state", reversed_grid)
    law, joint = conditional_law("inversion")
    errs = schur_errors(law, joint)
    print(f"inversion with reversed stored states: {errs}")
    assert errs["mean"] > 20 * gauss.TOL["heun"], errs


# --- The upsample mode on a (random, untrained) model ------------------------------------------------

def test_upsample_mode_writes_consistent_outputs_and_resumes(tmp_path):
    """A tiny model, random weights (consistency and the files do not need a trained one): inputs
    from a folder of 8x8 PNGs, 2x to 16x16 with 2 samples each; a second run resumes (nothing to do)
    and a changed setting is refused, naming the field."""
    from PIL import Image

    from lapflow_jax import train, upsample
    from test_config import one_device_mesh
    from test_train import tiny_config

    config = tiny_config(**{"pyramid.sigmas": (0.13, 0.44), "upsample.samples_per_image": 2,
                            "upsample.batch_size": 2, "upsample.input": str(tmp_path / "low"), "sample.steps": 4})
    (tmp_path / "low").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        # black and white pixels among them: there the clip to [0, 255] bites
        pixels = rng.choice(np.array([0, 0, 0, 1, 96, 128, 160, 254, 255], np.uint8), (8, 8))
        Image.fromarray(pixels).save(tmp_path / "low" / f"d{i}.png")
    setup = train.make_setup(config, one_device_mesh())
    state = train.create_state(setup, np.asarray((0.13, 0.44), np.float32))
    out = tmp_path / "out"
    summary = upsample.upsample_to_dir(config, setup, state.params, (0.13, 0.44), out, seed=1)
    print(summary)
    assert summary["max_consistency_error"] <= 1e-5
    arrays = dict(np.load(out / "upsampled.npz"))
    assert arrays["samples"].shape == (3, 2, 16, 16, 1) and arrays["inputs"].shape == (3, 8, 8, 1)
    assert sorted(p.name for p in (out / "images").iterdir())[:2] == ["d0_0.png", "d0_1.png"]
    assert np.asarray(Image.open(out / "grid.png")).shape[:2] == (3 * 17 - 1, 4 * 17 - 1)
    # The written uint8 files themselves: their 2x2 means are the uint8 inputs exactly.
    down = arrays["samples"].astype(np.float64).reshape(3, 2, 8, 2, 8, 2).mean((3, 5))
    miss = np.abs(down - arrays["inputs"][:, None, :, :, 0]).max()
    print(f"uint8 files: max |Down(output) - input| = {miss} levels")
    assert miss == 0.0 and summary["max_consistency_error_uint8_levels"] == 0.0, miss
    again = upsample.upsample_to_dir(config, setup, state.params, (0.13, 0.44), out, seed=1)
    assert "seconds_per_image" not in again  # resumed: every batch was there
    config.upsample.sampler = "replacement"
    with pytest.raises(ValueError, match="upsample.sampler"):
        upsample.upsample_to_dir(config, setup, state.params, (0.13, 0.44), out, seed=1)


def test_upsample_split_inputs_are_the_models_own_down_of_the_split():
    """config.upsample.split: the first num_images images of that split of config.data, downsampled
    with the model's Down (area: the 2x2 mean, to uint8 rounding), their originals kept (the whole
    mode on them runs in the README test)."""
    from lapflow_jax import pyramid, upsample
    from lapflow_jax.data import pipeline
    from test_train import tiny_config

    config = tiny_config(**{"pyramid.sigmas": (0.13, 0.44), "upsample.samples_per_image": 1,
                            "upsample.batch_size": 3, "upsample.split": "test", "upsample.num_images": 3,
                            "sample.steps": 2})
    low, names, originals = upsample.split_inputs(config, "test")
    truth, _ = pipeline.read_split(config.data, "test", 3)
    assert low.dtype == originals.dtype == np.uint8 and names[0] == "test00000"
    assert originals.shape == truth.shape and low.shape == (3, truth.shape[1] // 2, truth.shape[2] // 2, truth.shape[3])
    expect = (np.asarray(pyramid.downsample(jnp.asarray(truth), "area")) + 1) * 127.5
    assert np.abs(low - expect).max() <= 0.5 + 1e-3, np.abs(low - expect).max()


@pytest.mark.parametrize("field,value,message", [
    ("upsample.num_images", -1, "config.upsample.num_images=-1"),
    ("upsample.split", "test", "config.upsample.input='x.npz' and config.upsample.split='test'"),
    ("upsample.sampler", "ilvr", "config.upsample.sampler='ilvr'"),
    ("upsample.samples_per_image", 0, "config.upsample.samples_per_image=0"),
    ("upsample.variation_t0", 1.0, "config.upsample.variation_t0=1.0"),
    ("upsample.factor", 3, "config.upsample.factor=3"),
    ("upsample.factor", 4, "config.upsample.factor=4 needs more scales"),
])
def test_upsample_config_errors_name_the_field(field, value, message):
    from lapflow_jax import config as config_lib
    from test_train import tiny_config

    config = tiny_config(**{"upsample.input": "x.npz"} if field == "upsample.split" else {})
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config_lib.validate(config)


def test_variations_keep_the_coarse_scale_and_stay_near_the_reference():
    """Variations: from t0 close to 1 the output stays near the reference image; from the window
    start it is a fresh draw (far); Down(output) = Down(reference) either way."""
    reference = jnp.asarray(gaussian_images(2), jnp.float32)
    dist = {}
    for t0 in (0.5, 0.95):
        out, low, constraint = run_sampler((0.5, 0.0), 1, "area", "bilinear", sampler="inversion", method="heun",
                                           reference=reference, t_start=t0)
        assert conditional.consistency_error(out.images, jnp.repeat(low, 2, axis=0), constraint) <= 1e-5
        ref = jnp.repeat(reference, 2, axis=0)
        dist[t0] = float(jnp.linalg.norm(out.images - ref) / jnp.linalg.norm(ref - constraint.image(
            [jnp.zeros_like(ref)] + constraint.known(low[jnp.repeat(jnp.arange(2), 2)]))))
    print(f"variation distance to the reference (relative to its fine detail): {dist}")
    assert dist[0.95] < 0.2 < dist[0.5], dist

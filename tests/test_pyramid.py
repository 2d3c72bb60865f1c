"""Tests for lapflow_jax.pyramid: filters, decompose/reconstruct, normalisation, errors.

Filters are checked against independent references (numpy/scipy, and jax.image.resize for
bilinear), so the hand-written L = 3 formulas below do not reuse the module's own Down/Up.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lapflow_jax import pyramid

COMBOS = list(itertools.product(pyramid.DOWN_FILTERS, pyramid.UP_FILTERS))
BINOMIAL = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


@pytest.fixture
def x64():
    """Enables float64 for one test and restores the previous setting afterwards."""
    with jax.enable_x64(True):
        yield


def _data(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


# --- independent references (numpy float64, direct pad-and-filter form), arrays (..., H, W, C) --


def _filter_axis(x, taps, axis, mode):
    """Correlates ``x`` with symmetric ``taps`` along ``axis`` after ``np.pad(mode=mode)``."""
    half = len(taps) // 2
    widths = [(0, 0)] * x.ndim
    widths[axis] = (half, half)
    xp = np.moveaxis(np.pad(x, widths, mode=mode), axis, 0)
    n = x.shape[axis]
    out = sum(w * xp[s : s + n] for s, w in enumerate(taps))
    return np.moveaxis(out, 0, axis)


def _interleave(even, odd, axis):
    out = np.stack([even, odd], axis=axis % even.ndim + 1)
    shape = list(even.shape)
    shape[axis] *= 2
    return out.reshape(shape)


def ref_down(x, down):
    x = np.asarray(x, dtype=np.float64)
    if down == "area":
        h, w = x.shape[-3], x.shape[-2]
        return x.reshape(*x.shape[:-3], h // 2, 2, w // 2, 2, x.shape[-1]).mean(axis=(-4, -2))
    for axis in (-3, -2):
        x = _filter_axis(x, BINOMIAL, axis, "reflect")
    return x[..., ::2, ::2, :]


def ref_up(x, up):
    x = np.asarray(x, dtype=np.float64)
    for axis in (-3, -2):
        if up == "nearest":
            x = np.repeat(x, 2, axis=axis)
        elif up == "bilinear":
            left = _filter_axis(x, [1.0, 0.0, 0.0], axis, "edge")  # x[i - 1], clamped
            right = _filter_axis(x, [0.0, 0.0, 1.0], axis, "edge")  # x[i + 1], clamped
            x = _interleave(0.75 * x + 0.25 * left, 0.75 * x + 0.25 * right, axis)
        else:
            zero_inserted = _interleave(x, np.zeros_like(x), axis)
            x = _filter_axis(zero_inserted, 2 * BINOMIAL, axis, "reflect")
    return x


# --- filters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 8, 12, 3), (1, 2, 4, 1), (6, 2, 2)])
@pytest.mark.parametrize("down", pyramid.DOWN_FILTERS)
def test_downsample_matches_reference(down, shape):
    # Sizes 2 and 4 exercise reflect padding that wraps more than once.
    x = _data(shape, dtype=np.float64)
    got = pyramid.downsample(jnp.asarray(x, jnp.float32), down)
    assert got.shape == (*shape[:-3], shape[-3] // 2, shape[-2] // 2, shape[-1])
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref_down(x, down), atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (1, 1, 2, 2), (3, 1, 1)])
@pytest.mark.parametrize("up", pyramid.UP_FILTERS)
def test_upsample_matches_reference(up, shape):
    x = _data(shape, dtype=np.float64)
    got = pyramid.upsample(jnp.asarray(x, jnp.float32), up)
    assert got.shape == (*shape[:-3], 2 * shape[-3], 2 * shape[-2], shape[-1])
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref_up(x, up), atol=1e-6)


def test_bilinear_is_half_pixel_edge_clamped_resize():
    # The documented formula, written out for one axis of length 3, both axes via separability.
    a = np.array([1.0, 2.0, 4.0], dtype=np.float32)
    row = np.array([1.0, 1.25, 1.75, 2.5, 3.5, 4.0], dtype=np.float32)
    x = (a[:, None] * a[None, :])[None, :, :, None]
    got = pyramid.upsample(jnp.asarray(x), "bilinear")
    np.testing.assert_allclose(got[0, :, :, 0], row[:, None] * row[None, :], rtol=1e-6)
    # ... and it is exactly what jax.image.resize does for a 2x "bilinear" resize.
    y = _data((2, 4, 6, 3))
    resized = jax.image.resize(y, (2, 8, 12, 3), "bilinear")
    np.testing.assert_allclose(pyramid.upsample(jnp.asarray(y), "bilinear"), resized, atol=1e-6)


# --- decompose / reconstruct --------------------------------------------------------------------


@pytest.mark.parametrize("down,up", COMBOS)
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_round_trip_float32(levels, channels, down, up):
    x = jnp.asarray(_data((2, 16, 16, channels), seed=levels * 10 + channels))
    res = pyramid.decompose(x, levels, down=down, up=up)
    assert len(res) == levels and all(r.dtype == jnp.float32 for r in res)
    y = pyramid.reconstruct(res, up=up)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(y) - np.asarray(x))) < 1e-5


@pytest.mark.parametrize("down,up", COMBOS)
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_round_trip_float64(x64, levels, channels, down, up):
    x = jnp.asarray(_data((2, 16, 16, channels), seed=levels, dtype=np.float64))
    assert x.dtype == jnp.float64
    res = pyramid.decompose(x, levels, down=down, up=up)
    assert all(r.dtype == jnp.float64 for r in res)
    y = pyramid.reconstruct(res, up=up)
    assert y.dtype == jnp.float64
    assert np.max(np.abs(np.asarray(y) - np.asarray(x))) < 1e-12


def test_levels_one_returns_input():
    x = jnp.asarray(_data((2, 6, 10, 3)))  # any size is fine with a single level
    (only,) = pyramid.decompose(x, 1)
    np.testing.assert_array_equal(only, x)
    np.testing.assert_array_equal(pyramid.reconstruct([x]), x)


@pytest.mark.parametrize("shape", [(16, 8, 3), (2, 3, 16, 8, 1), (5, 32, 16, 4)])
def test_shapes_of_each_level(shape):
    # eval_shape traces without compiling: shapes are all this test checks, and it stays fast.
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    h, w = shape[-3], shape[-2]
    expected = pyramid.scale_shapes(h, w, 4)
    assert expected == [(h >> k, w >> k) for k in range(4)] and expected[-1] == (h // 8, w // 8)
    for down, up in COMBOS:
        res = jax.eval_shape(lambda a: pyramid.decompose(a, 4, down=down, up=up), x)
        assert [r.shape for r in res] == [(*shape[:-3], a, b, shape[-1]) for a, b in expected]
        assert jax.eval_shape(lambda rs: pyramid.reconstruct(rs, up=up), res).shape == shape


@pytest.mark.parametrize("down,up", COMBOS)
def test_three_level_formulas_by_hand(down, up):
    """docs/method.md section 1 for L = 3, with the reference filters (float64 numpy)."""
    x = _data((2, 16, 16, 3), seed=7, dtype=np.float64)
    d, u = (lambda a: ref_down(a, down)), (lambda a: ref_up(a, up))
    x2 = d(d(x))
    x1 = d(x) - u(x2)
    x0 = x - u(d(x))
    np.testing.assert_allclose(x0 + u(x1) + u(u(x2)), x, atol=1e-12)

    got = pyramid.decompose(jnp.asarray(x, jnp.float32), 3, down=down, up=up)
    for k, (mine, hand) in enumerate(zip(got, [x0, x1, x2])):
        np.testing.assert_allclose(mine, hand, atol=2e-5, err_msg=f"scale {k}")


def test_area_down_of_constant_is_constant():
    x = jnp.full((2, 16, 16, 3), 0.7, jnp.float32)
    g = x
    for _ in range(4):
        g = pyramid.downsample(g, "area")
        np.testing.assert_allclose(g, 0.7, rtol=1e-6)
    assert g.shape == (2, 1, 1, 3)


@pytest.mark.parametrize("down,up", COMBOS)
def test_constant_image_has_zero_residuals(down, up):
    # Every filter preserves constants, down to 1x1 coarsest scales (reflect padding of short axes).
    x = jnp.full((2, 16, 16, 1), -1.5, jnp.float32)
    res = pyramid.decompose(x, 4, down=down, up=up)
    for r in res[:-1]:
        assert float(jnp.max(jnp.abs(r))) < 1e-6
    np.testing.assert_allclose(res[-1], -1.5, rtol=1e-6)


@pytest.mark.parametrize("down,up", COMBOS)
def test_smooth_image_residuals_are_small(down, up):
    # Smooth: waves 128 px long on a 32 px image.
    yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    w = 2 * np.pi / 128
    img = np.sin(w * xx) * np.cos(w * yy) + 0.5 * np.sin(w * (xx + yy))
    x = jnp.asarray(np.stack([img, -img], axis=-1)[None].astype(np.float32))
    res = [np.asarray(r) for r in pyramid.decompose(x, 3, down=down, up=up)]
    coarse_std = np.std(res[-1])
    assert coarse_std > 0.5
    for k, r in enumerate(res[:-1]):
        assert np.std(r) < 0.1 * coarse_std, f"scale {k}: {np.std(r)} vs coarse {coarse_std}"


def test_jit_and_vmap_match_eager():
    x = jnp.asarray(_data((2, 16, 16, 3), seed=3))
    # Every filter runs through the same matrix code path, so one pair covers jit/vmap. Each
    # transform gets one program holding both directions, to keep compile time down.
    down, up = "binomial", "bilinear"

    def both(im):
        res = pyramid.decompose(im, 3, down=down, up=up)
        return res, pyramid.reconstruct(res, up=up)

    eager = pyramid.decompose(x, 3, down=down, up=up)
    for name, fn in [("jit", jax.jit(both)), ("vmap", jax.jit(jax.vmap(both)))]:
        res, rec = fn(x)
        for k, (got, want) in enumerate(zip(res, eager)):
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"{name} scale {k}")
        np.testing.assert_allclose(rec, x, atol=1e-5, err_msg=name)


def test_bfloat16_dtype_preserved():
    x = jnp.asarray(_data((2, 16, 16, 1))).astype(jnp.bfloat16)
    for down, up in COMBOS:
        res = pyramid.decompose(x, 2, down=down, up=up)
        assert all(r.dtype == jnp.bfloat16 for r in res)
        assert pyramid.reconstruct(res, up=up).dtype == jnp.bfloat16


# --- errors --------------------------------------------------------------------------------------


def test_indivisible_size_error_names_size_and_levels():
    x = jnp.zeros((2, 12, 16, 3))
    with pytest.raises(ValueError, match=r"\(12, 16\).*levels = 4"):
        pyramid.decompose(x, 4)
    assert pyramid.scale_shapes(12, 16, 3) == [(12, 16), (6, 8), (3, 4)]
    with pytest.raises(ValueError, match=r"\(16, 6\).*levels = 3"):
        pyramid.scale_shapes(16, 6, 3)


@pytest.mark.parametrize("levels", [0, -2, 1.5, True, "3"])
def test_bad_levels(levels):
    with pytest.raises(ValueError, match="levels"):
        pyramid.decompose(jnp.zeros((1, 8, 8, 1)), levels)
    with pytest.raises(ValueError, match="levels"):
        pyramid.scale_shapes(8, 8, levels)


def test_bad_filter_names():
    x = jnp.zeros((1, 8, 8, 1))
    with pytest.raises(ValueError, match=r"down.*\('area', 'binomial'\).*'box'"):
        pyramid.decompose(x, 2, down="box")
    with pytest.raises(ValueError, match=r"up.*\('nearest', 'bilinear', 'binomial'\).*'cubic'"):
        pyramid.decompose(x, 2, up="cubic")
    with pytest.raises(ValueError, match=r"up.*'Bilinear'"):
        pyramid.reconstruct([x], up="Bilinear")
    with pytest.raises(ValueError, match=r"down.*'area2'"):
        pyramid.measure_sigmas(x, 2, down="area2")


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W, C\)"):
        pyramid.decompose(jnp.zeros((8, 8)), 2)
    with pytest.raises(ValueError, match="floating dtype.*int32"):
        pyramid.decompose(jnp.zeros((1, 8, 8, 1), jnp.int32), 2)
    with pytest.raises(ValueError, match=r"residuals\[0\].*2x"):
        pyramid.reconstruct([jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 2, 2, 1))])
    with pytest.raises(ValueError, match=r"residuals\[0\]"):
        pyramid.reconstruct([jnp.zeros((1, 8, 8, 2)), jnp.zeros((1, 4, 4, 1))])
    with pytest.raises(ValueError, match="non-empty"):
        pyramid.reconstruct([])
    with pytest.raises(ValueError, match=r"residuals\[1\] has dtype bfloat16"):
        pyramid.reconstruct([jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 2, 2, 1), jnp.bfloat16)])


# --- normalisation -------------------------------------------------------------------------------


def test_normalize_denormalize_round_trip():
    x = jnp.asarray(_data((2, 16, 16, 3), seed=5))
    res = pyramid.decompose(x, 3)
    sigmas = (0.05, 0.2, 1.7)
    normed = pyramid.normalize(res, sigmas)
    for r, n, s in zip(res, normed, sigmas):
        assert n.dtype == r.dtype and n.shape == r.shape
        np.testing.assert_allclose(n, np.asarray(r) / s, rtol=1e-6)
    back = pyramid.denormalize(normed, sigmas)
    for r, b in zip(res, back):
        np.testing.assert_allclose(b, r, rtol=1e-6, atol=1e-7)
    # Traced sigmas (e.g. stored in a train state) work under jit.
    jitted = jax.jit(pyramid.normalize)(res, jnp.asarray(sigmas))
    for n, j in zip(normed, jitted):
        np.testing.assert_allclose(j, n, rtol=1e-6)


def test_normalize_errors():
    res = pyramid.decompose(jnp.zeros((2, 16, 16, 1)), 3)
    with pytest.raises(ValueError, match="sigmas has 2 entries but residuals has 3"):
        pyramid.normalize(res, (1.0, 1.0))
    with pytest.raises(ValueError, match="sigmas has 4 entries"):
        pyramid.denormalize(res, (1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"sigmas\[1\].*positive"):
        pyramid.normalize(res, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match=r"sigmas\[2\]"):
        pyramid.denormalize(res, (1.0, 1.0, float("nan")))


def test_measure_sigmas_known_data():
    rng = np.random.default_rng(11)
    # Constant 2x2 blocks: area down recovers the blocks and nearest up gives x back, so the
    # residual is exactly zero (clamped to the floor) and the coarse std is the blocks' std.
    blocks = rng.normal(size=(2, 8, 8, 1)) * 3.0
    x = np.repeat(np.repeat(blocks, 2, axis=1), 2, axis=2).astype(np.float32)
    sig = pyramid.measure_sigmas(x, 2, down="area", up="nearest")
    assert isinstance(sig, tuple) and all(type(s) is float for s in sig)
    assert sig[0] == pyramid.SIGMA_FLOOR
    np.testing.assert_allclose(sig[1], np.std(blocks.astype(np.float32)), rtol=1e-5)

    # A +-1 checkerboard averages to zero: coarse std 0 (floored), residual = x with std 1.
    yy, xx = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    board = np.where((yy + xx) % 2 == 0, 1.0, -1.0)[:, :, None]
    board = np.stack([board, -board]).astype(np.float32)
    sig = pyramid.measure_sigmas(board, 2, down="area", up="bilinear", floor=0.01)
    assert sig == (1.0, 0.01)

    # levels = 1: plain std of the data.
    data = rng.normal(size=(3, 4, 4, 1)) * 2.0 + 5.0
    (s,) = pyramid.measure_sigmas(data.astype(np.float32), 1)
    np.testing.assert_allclose(s, np.std(data.astype(np.float32)), rtol=1e-5)

    with pytest.raises(ValueError, match="floor"):
        pyramid.measure_sigmas(board, 2, floor=0.0)

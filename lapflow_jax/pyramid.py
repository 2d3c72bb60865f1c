"""Laplacian pyramid of NHWC arrays and per-scale normalisation (docs/method.md section 1).

Arrays are ``(..., H, W, C)``: any number of leading batch dimensions, spatial axes -3 and -2,
channels last, any channel count. Scale ``k = 0`` is the finest (full resolution), ``k = L - 1`` the
coarsest; scale ``k`` has spatial size ``(H / 2**k, W / 2**k)``.

With ``g_0 = x`` and ``g_{k+1} = Down(g_k)``::

    x^(k)   = g_k - Up(g_{k+1})      for k < L - 1   (band-pass residuals)
    x^(L-1) = g_{L-1}                                 (low-pass, coarsest)

and the reconstruction ``r_{L-1} = x^(L-1)``, ``r_k = x^(k) + Up(r_{k+1})``, ``x = r_0`` is exact
for any pair of filters (it only undoes the subtractions), up to floating-point rounding.

Filters (names are static Python strings, see ``DOWN_FILTERS`` / ``UP_FILTERS``):

- down ``"area"``: mean of each 2x2 block.
- down ``"binomial"``: separable 5-tap ``[1, 4, 6, 4, 1] / 16`` blur with reflect padding (mirror
  about the edge pixel, edge not repeated), then every second pixel starting at index 0.
- up ``"nearest"``: every pixel repeated 2x2.
- up ``"bilinear"``: half-pixel centres with edge clamping, i.e. fine pixel ``2i`` is
  ``0.75 x_i + 0.25 x_{i-1}`` and ``2i + 1`` is ``0.75 x_i + 0.25 x_{i+1}`` per axis. This equals
  ``jax.image.resize(x, 2x shape, "bilinear")`` exactly (checked in tests/test_pyramid.py): for
  upsampling, resize's renormalised triangle kernel at the border is the same as clamping.
- up ``"binomial"``: Burt-Adelson expand: zero-insert (coarse pixel ``i`` at fine ``2i``), then the
  same reflect-padded 5-tap binomial blur with gain 2 per axis (4 in total, making up for the
  inserted zeros). Reflecting the zero-inserted signal is the fine-grid mirror extension that
  ``"binomial"`` down uses, so the pair treats borders consistently.

Everything here except ``measure_sigmas`` is pure and jit/vmap-safe when ``levels`` and the filter
names are static, and keeps the input dtype (float64 works with jax x64 enabled).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DOWN_FILTERS = ("area", "binomial")
UP_FILTERS = ("nearest", "bilinear", "binomial")

# Default floor for measured sigmas. Data is expected at unit scale (pixels in [-1, 1] or scaled VAE
# latents); a scale whose spread is below this (e.g. residuals of constant images) is effectively
# empty, and dividing it by ~0 would blow rounding noise up into the flow's input.
SIGMA_FLOOR = 1e-4

# Binomial taps [1, 4, 6, 4, 1] / 16, as offsets -2..2.
_BINOMIAL_TAPS = (1.0 / 16, 4.0 / 16, 6.0 / 16, 4.0 / 16, 1.0 / 16)


def _check_choice(value, choices, name):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_levels(levels):
    # bool is an int subclass; True levels is certainly a bug.
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)):
        raise ValueError(f"levels must be a Python int >= 1 (static), got {levels!r}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")


def _check_image(x, name="x"):
    if not hasattr(x, "ndim") or x.ndim < 3:
        shape = getattr(x, "shape", None)
        raise ValueError(f"{name} must be an array of shape (..., H, W, C), got shape {shape}")
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        # Averaging integers would silently change the dtype or truncate.
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")


def scale_shapes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """Spatial sizes ``[(H, W), (H/2, W/2), ..., (H/2**(L-1), W/2**(L-1))]``, finest first.

    Raises ValueError when ``levels < 1`` or ``(height, width)`` is not divisible by
    ``2**(levels - 1)``.
    """
    _check_levels(levels)
    factor = 2 ** (levels - 1)
    if height < 1 or width < 1 or height % factor or width % factor:
        raise ValueError(
            f"spatial size (H, W) = ({height}, {width}) must be divisible by 2**(levels - 1) = "
            f"{factor} for levels = {levels}"
        )
    return [(height >> k, width >> k) for k in range(levels)]


# --- filters as 1-D operator matrices ----------------------------------------------------------
#
# Every filter here is linear and separable, so one axis of it is a small constant matrix, applied
# to H and then W with a matmul. Why matrices rather than pads and shifted slices: a handful of
# dot ops compiles far faster than the ~100 slice/pad/add ops per level the direct form needs
# (XLA CPU compile time dominated), values do not change the traced program (only sizes do), and
# the MXU runs them on TPU. The cost, O(H^2 W + H W^2) per channel instead of O(H W), is
# negligible next to the model at the sizes this project uses (latents up to 128 px, pixels up to
# 256 px); for much larger pixel images a banded (convolution) form would be cheaper. Caveat: a NaN
# or Inf pixel spreads over its whole row and column (0 * inf), not just its 5-pixel neighbourhood.


def _reflect(i, n):
    """Index ``i`` mirrored into ``[0, n)`` about the edge pixels, repeatedly (numpy "reflect")."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i %= period
    return i if i < n else period - i


@functools.lru_cache(maxsize=None)
def _down_matrix(n, down):
    """(n // 2, n) float64 matrix of the 1-D 2x downsample ``down`` on a length-n axis."""
    m = np.zeros((n // 2, n))
    for i in range(n // 2):
        if down == "area":
            m[i, 2 * i] = m[i, 2 * i + 1] = 0.5
        else:  # binomial: blur with reflect padding, keep fine pixel 2i.
            for t, w in zip(range(-2, 3), _BINOMIAL_TAPS):
                m[i, _reflect(2 * i + t, n)] += w
    m.setflags(write=False)  # cached: shared by every caller.
    return m


@functools.lru_cache(maxsize=None)
def _up_matrix(n, up):
    """(2n, n) float64 matrix of the 1-D 2x upsample ``up`` on a length-n axis."""
    m = np.zeros((2 * n, n))
    for i in range(n):
        if up == "nearest":
            m[2 * i, i] = m[2 * i + 1, i] = 1.0
        elif up == "bilinear":
            # Half-pixel centres: fine 2i sits at coarse i - 1/4, fine 2i + 1 at i + 1/4.
            m[2 * i, i] += 0.75
            m[2 * i, max(i - 1, 0)] += 0.25
            m[2 * i + 1, i] += 0.75
            m[2 * i + 1, min(i + 1, n - 1)] += 0.25
    if up == "binomial":
        # Zero-insert (coarse j at fine 2j), then blur with gain 2 and reflect padding of the
        # zero-inserted signal: only taps landing on even fine positions see a coarse pixel.
        for p in range(2 * n):
            for t, w in zip(range(-2, 3), _BINOMIAL_TAPS):
                q = _reflect(p + t, 2 * n)
                if q % 2 == 0:
                    m[p, q // 2] += 2.0 * w
    m.setflags(write=False)
    return m


@jax.jit
def _apply_separable(x, m_h, m_w):
    """``(..., H, W, C) -> (..., h, w, C)`` with (h, H) matrix ``m_h`` and (w, W) matrix ``m_w``."""
    # HIGHEST: TPUs would otherwise run float32 matmuls in bfloat16 and blur the pyramid itself.
    # Jitted with the matrices as arguments: one compiled program per shape, whatever the filter.
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("ij,...jwc->...iwc", m_h, x, precision=hi)
    return jnp.einsum("ij,...hjc->...hic", m_w, x, precision=hi)


# --- 2x down / up on (..., H, W, C) ------------------------------------------------------------


def downsample(x: jax.Array, down: str = "area") -> jax.Array:
    """2x downsample: ``(..., H, W, C) -> (..., H/2, W/2, C)``; H and W must be even."""
    _check_choice(down, DOWN_FILTERS, "down")
    _check_image(x)
    h, w = x.shape[-3], x.shape[-2]
    if h % 2 or w % 2:
        raise ValueError(f"downsample needs an even spatial size (H, W), got ({h}, {w})")
    # The weights are dyadic fractions, exact in every float dtype including bfloat16.
    m_h, m_w = (jnp.asarray(_down_matrix(n, down), x.dtype) for n in (h, w))
    return _apply_separable(x, m_h, m_w)


def _up_matrices(x, up):
    return tuple(jnp.asarray(_up_matrix(n, up), x.dtype) for n in (x.shape[-3], x.shape[-2]))


def upsample(x: jax.Array, up: str = "bilinear") -> jax.Array:
    """2x upsample: ``(..., h, w, C) -> (..., 2h, 2w, C)``."""
    _check_choice(up, UP_FILTERS, "up")
    _check_image(x)
    return _apply_separable(x, *_up_matrices(x, up))


@jax.jit
def _add_upsampled(base, coarse, m_h, m_w, sign):
    """``base + sign * Up(coarse)``: one program for both the residual and the reconstruction step
    (fewer, larger programs compile faster when called eagerly; negation is exact)."""
    return base + sign * _apply_separable(coarse, m_h, m_w)


# --- pyramid ----------------------------------------------------------------------------------


def decompose(
    x: jax.Array, levels: int, *, down: str = "area", up: str = "bilinear"
) -> list[jax.Array]:
    """Laplacian pyramid of ``x`` (..., H, W, C), finest first.

    Returns ``levels`` arrays; entry k has shape ``(..., H / 2**k, W / 2**k, C)``. Entries
    ``0..L-2`` are residuals ``g_k - Up(g_{k+1})``, the last is the low-pass ``g_{L-1}``.
    ``levels = 1`` returns ``[x]``. ``levels``, ``down`` and ``up`` must be static under jit.
    """
    _check_choice(down, DOWN_FILTERS, "down")
    _check_choice(up, UP_FILTERS, "up")
    _check_image(x)
    scale_shapes(x.shape[-3], x.shape[-2], levels)
    gaussians = [x]
    for _ in range(levels - 1):
        gaussians.append(downsample(gaussians[-1], down))
    minus = jnp.asarray(-1, x.dtype)
    residuals = [
        _add_upsampled(g, g_next, *_up_matrices(g_next, up), minus)
        for g, g_next in zip(gaussians[:-1], gaussians[1:])
    ]
    return residuals + [gaussians[-1]]


def reconstruct(residuals: Sequence[jax.Array], *, up: str = "bilinear") -> jax.Array:
    """Inverse of ``decompose``: ``r_{L-1} = x^(L-1)``, ``r_k = x^(k) + Up(r_{k+1})``; returns r_0.

    ``residuals`` is finest first; entry k must have shape ``(..., H / 2**k, W / 2**k, C)``. Use the
    same ``up`` as ``decompose`` (the ``down`` filter does not matter here).
    """
    _check_choice(up, UP_FILTERS, "up")
    if isinstance(residuals, (str, bytes)) or not isinstance(residuals, Sequence) or not residuals:
        raise ValueError(
            f"residuals must be a non-empty list of arrays, finest first, got {type(residuals)}"
        )
    for k, r in enumerate(residuals):
        _check_image(r, f"residuals[{k}]")
        if r.dtype != residuals[0].dtype:
            raise ValueError(
                f"residuals[{k}] has dtype {r.dtype} but residuals[0] has {residuals[0].dtype}: "
                "all scales must share one dtype"
            )
    for k in range(len(residuals) - 1):
        fine, coarse = residuals[k].shape, residuals[k + 1].shape
        expected = (*coarse[:-3], 2 * coarse[-3], 2 * coarse[-2], coarse[-1])
        if tuple(fine) != expected:
            raise ValueError(
                f"residuals[{k}] has shape {tuple(fine)} but residuals[{k + 1}] has shape "
                f"{tuple(coarse)}: each scale must be exactly 2x the next coarser one, expected "
                f"{expected}"
            )
    out = residuals[-1]
    plus = jnp.asarray(1, out.dtype)
    for r in reversed(residuals[:-1]):
        out = _add_upsampled(r, out, *_up_matrices(out, up), plus)
    return out


# --- per-scale normalisation --------------------------------------------------------------------


def _check_sigmas(residuals, sigmas):
    if isinstance(residuals, (str, bytes)) or not isinstance(residuals, Sequence):
        raise ValueError(f"residuals must be a list of arrays, finest first, got {type(residuals)}")
    if len(sigmas) != len(residuals):
        raise ValueError(
            f"sigmas has {len(sigmas)} entries but residuals has {len(residuals)} scales; "
            "expected one sigma per scale, finest first"
        )
    for k, s in enumerate(sigmas):
        if isinstance(s, jax.core.Tracer):
            continue  # traced (e.g. from a checkpointed state): cannot check values here.
        value = np.asarray(s)
        if value.ndim != 0 or not np.isfinite(value) or value <= 0:
            raise ValueError(f"sigmas[{k}] must be a finite positive scalar, got {s!r}")


def normalize(residuals: Sequence[jax.Array], sigmas: Sequence[float]) -> list[jax.Array]:
    """Divides scale k by ``sigmas[k]`` (one scalar per scale, finest first); keeps dtypes."""
    _check_sigmas(residuals, sigmas)
    return [r / jnp.asarray(s, dtype=r.dtype) for r, s in zip(residuals, sigmas)]


def denormalize(residuals: Sequence[jax.Array], sigmas: Sequence[float]) -> list[jax.Array]:
    """Multiplies scale k by ``sigmas[k]``: the inverse of ``normalize``; keeps dtypes."""
    _check_sigmas(residuals, sigmas)
    return [r * jnp.asarray(s, dtype=r.dtype) for r, s in zip(residuals, sigmas)]


def measure_sigmas(
    x: jax.Array,
    levels: int,
    *,
    down: str = "area",
    up: str = "bilinear",
    floor: float = SIGMA_FLOOR,
) -> tuple[float, ...]:
    """Per-scale standard deviation of a batch ``x`` (..., H, W, C), finest first, as host floats.

    Scale k's sigma is the (population, mean-subtracted) std over every element of
    ``decompose(x, levels, down=down, up=up)[k]``: all batch entries, pixels and channels pooled,
    computed in float64 on the host. Values below ``floor`` are raised to ``floor`` so that
    ``normalize`` never divides by ~0 (e.g. the residuals of flat images). Host-side: call once on
    a representative batch, not inside jit.
    """
    if not (isinstance(floor, (int, float)) and np.isfinite(floor) and floor > 0):
        raise ValueError(f"floor must be a finite positive float, got {floor!r}")
    residuals = decompose(jnp.asarray(x), levels, down=down, up=up)
    return tuple(
        max(float(np.std(np.asarray(r, dtype=np.float64))), float(floor)) for r in residuals
    )

"""InceptionV3 features for FID, sFID and the Inception Score, as the standard evaluators compute them.

The network is pytorch-fid's `fid_inception_v3`: torchvision's InceptionV3 with the FID patches
(FIDInceptionA/C/E_1 average-pool without counting the zero padding, FIDInceptionE_2 max-pools in
its pool branch, 1008 classes), ported to Flax NNX in NHWC; its weights are the 2015-12-05
TensorFlow graph's (classify_image_graph_def.pb, which ADM's evaluator and TTUR load), converted
by pytorch-fid. Outputs (`embed`), as ADM's evaluator (guided-diffusion evaluations/evaluator.py)
takes them from that graph:

  pool     [N, 2048]  the global average pool after Mixed_7c (graph: pool_3): FID, precision/recall
  spatial  [N, 2023]  the first 7 channels of Mixed_6d.branch1x1 (graph: mixed_6/conv, after its batch
                      norm and ReLU), 17x17x7 flattened in (h, w, c) order: sFID
  logits   [N, 1008]  pool @ fc weight, without the bias (graph: softmax/logits/MatMul): Inception Score

Preprocessing (`preprocess`, from uint8 pixels), config.eval.inception_preprocessing:
  "tensorflow"   the graph's own: bilinear resize to 299x299 as TensorFlow 1's ResizeBilinear
                 (align_corners=False, no half-pixel centres: source = output index * in / out) on
                 0..255 pixels, then (x - 128) / 128. ADM, TTUR and torch-fidelity compute FID this way.
  "pytorch_fid"  pytorch-fid's: F.interpolate(bilinear, align_corners=False) and 2 x / 255 - 1.
The two differ by a fraction of a pixel level after the resize (docs/evaluation.md has the
measured numbers against TensorFlow's own resize).

Weights: the FID network weights are not shipped with any installable package and nothing here
downloads them. Get the file once on a machine with internet access,

    wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

and pass its local path to `load_fid_inception`. It is read with the restricted reader in
`torch_weights` (no torch, no general unpickler). torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` uses the same module names and shapes, so it should
load too (not checked against the real file here).

API:
  InceptionV3(rngs)                      the NNX module; __call__(x [N,299,299,3] in [-1,1]) -> [N,2048]
  convert_state_dict(state_dict, model=None) -> InceptionV3 filled with the torch weights
  load_fid_inception(path) -> InceptionV3
  preprocess(pixels [N,H,W,1|3] uint8 or 0..255 floats, mode) -> [N,299,299,3] network input
  embed(model, pixels, mode) -> {"pool", "spatial", "logits"} (jittable, one batch)
  fid_features(model, images, batch_size=50) -> np.ndarray [N, 2048] float32 (pytorch-fid's route)
  resize_bilinear(images, height, width, antialias=False) -> resized NHWC images (torch's rule)
  resize_bilinear_tf1(images, height, width) -> resized NHWC images (TensorFlow 1's rule)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lapflow_jax.metrics import with_progress
from lapflow_jax.evaluation.torch_weights import assign_torch_state_dict, load_torch_state_dict

INPUT_SIZE = 299
FEATURE_DIM = 2048
SPATIAL_CHANNELS = 7                              # ADM: spatial[..., :7] of mixed_6/conv
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS          # 2023
NUM_LOGITS = 1008
PREPROCESSING = ("tensorflow", "pytorch_fid")
# FID compares against float32 reference statistics: keep TPU matmuls/convs out of bfloat16 passes.
_PRECISION = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Resizing exactly like torch.nn.functional.interpolate(mode="bilinear", align_corners=False).


@functools.lru_cache(maxsize=64)
def _resize_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
    """[out_size, in_size] float32 matrix M with resized = M @ signal along one axis.

    Without antialias: torch's bilinear rule (half-pixel centres, source index clamped to the
    edge), with torch's float32 index arithmetic so that weights match to the last bit. With
    antialias and downsampling: the triangle filter stretched by the scale, as in torch's
    antialias=True (PIL's rule); for upsampling both coincide.
    """
    f32, f64 = np.float32, np.float64
    scale = f32(in_size) / f32(out_size)
    matrix = np.zeros((out_size, in_size), np.float64)
    if antialias and in_size > out_size:
        # Mirrors torch's _compute_indices_min_size_weights_aa, float32 where torch uses float.
        support = scale
        invscale = f32(1.0 / f64(scale))
        for i in range(out_size):
            centre = f32(f64(scale) * (i + 0.5))
            lo = max(int(f64(f32(centre - support)) + 0.5), 0)
            hi = min(int(f64(f32(centre + support)) + 0.5), in_size)
            j = np.arange(lo, hi)
            x = (f64(1) * (j.astype(f32) - centre) + 0.5) * f64(invscale)
            w = np.maximum(f32(0), f32(1) - np.abs(x.astype(f32)))
            total = f32(0)
            for wk in w:  # sequential float32 sum, as torch accumulates
                total = f32(total + wk)
            if total != 0:
                matrix[i, j] = w / total
        return matrix.astype(np.float32)
    src = np.maximum(scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, i0), 1.0 - frac)
    np.add.at(matrix, (rows, i1), frac)
    return matrix.astype(np.float32)


def resize_bilinear(images: jax.Array, height: int, width: int, antialias: bool = False) -> jax.Array:
    """Bilinear resize of NHWC images, matching torch's F.interpolate(align_corners=False).

    Args:
      images: [N, H, W, C] float.
      height, width: output size.
      antialias: as torch's `antialias` flag (only changes downsampling).
    Returns:
      [N, height, width, C] float32.
    """
    images = jnp.asarray(images, jnp.float32)
    n, h, w, c = images.shape
    if (h, w) == (height, width):
        return images
    rows = jnp.asarray(_resize_matrix(h, height, antialias))
    cols = jnp.asarray(_resize_matrix(w, width, antialias))
    out = jnp.einsum("oh,nhwc->nowc", rows, images, precision=_PRECISION)
    return jnp.einsum("pw,nowc->nopc", cols, out, precision=_PRECISION)


@functools.lru_cache(maxsize=64)
def _tf1_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 matrix of TensorFlow 1's ResizeBilinear along one axis, with
    align_corners=False and half_pixel_centers=False (the graph's op): source = i * (in / out) in
    float32, lower = floor, upper = min(ceil, in - 1), weight of upper = source - lower
    (tensorflow/core/kernels/image_resizer_state.h, resize_bilinear_op.cc)."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = np.arange(out_size, dtype=f32) * scale
    lower = np.floor(src).astype(np.int64)
    upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    frac = (src - lower.astype(f32)).astype(np.float64)
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lower), 1.0 - frac)
    np.add.at(matrix, (rows, upper), frac)
    return matrix.astype(np.float32)


def resize_bilinear_tf1(images: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of NHWC images as TensorFlow 1's tf.image.resize_bilinear (align_corners=False):
    the resize inside the FID Inception graph. [N, H, W, C] float -> [N, height, width, C] float32.

    Same weights as TensorFlow's kernel; the sum is a matrix product here and two lerps there, so
    values agree to float32 rounding (measured in docs/evaluation.md)."""
    images = jnp.asarray(images, jnp.float32)
    _, h, w, _ = images.shape
    if (h, w) == (height, width):
        return images
    rows = jnp.asarray(_tf1_resize_matrix(h, height))
    cols = jnp.asarray(_tf1_resize_matrix(w, width))
    out = jnp.einsum("oh,nhwc->nowc", rows, images, precision=_PRECISION)
    return jnp.einsum("pw,nowc->nopc", cols, out, precision=_PRECISION)


def preprocess(pixels: jax.Array, mode: str = "tensorflow") -> jax.Array:
    """Pixels [N, H, W, 3 or 1] (uint8, or floats on the 0..255 scale) -> the network's input
    [N, 299, 299, 3] float32 in about [-1, 1]; gray is repeated to RGB. `mode`: PREPROCESSING."""
    x = jnp.asarray(pixels).astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if mode == "tensorflow":
        # The graph: ResizeBilinear of the 0..255 image, Sub 128, Mul 1/128 (exact in float32).
        return (resize_bilinear_tf1(x, INPUT_SIZE, INPUT_SIZE) - 128.0) * (1.0 / 128.0)
    if mode == "pytorch_fid":
        # pytorch-fid resizes [0, 1] images and maps them to [-1, 1]; both steps are affine per
        # pixel, so resizing the [-1, 1] image gives the same numbers.
        return resize_bilinear(x / 127.5 - 1.0, INPUT_SIZE, INPUT_SIZE)
    raise ValueError(f"Inception preprocessing {mode!r} is not one of {PREPROCESSING}.")


def embed(model: "InceptionV3", pixels: jax.Array, mode: str = "tensorflow") -> dict[str, jax.Array]:
    """One batch of pixels [N, H, W, 1|3] (uint8 or 0..255) -> {"pool" [N, 2048], "spatial" [N, 2023],
    "logits" [N, 1008]} float32 (see the module docstring). Pure and jittable."""
    pool, spatial = model.features(preprocess(pixels, mode))
    return {"pool": pool, "spatial": spatial, "logits": model.unbiased_logits(pool)}


# ----------------------------------------------------------------------------------------------
# Layers. Attribute names mirror torchvision / pytorch-fid so that torch keys map one to one.


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, *, rngs):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(
            in_channels,
            out_channels,
            _pair(kernel_size),
            strides=_pair(stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=_PRECISION,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(out_channels, use_running_average=True, epsilon=1e-3, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def _max_pool(x, window: int, stride: int, padding: int = 0):
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), pad
    )


def _avg_pool_3x3_exclude_pad(x):
    """3x3 stride-1 average pool whose border windows average only the real pixels.

    That is TensorFlow's behaviour, which pytorch-fid reproduces with count_include_pad=False.
    """
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    dims, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pad)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strides, pad)
    return total / count


class InceptionA(nnx.Module):
    """pytorch-fid's FIDInceptionA (35x35 grid)."""

    def __init__(self, in_channels, pool_features, *, rngs):
        self.branch1x1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """torchvision's InceptionB (35x35 -> 17x17 reduction), unchanged in pytorch-fid."""

    def __init__(self, in_channels, *, rngs):
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, _max_pool(x, 3, 2)], axis=-1)


class InceptionC(nnx.Module):
    """pytorch-fid's FIDInceptionC (17x17 grid, factorised 7x7 convolutions)."""

    def __init__(self, in_channels, channels_7x7, *, rngs):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """torchvision's InceptionD (17x17 -> 8x8 reduction), unchanged in pytorch-fid."""

    def __init__(self, in_channels, *, rngs):
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):
    """pytorch-fid's FIDInceptionE_1 (pool="avg") and FIDInceptionE_2 (pool="max"), 8x8 grid.

    The max pool in the last block copies a quirk of TensorFlow's FID graph.
    """

    def __init__(self, in_channels, pool: str, *, rngs):
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE: pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = _avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else _max_pool(x, 3, 1, 1)
        bp = self.branch_pool(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nnx.Module):
    """pytorch-fid's FID InceptionV3 up to the 2048-d pool3 features (NHWC).

    __call__(x): x [N, 299, 299, 3] float32 already in [-1, 1] -> [N, 2048]. Use `fid_features`
    for any input size; it resizes first. `fc` (2048 -> 1008) is kept so the whole state dict
    converts, and for `logits`.

    Building it eagerly with random weights compiles one initialiser per layer shape (minutes on
    a small CPU); `load_fid_inception` / `convert_state_dict` build it abstractly instead.
    """

    def __init__(self, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)
        self.fc = nnx.Linear(2048, 1008, precision=_PRECISION, rngs=rngs)

    def __call__(self, x):
        return self.features(x)[0]

    def features(self, x):
        """x [N, 299, 299, 3] network input -> (pool [N, 2048], spatial [N, 17 * 17 * 7])."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool(x, 3, 2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = _max_pool(x, 3, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        # ADM's sFID layer, mixed_6/conv: Mixed_6d's 1x1 branch (the block computes it again; XLA
        # merges the two identical convolutions).
        spatial = self.Mixed_6d.branch1x1(x)[..., :SPATIAL_CHANNELS]
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return jnp.mean(x, axis=(1, 2)), spatial.reshape(spatial.shape[0], -1)

    def logits(self, features):
        """[N, 2048] pool3 features -> [N, 1008] class logits (the graph's softmax/logits, with bias)."""
        return self.fc(features)

    def unbiased_logits(self, features):
        """[N, 2048] pool3 features -> pool @ W [N, 1008]: the logits ADM's and improved-GAN's
        Inception Score take (softmax/logits/MatMul, no bias; torch-fidelity's logits_unbiased)."""
        return jnp.dot(features, self.fc.kernel[...], precision=_PRECISION)


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray], model: InceptionV3 | None = None
) -> InceptionV3:
    """Fills an InceptionV3 with pytorch-fid's torch weights.

    Args:
      state_dict: torch name -> array (torchvision Inception3 names, e.g.
        "Mixed_5b.branch1x1.conv.weight"), from `load_torch_state_dict` or a torch module's
        state_dict converted to numpy. AuxLogits entries (absent in the FID weights) are ignored.
      model: model to fill in place; a new one when None.
    Returns:
      the filled model.
    Raises:
      KeyError / ValueError: a missing, unexpected or mis-shaped tensor (named in the message).
    """
    if model is None:
        # Abstract shapes only: eager random init compiles one initialiser per layer shape
        # (minutes on a small CPU) for values that are overwritten right away.
        model = nnx.eval_shape(lambda: InceptionV3(nnx.Rngs(0)))
    kept = {k: v for k, v in state_dict.items() if not k.startswith("AuxLogits.")}
    assign_torch_state_dict(model, kept)
    return model


def load_fid_inception(path: str | os.PathLike) -> InceptionV3:
    """Builds the FID InceptionV3 from the pt_inception-2015-12-05-6726825d.pth file.

    `path` is local or a URL (gs://bucket/weights/pt_inception-....pth): a remote file is copied
    once to $LAPFLOW_CACHE (default ~/.cache/lapflow) by storage.local_file.
    """
    from lapflow_jax import storage  # pylint: disable=import-outside-toplevel

    if storage.is_remote(path):
        try:
            path = storage.local_file(path)
        except FileNotFoundError:
            path = os.fspath(path)  # reported below, by its URL
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"load_fid_inception: no weight file at {os.fspath(path)!r}; download"
            " pt_inception-2015-12-05-6726825d.pth (see lapflow_jax/evaluation/inception.py)"
        )
    return convert_state_dict(load_torch_state_dict(path))


@nnx.jit
def _pool3(model: InceptionV3, images: jax.Array) -> jax.Array:
    return model(images)


def fid_features(model: InceptionV3, images, batch_size: int = 50) -> np.ndarray:
    """Pool3 features of images, preprocessed as pytorch-fid does.

    Args:
      model: an InceptionV3 (e.g. from `load_fid_inception`).
      images: [N, H, W, 3] (or [N, H, W, 1], repeated to RGB) float in [-1, 1], any H and W.
      batch_size: images per network call; the last batch is padded so one compiled shape serves.
    Returns:
      [N, 2048] float32 numpy array.
    """
    # pytorch-fid resizes [0, 1] images and then maps them to [-1, 1]; both steps are affine per
    # pixel, so resizing the [-1, 1] images gives the same numbers.
    return batched_features(lambda x: _pool3(model, resize_bilinear(x, INPUT_SIZE, INPUT_SIZE)), images,
                            batch_size=batch_size, feature_dim=FEATURE_DIM, name="fid_features")


def batched_features(embed, images, *, batch_size: int, feature_dim: int, name: str) -> np.ndarray:
    """Runs `embed` ([B, H, W, 3] float32 in [-1, 1] -> [B, D]) over images in fixed-size batches.

    Checks images are [N, H, W, 1 or 3] floats in [-1, 1] (errors name `name`), repeats gray to RGB
    and pads the last batch, so one compiled shape serves every call. Returns [N, D] float32.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: images must be [N, H, W, 3] or [N, H, W, 1], got {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{name}: images must be float in [-1, 1], got dtype {images.dtype}")
    if images.size and (images.min() < -1.001 or images.max() > 1.001):
        raise ValueError(f"{name}: images must lie in [-1, 1], got range [{images.min()}, {images.max()}]")
    if batch_size < 1:
        raise ValueError(f"{name}: batch_size must be >= 1, got {batch_size}")
    n = images.shape[0]
    out = np.zeros((n, feature_dim), np.float32)
    starts = range(0, n, batch_size)
    for start in with_progress(starts, f"eval: {name}", total=len(starts), items_per_batch=batch_size):
        batch = images[start : start + batch_size].astype(np.float32)
        count = batch.shape[0]
        if count < batch_size and n > batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - count,) + batch.shape[1:], np.float32)])
        if batch.shape[-1] == 1:
            batch = np.repeat(batch, 3, axis=-1)
        out[start : start + count] = np.asarray(embed(batch))[:count]
    return out

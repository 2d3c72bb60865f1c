"""Latent mode: the AutoencoderKL (f = 8, 4 channels) of SD-VAE and EQ-VAE in Flax NNX.

The model is a port of diffusers' ``AutoencoderKL`` with the same structure, hyperparameters and
parameter names, so a diffusers checkpoint folder (``config.json`` +
``diffusion_pytorch_model.safetensors``) converts by renaming leaves and fixing layouts:

    model, config = load_diffusers_vae("/path/to/sd-vae-ft-mse")
    z = model.to_latent(x, rng)          # x: (B, H, W, 3) in [-1, 1] -> (B, H/8, W/8, 4), scaled
    x_hat = model.from_latent(z)         # -> (B, H, W, 3), roughly in [-1, 1]
    save_converted(model, config, "/path/to/converted")   # Orbax; reloads without torch names
    model, config = load_converted("/path/to/converted")

Arrays are NHWC. Parameters are always float32; ``dtype`` sets the compute dtype (bfloat16 on
TPU), while normalisation statistics and the attention softmax stay in float32, as diffusers'
``upcast_softmax`` does. Outputs of ``encode``/``decode`` are float32 whatever the compute dtype.
On TPU, float32 matmuls and convolutions run at XLA's default (reduced) precision unless
``jax_default_matmul_precision`` says otherwise.

Foreign weights are read only through safetensors' numpy API (never pickle).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
# diffusers clamps the posterior log-variance to this range before using it.
LOGVAR_RANGE = (-30.0, 20.0)
# Our converted-checkpoint layout: the config beside an Orbax tree of float32 parameters.
CONVERTED_CONFIG_NAME = "autoencoder_config.json"
CONVERTED_PARAMS_DIR = "params"
CONVERTED_FORMAT = "lapflow_jax.autoencoder_kl.v1"

# Fields a diffusers AutoencoderKL config.json must state: the architecture is undefined without
# them. Every other field falls back to diffusers' own constructor default (below), as
# diffusers does itself; early SD-VAE configs, for example, carry no scaling_factor.
_REQUIRED_FIELDS = (
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "down_block_types",
    "up_block_types",
)
_DIFFUSERS_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
_ACTIVATIONS = ("silu", "swish")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """Hyperparameters of an AutoencoderKL, named as in diffusers' ``config.json``.

    The defaults are SD-VAE's (stabilityai/sd-vae-ft-mse); EQ-VAE has the same architecture.
    ``sample_size`` is informational (the training resolution): the model runs on any H, W
    divisible by ``downsample_factor``.
    """

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    norm_num_groups: int = 32
    down_block_types: tuple[str, ...] = DOWN_BLOCK_TYPES * 4
    up_block_types: tuple[str, ...] = UP_BLOCK_TYPES * 4
    act_fn: str = "silu"
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    sample_size: int | tuple[int, ...] = 256
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        # Lists from JSON become tuples so the config is hashable (a static jit/NNX attribute).
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        self.validate()

    @property
    def downsample_factor(self) -> int:
        """Spatial factor between an image and its latent (8 for SD-VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self, source: str = "AutoencoderKLConfig") -> None:
        """Raises ValueError naming ``source`` unless this describes a supported AutoencoderKL."""
        problems = []
        channels = self.block_out_channels
        if not channels or not all(isinstance(c, int) and c > 0 for c in channels):
            problems.append(f"block_out_channels must be positive ints, got {channels!r}")
        for name in ("layers_per_block", "in_channels", "out_channels", "latent_channels",
                     "norm_num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive int, got {value!r}")
        bad_down = [t for t in self.down_block_types if t not in DOWN_BLOCK_TYPES]
        bad_up = [t for t in self.up_block_types if t not in UP_BLOCK_TYPES]
        if bad_down:
            problems.append(
                f"unsupported down_block_types {bad_down} (supported: {DOWN_BLOCK_TYPES})")
        if bad_up:
            problems.append(f"unsupported up_block_types {bad_up} (supported: {UP_BLOCK_TYPES})")
        if not (len(self.down_block_types) == len(self.up_block_types) == len(channels)):
            problems.append(
                f"down_block_types ({len(self.down_block_types)}), up_block_types "
                f"({len(self.up_block_types)}) and block_out_channels ({len(channels)}) must have "
                "the same length")
        if self.act_fn not in _ACTIVATIONS:
            problems.append(f"unsupported act_fn {self.act_fn!r} (supported: {_ACTIVATIONS})")
        groups = self.norm_num_groups
        if isinstance(groups, int) and groups > 0:
            bad = [c for c in channels if isinstance(c, int) and c % groups]
            if bad:
                problems.append(
                    f"norm_num_groups {groups} does not divide block_out_channels {bad}")
        if not isinstance(self.scaling_factor, (int, float)) or self.scaling_factor <= 0:
            problems.append(
                f"scaling_factor must be a positive number, got {self.scaling_factor!r}")
        if self.shift_factor is not None and not isinstance(self.shift_factor, (int, float)):
            problems.append(f"shift_factor must be a number or null, got {self.shift_factor!r}")
        if problems:
            raise ValueError(
                f"{source}: not a supported AutoencoderKL config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> "AutoencoderKLConfig":
        """Builds a config from a diffusers ``config.json`` dict; ``source`` names it in errors.

        Keys diffusers keeps for other purposes (``_diffusers_version``, ``force_upcast``, ...)
        are ignored; a ``_class_name`` other than AutoencoderKL is an error.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        class_name = d.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(
                f"{source}: _class_name is {class_name!r}, expected 'AutoencoderKL' (only the "
                "KL autoencoder of SD-VAE / EQ-VAE is supported)")
        missing = [k for k in _REQUIRED_FIELDS if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required AutoencoderKL fields {missing}")
        for key in ("latents_mean", "latents_std"):
            if d.get(key) is not None:
                raise ValueError(
                    f"{source}: per-channel {key} latent normalisation is not supported "
                    "(only scaling_factor / shift_factor)")
        kwargs = {k: d[k] for k in _REQUIRED_FIELDS}
        for key, default in _DIFFUSERS_DEFAULTS.items():
            kwargs[key] = d.get(key, default)
        try:
            config = cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None
        return config

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "AutoencoderKLConfig":
        """Reads a diffusers ``config.json`` (or one written by ``to_json``)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"AutoencoderKL config not found: {path} (expected a "
                                    "diffusers config.json)")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=path)

    def to_dict(self) -> dict[str, Any]:
        """A diffusers-style config dict (``from_dict`` inverts it)."""
        d = {"_class_name": "AutoencoderKL"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            d[f.name] = list(value) if isinstance(value, tuple) else value
        return d


# --------------------------------------------------------------------------------------------
# Layers (attribute names mirror diffusers' so that parameter paths map one to one)
# --------------------------------------------------------------------------------------------


class ParamInit:
    """Makes float32 parameters: random draws from numpy, or shapes only (``seed=None``).

    numpy rather than jax.random: one jax initializer compiles per distinct shape, which took
    over a minute for SD-VAE on a CPU, and tracing them under ``nnx.eval_shape`` was as slow.
    Shape-only parameters (``jax.ShapeDtypeStruct``) are what the loaders fill in.
    """

    def __init__(self, seed: int | None):
        self._rng = None if seed is None else np.random.default_rng(seed)

    def __call__(self, shape: tuple[int, ...], kind: str, fan_in: int = 1) -> nnx.Param:
        if self._rng is None:
            return nnx.Param(jax.ShapeDtypeStruct(shape, jnp.float32))
        if kind == "ones":
            value = np.ones(shape, np.float32)
        elif kind == "zeros":
            value = np.zeros(shape, np.float32)
        else:  # lecun normal, flax's default for kernels
            value = self._rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)
        return nnx.Param(jnp.asarray(value))


class Conv(nnx.Module):
    """2-D convolution with an HWIO kernel: (B, H, W, cin) -> (B, H', W', cout)."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, padding, dtype,
                 init: ParamInit):
        self.kernel = init((kernel, kernel, cin, cout), "normal", fan_in=cin * kernel * kernel)
        self.bias = init((cout,), "zeros")
        self.stride = stride
        self.padding = tuple(tuple(p) for p in padding)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride,) * 2,
            self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


class Linear(nnx.Module):
    """Dense layer on the last axis: (..., cin) -> (..., cout)."""

    def __init__(self, cin: int, cout: int, *, dtype, init: ParamInit):
        self.kernel = init((cin, cout), "normal", fan_in=cin)
        self.bias = init((cout,), "zeros")
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm(groups, eps 1e-6) over H, W and each group's channels: (B, H, W, C) -> same.

    Statistics in float32 with the two-pass variance torch uses (the one-pass E[x^2] - E[x]^2
    loses digits on the large activations of the decoder); the result is cast to ``dtype``.
    """

    def __init__(self, channels: int, groups: int, *, dtype, init: ParamInit,
                 eps: float = 1e-6):
        self.scale = init((channels,), "ones")
        self.bias = init((channels,), "zeros")
        self.groups = groups
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


def _conv3(cin, cout, *, dtype, init):
    return Conv(cin, cout, 3, padding=((1, 1), (1, 1)), dtype=dtype, init=init)


def _conv1(cin, cout, *, dtype, init):
    return Conv(cin, cout, 1, padding=((0, 0), (0, 0)), dtype=dtype, init=init)


class ResnetBlock(nnx.Module):
    """diffusers' ResnetBlock2D without time embedding: (B, H, W, Cin) -> (B, H, W, Cout)."""

    def __init__(self, cin: int, cout: int, groups: int, *, dtype, init: ParamInit):
        self.norm1 = GroupNorm(cin, groups, dtype=dtype, init=init)
        self.conv1 = _conv3(cin, cout, dtype=dtype, init=init)
        self.norm2 = GroupNorm(cout, groups, dtype=dtype, init=init)
        self.conv2 = _conv3(cout, cout, dtype=dtype, init=init)
        self.conv_shortcut = _conv1(cin, cout, dtype=dtype, init=init) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample(nnx.Module):
    """Stride-2 3x3 conv after padding one row/column at the bottom/right (diffusers' padding=0
    Downsample2D): (B, H, W, C) -> (B, H/2, W/2, C)."""

    def __init__(self, channels: int, *, dtype, init: ParamInit):
        self.conv = Conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype,
                         init=init)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest 2x upsampling then a 3x3 conv: (B, H, W, C) -> (B, 2H, 2W, C)."""

    def __init__(self, channels: int, *, dtype, init: ParamInit):
        self.conv = _conv3(channels, channels, dtype=dtype, init=init)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class AttentionBlock(nnx.Module):
    """Single-head spatial self-attention with a residual (diffusers' mid-block Attention with
    head_dim = channels): (B, H, W, C) -> (B, H, W, C). The softmax runs in float32."""

    def __init__(self, channels: int, groups: int, *, dtype, init: ParamInit):
        self.dtype = dtype
        self.group_norm = GroupNorm(channels, groups, dtype=dtype, init=init)
        linear = lambda: Linear(channels, channels, dtype=dtype, init=init)
        self.to_q, self.to_k, self.to_v = linear(), linear(), linear()
        # A list so that the parameter path reads to_out.0 as in diffusers.
        self.to_out = nnx.List([linear()])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * (c ** -0.5), axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", weights, v)
        out = self.to_out[0](out).reshape(b, h, w, c)
        return x + out


class MidBlock(nnx.Module):
    """resnet -> attention -> resnet at the lowest resolution: (B, h, w, C) -> (B, h, w, C)."""

    def __init__(self, channels: int, groups: int, add_attention: bool, *, dtype, init):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, dtype=dtype, init=init)
                                 for _ in range(2)])
        self.attentions = (nnx.List([AttentionBlock(channels, groups, dtype=dtype, init=init)])
                           if add_attention else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock(nnx.Module):
    """``num_layers`` ResnetBlocks then an optional Downsample (DownEncoderBlock2D)."""

    def __init__(self, cin, cout, num_layers, groups, add_downsample, *, dtype, init):
        self.resnets = nnx.List([
            ResnetBlock(cin if i == 0 else cout, cout, groups, dtype=dtype, init=init)
            for i in range(num_layers)])
        self.downsamplers = (nnx.List([Downsample(cout, dtype=dtype, init=init)])
                             if add_downsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock(nnx.Module):
    """``num_layers`` ResnetBlocks then an optional Upsample (UpDecoderBlock2D)."""

    def __init__(self, cin, cout, num_layers, groups, add_upsample, *, dtype, init):
        self.resnets = nnx.List([
            ResnetBlock(cin if i == 0 else cout, cout, groups, dtype=dtype, init=init)
            for i in range(num_layers)])
        self.upsamplers = (nnx.List([Upsample(cout, dtype=dtype, init=init)])
                           if add_upsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    """(B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels) moments, f = 2^(blocks-1)."""

    def __init__(self, config: AutoencoderKLConfig, *, dtype, init: ParamInit):
        ch, g = config.block_out_channels, config.norm_num_groups
        self.conv_in = _conv3(config.in_channels, ch[0], dtype=dtype, init=init)
        self.down_blocks = nnx.List([
            DownEncoderBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block, g,
                             add_downsample=i < len(ch) - 1, dtype=dtype, init=init)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g, config.mid_block_add_attention, dtype=dtype, init=init)
        self.conv_norm_out = GroupNorm(ch[-1], g, dtype=dtype, init=init)
        self.conv_out = _conv3(ch[-1], 2 * config.latent_channels, dtype=dtype, init=init)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """(B, h, w, latent_channels) -> (B, h*f, w*f, out_channels)."""

    def __init__(self, config: AutoencoderKLConfig, *, dtype, init: ParamInit):
        ch, g = config.block_out_channels, config.norm_num_groups
        rev = tuple(reversed(ch))
        self.conv_in = _conv3(config.latent_channels, rev[0], dtype=dtype, init=init)
        self.mid_block = MidBlock(rev[0], g, config.mid_block_add_attention, dtype=dtype, init=init)
        # The decoder has one more ResnetBlock per level than the encoder, as in diffusers.
        self.up_blocks = nnx.List([
            UpDecoderBlock(rev[max(i - 1, 0)], rev[i], config.layers_per_block + 1, g,
                           add_upsample=i < len(rev) - 1, dtype=dtype, init=init)
            for i in range(len(rev))])
        self.conv_norm_out = GroupNorm(ch[0], g, dtype=dtype, init=init)
        self.conv_out = _conv3(ch[0], config.out_channels, dtype=dtype, init=init)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


# --------------------------------------------------------------------------------------------
# The autoencoder
# --------------------------------------------------------------------------------------------


def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """A draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * N(0, I).

    mean, logvar: (B, h, w, latent_channels); rng: a jax.random key. Returns mean's shape.
    """
    noise = jax.random.normal(rng, mean.shape, dtype=jnp.float32)
    return mean + jnp.exp(0.5 * logvar) * noise


class AutoencoderKL(nnx.Module):
    """The KL autoencoder of SD-VAE / EQ-VAE (diffusers' AutoencoderKL) in NHWC.

    Args:
      config: the hyperparameters (``AutoencoderKLConfig``).
      dtype: compute dtype (float32, or bfloat16 on TPU); parameters stay float32.
      seed: seed of the random initial weights; None builds shape-only parameters
        (``jax.ShapeDtypeStruct``) for a loader to fill (``load_diffusers_vae``,
        ``load_converted``). Trained weights always come from a checkpoint: this model is
        never trained here.
    """

    def __init__(self, config: AutoencoderKLConfig, *, dtype=jnp.float32, seed: int | None = 0):
        if not isinstance(config, AutoencoderKLConfig):
            raise TypeError(f"config must be an AutoencoderKLConfig, got {type(config).__name__}")
        init = ParamInit(seed)
        self.config = config
        self.dtype = jnp.dtype(dtype)
        lat = config.latent_channels
        self.encoder = Encoder(config, dtype=dtype, init=init)
        self.decoder = Decoder(config, dtype=dtype, init=init)
        self.quant_conv = (_conv1(2 * lat, 2 * lat, dtype=dtype, init=init)
                           if config.use_quant_conv else None)
        self.post_quant_conv = (_conv1(lat, lat, dtype=dtype, init=init)
                                if config.use_post_quant_conv else None)

    def _check_spatial(self, x: jax.Array, name: str, channels: int, factor: int) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{name} must be (B, H, W, {channels}) NHWC, got shape {x.shape}")
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"{name}: H and W must be divisible by {factor}, got {x.shape[1:3]}")

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior moments of images.

        x: (B, H, W, in_channels) in [-1, 1], H and W divisible by ``downsample_factor``.
        Returns (mean, logvar), each (B, H/f, W/f, latent_channels) float32, logvar clamped to
        [-30, 20] as diffusers does.
        """
        self._check_spatial(x, "x", self.config.in_channels, self.config.downsample_factor)
        moments = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    @staticmethod
    def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
        """See the module-level ``sample_latent``."""
        return sample_latent(mean, logvar, rng)

    def decode(self, z: jax.Array) -> jax.Array:
        """Images from unscaled latents: (B, h, w, latent_channels) -> (B, h*f, w*f, out_channels)
        float32, roughly in [-1, 1] (not clipped)."""
        self._check_spatial(z, "z", self.config.latent_channels, 1)
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def to_latent(self, x: jax.Array, rng: jax.Array) -> jax.Array:
        """The latent the flow model sees: (sample - shift_factor) * scaling_factor.

        x: (B, H, W, in_channels) in [-1, 1] -> (B, H/f, W/f, latent_channels) float32.
        (shift_factor is 0 for SD-VAE / EQ-VAE.)
        """
        mean, logvar = self.encode(x)
        z = sample_latent(mean, logvar, rng)
        return (z - self._shift) * self.config.scaling_factor

    def from_latent(self, z: jax.Array) -> jax.Array:
        """Inverse of ``to_latent`` then ``decode``: scaled latents -> (B, H, W, out_channels)."""
        return self.decode(z / self.config.scaling_factor + self._shift)

    @property
    def _shift(self) -> float:
        return 0.0 if self.config.shift_factor is None else float(self.config.shift_factor)


# --------------------------------------------------------------------------------------------
# Weights from a diffusers checkpoint folder
# --------------------------------------------------------------------------------------------

# Attention projections of diffusers' deprecated AttentionBlock (saved before diffusers 0.14)
# and the names that replaced them; diffusers renames them the same way on load.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LIST_LIMIT = 20


def _abstract_model(config: AutoencoderKLConfig, dtype) -> AutoencoderKL:
    # Shapes only: drawing SD-VAE's 84M random parameters just to overwrite them is wasted time.
    return AutoencoderKL(config, dtype=dtype, seed=None)


def _torch_name(path: Sequence[Any]) -> str:
    """diffusers' state-dict key of one of our parameters (path from nnx.state)."""
    *parents, leaf = (str(p) for p in path)
    # Conv/Linear "kernel" and GroupNorm "scale" are both torch's "weight".
    leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join([*parents, leaf])


def _to_flax_layout(array: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Torch layout -> ours: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
    if len(target_shape) == 4:
        if array.ndim == 4:
            return np.transpose(array, (2, 3, 1, 0))
    elif len(target_shape) == 2:
        # Some converted LDM checkpoints store the attention projections as 1x1 convs.
        if array.ndim == 4 and array.shape[2:] == (1, 1):
            array = array[:, :, 0, 0]
        if array.ndim == 2:
            return array.T
    return array


def _rename_old_attention_keys(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    renamed = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in _OLD_ATTENTION_NAMES:
            new = ".".join(parts[:-2] + [_OLD_ATTENTION_NAMES[parts[-2]], parts[-1]])
            if new not in tensors:
                key = new
        renamed[key] = value
    return renamed


def _short_list(items: Sequence[str]) -> str:
    items = sorted(items)
    head = ", ".join(items[:_LIST_LIMIT])
    return head + (f", ... ({len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file  # numpy API: no pickle, no torch

    try:
        return load_file(path)
    except TypeError as e:
        if "bfloat16" in str(e):
            raise ValueError(
                f"{path}: holds bfloat16 tensors, which safetensors' numpy reader cannot load; "
                "re-save the VAE in float32 or float16") from None
        raise
    except Exception as e:  # safetensors raises its own error type for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def convert_diffusers_state(tensors: Mapping[str, np.ndarray], config: AutoencoderKLConfig,
                            *, dtype=jnp.float32, source: str = "<state dict>") -> AutoencoderKL:
    """Builds our model from a diffusers AutoencoderKL state dict (name -> numpy array).

    Checks that every parameter is present with the right shape and that no key is left over;
    raises ValueError naming ``source`` with the missing / unexpected / mismatched keys listed.
    """
    tensors = _rename_old_attention_keys(dict(tensors))
    model = _abstract_model(config, dtype)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    missing, mismatched, filled = [], [], []
    used = set()
    for path, variable in flat:
        target = variable.get_value()
        name = _torch_name(path)
        if name not in tensors:
            missing.append(name)
            continue
        used.add(name)
        array = _to_flax_layout(np.asarray(tensors[name]), tuple(target.shape))
        if tuple(array.shape) != tuple(target.shape):
            mismatched.append(f"{name}: checkpoint {tuple(tensors[name].shape)}, expected "
                              f"(torch layout) {_torch_shape(target.shape)}")
            continue
        filled.append((path, jnp.asarray(array, dtype=jnp.float32)))
    unexpected = [k for k in tensors if k not in used]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_short_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_short_list(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_short_list(mismatched)}")
    if problems:
        raise ValueError(
            f"{source}: weights do not match the AutoencoderKL described by its config "
            f"(block_out_channels={list(config.block_out_channels)}, layers_per_block="
            f"{config.layers_per_block}, latent_channels={config.latent_channels}): "
            + "; ".join(problems))
    pure: dict = {}
    for path, array in filled:
        node = pure
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = array
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _torch_shape(shape: Sequence[int]) -> tuple[int, ...]:
    if len(shape) == 4:
        h, w, i, o = shape
        return (o, i, h, w)
    if len(shape) == 2:
        return tuple(reversed(shape))
    return tuple(shape)


def _require_file(folder: str, name: str, what: str) -> str:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        return path
    hint = ""
    if os.path.isdir(os.path.join(folder, "vae")):
        hint = f"; {folder} has a vae/ subfolder: pass {os.path.join(folder, 'vae')}"
    elif os.path.isdir(folder):
        present = sorted(os.listdir(folder))[:10]
        hint = f"; the folder holds {present}"
        if name == SAFETENSORS_NAME and any(p.endswith(".bin") for p in present):
            hint += " (pickled .bin weights are not read: convert them to safetensors)"
    raise FileNotFoundError(f"{what} not found: expected {path}{hint}")


def load_diffusers_vae(path: str | os.PathLike, *, dtype=jnp.float32
                       ) -> tuple[AutoencoderKL, AutoencoderKLConfig]:
    """Loads a diffusers AutoencoderKL folder (``config.json`` + ``{SAFETENSORS_NAME}``).

    path: the VAE folder itself (for a full pipeline, its ``vae/`` subfolder). dtype: compute
    dtype of the returned model (parameters are float32, whatever the file stores).
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"diffusers VAE folder not found: {folder} (expected a folder "
                                f"holding {CONFIG_NAME} and {SAFETENSORS_NAME})")
    config_path = _require_file(folder, CONFIG_NAME, "diffusers VAE config")
    weights_path = _require_file(folder, SAFETENSORS_NAME, "diffusers VAE weights")
    config = AutoencoderKLConfig.from_json(config_path)
    tensors = _read_safetensors(weights_path)
    return convert_diffusers_state(tensors, config, dtype=dtype, source=weights_path), config


# --------------------------------------------------------------------------------------------
# Our converted format (Orbax)
# --------------------------------------------------------------------------------------------


def save_converted(model: AutoencoderKL, config: AutoencoderKLConfig, directory: str | os.PathLike,
                   *, overwrite: bool = False) -> None:
    """Saves the float32 parameters with Orbax plus the config, into ``directory``.

    Writes ``directory/{CONVERTED_CONFIG_NAME}`` and ``directory/{CONVERTED_PARAMS_DIR}/``. Every
    process of a multi-host job must call it. An existing save is an error unless ``overwrite``.
    """
    import orbax.checkpoint as ocp

    if not isinstance(model, AutoencoderKL):
        raise TypeError(f"model must be an AutoencoderKL, got {type(model).__name__}")
    if model.config != config:
        raise ValueError("config does not describe model: save the config the model was built "
                         f"from (model.config={model.config}, config={config})")
    directory = os.path.abspath(os.fspath(directory))
    params_dir = os.path.join(directory, CONVERTED_PARAMS_DIR)
    if os.path.exists(params_dir) and not overwrite:
        raise FileExistsError(f"{params_dir} already exists; pass overwrite=True to replace it")
    os.makedirs(directory, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, params, force=overwrite)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(directory, CONVERTED_CONFIG_NAME), "w") as f:
            json.dump({"format": CONVERTED_FORMAT, "config": config.to_dict()}, f, indent=2)


def load_converted(directory: str | os.PathLike, *, dtype=jnp.float32
                   ) -> tuple[AutoencoderKL, AutoencoderKLConfig]:
    """Loads what ``save_converted`` wrote. dtype: compute dtype of the returned model."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    config_path = os.path.join(directory, CONVERTED_CONFIG_NAME)
    params_dir = os.path.join(directory, CONVERTED_PARAMS_DIR)
    if not os.path.isfile(config_path) or not os.path.isdir(params_dir):
        raise FileNotFoundError(
            f"converted autoencoder not found in {directory}: expected {CONVERTED_CONFIG_NAME} "
            f"and {CONVERTED_PARAMS_DIR}/ written by save_converted")
    with open(config_path) as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or meta.get("format") != CONVERTED_FORMAT:
        raise ValueError(f"{config_path}: not written by save_converted (expected format "
                         f"{CONVERTED_FORMAT!r})")
    config = AutoencoderKLConfig.from_dict(meta["config"], source=config_path)
    model = _abstract_model(config, dtype)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Onto this process's first device: without a sharding Orbax would restore onto the saving
    # job's topology, which a multi-host caching job (jax.distributed) refuses as a mismatch.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local),
                          nnx.to_pure_dict(params))
    restored = ocp.StandardCheckpointer().restore(params_dir, target)
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest), config

"""The mixture-of-transformers (MoT) velocity model over the scales of a Laplacian pyramid.

Each scale is an "expert": it has its own patch embedding, final layer and, in every block, its
own adaLN modulation, QKV and output projections and MLP. Experts' weights are stored stacked
along a leading `scale` axis ([L, ...]) so one parameter holds all scales and shards as one.
Self-attention is global over the tokens of all active scales with block-causal visibility
(fine sees coarse, never the reverse; `attention_mask` "full" or "self" for the paper's
ablations), see `attention.py`. With one scale the model is exactly
DiT (Peebles & Xie 2023) used as a SiT-style velocity model: the single-scale baseline.

Conditioning is DiT's adaLN-Zero on (time embedding + class embedding). Class conditioning
reserves index `num_classes` as the null class for classifier-free guidance.

Parameters carry logical axis names (`scale`, `embed`, `mlp`, `heads`, `qkv`, `modulation`,
`patch`, `vocab`, and `layers` when scanned); `parallel.py` maps them to mesh axes in one place.
The key activations are pinned by logical names too (`parallel.constrain`: batch over 'data',
heads and MLP hidden over 'model'), a no-op outside a training mesh.

Memory and compile time: `remat` recomputes each block's activations in the backward pass under
a policy (`REMAT_POLICIES`); `scan_layers` stores the blocks' weights stacked along a leading
`layers` axis ([depth, L, ...], the per-scale experts stacked inside) and runs them with one
`lax.scan`, so XLA compiles one block instead of `depth` copies. `stack_blocks`/`unstack_blocks`
convert parameters between the two layouts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lapflow_jax import parallel, paths
from lapflow_jax.models import attention

# DiT's 256-wide sinusoidal frequency embedding of the time before its MLP.
TIME_FREQUENCY_DIM = 256

# Activation checkpointing of each block: what the forward pass keeps for the backward pass.
# "none": everything (no recomputation); "full": only the block inputs (recompute the block);
# "dots": matmul outputs; "dots_no_batch": matmul outputs without batch dims, i.e. the weight
# matmuls' outputs but not the attention logits (MaxText's "minimal").
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Logical names of the key activations (see parallel.ACTIVATION_RULES).
TOKENS = ("activation_batch", "activation_length", "activation_embed")
HEADS = ("activation_batch", "activation_length", "activation_heads", None)
HIDDEN = ("activation_batch", "activation_length", "activation_mlp")


def _param(init, axes, rngs: nnx.Rngs, shape) -> nnx.Param:
    """A float32 parameter carrying logical axis names. It is never sharded on creation: the
    logical names are mapped to a mesh in one place (parallel.py), after the model exists."""
    with nnx.use_eager_sharding(False):
        return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, jnp.float32))


def _layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters (DiT), computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class ScaleDense(nnx.Module):
    """One dense layer per scale, stored stacked: kernel [L, in, out], bias [L, out]."""

    def __init__(self, num_scales: int, in_features: int, out_features: int, axes: tuple[str, str], *,
                 zero_init: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        # Fans come from the last two axes: each scale's slice is initialised like its own layer.
        init = (nnx.initializers.zeros_init() if zero_init else
                nnx.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,)))
        self.kernel = _param(init, ("scale",) + axes, rngs, (num_scales, in_features, out_features))
        self.bias = _param(nnx.initializers.zeros_init(), ("scale", axes[1]), rngs, (num_scales, out_features))
        self.axes = axes
        self.dtype = dtype

    def __call__(self, x: jax.Array, scale: int) -> jax.Array:
        # All scales' kernels gathered at once: each scale's slice is used by every stage that has
        # that scale, and they share this one copy.
        kernel = parallel.gathered(self.kernel[...], ("scale",) + self.axes, self.dtype)[scale]
        return jnp.dot(x.astype(self.dtype), kernel) + self.bias[scale].astype(self.dtype)


class Dense(nnx.Module):
    """A shared (not per-scale) dense layer with logical axis names."""

    def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], *, init=None,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        init = init or nnx.initializers.normal(0.02)
        self.kernel = _param(init, axes, rngs, (in_features, out_features))
        self.bias = _param(nnx.initializers.zeros_init(), (axes[1],), rngs, (out_features,))
        self.axes = axes
        self.dtype = dtype

    def __call__(self, x):
        kernel = parallel.gathered(self.kernel[...], self.axes, self.dtype)
        return jnp.dot(x.astype(self.dtype), kernel) + self.bias[...].astype(self.dtype)


def timestep_embedding(t: jax.Array, dim: int = TIME_FREQUENCY_DIM, max_period: float = 10000.0) -> jax.Array:
    """DiT's sinusoidal embedding: t [B] -> [B, dim] as (cos, sin) halves."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_positions(grid: int, reference_grid: int, dim: int) -> np.ndarray:
    """2-D sin-cos embedding of patch centres in a shared [0, 1]^2 plane.

    A coarse patch and the fine patches covering the same region get nearby positions. Coordinates
    are measured in units of the finest grid's patches (reference_grid), so the finest scale sees
    DiT's frequencies. Returns [grid * grid, dim], row-major over (row, col).
    """
    centres = (np.arange(grid, dtype=np.float64) + 0.5) / grid * reference_grid
    rows, cols = np.meshgrid(centres, centres, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)

    def embed(coord):
        angles = coord.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([embed(rows), embed(cols)], axis=1).astype(np.float32)


def patchify(x: jax.Array, patch: int) -> jax.Array:
    """[B, h, w, c] -> [B, (h/p)*(w/p), p*p*c]."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: jax.Array, patch: int, h: int, w: int, c: int) -> jax.Array:
    """[B, (h/p)*(w/p), p*p*c] -> [B, h, w, c]."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // patch, w // patch, patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


@dataclasses.dataclass(frozen=True)
class StageRows:
    """Which rows a scale's token array holds when several training stages run in one pass.

    Stage i (firsts[i] its finest scale, sizes[i] its rows) has scales firsts[i]..L-1. Inside the
    model, scale k's tokens are one array: the rows of every stage that has scale k, joined with
    `paths.join_stages` (interleaved, so the join stays on each data device). Every per-scale
    layer then runs once per scale, and each weight's gradient is one sum over all rows: one
    reduction per weight under data parallelism or FSDP, not one per (stage, scale). Only
    attention, where a stage's tokens see only their own sample's scales, splits the rows by stage.
    """

    firsts: tuple[int, ...]
    sizes: tuple[int, ...]
    num_scales: int

    @property
    def scales(self) -> range:
        return range(min(self.firsts), self.num_scales)

    def members(self, k: int) -> list[int]:
        """The stages that have scale k."""
        return [i for i, first in enumerate(self.firsts) if first <= k]

    def join(self, k: int, by_stage) -> jax.Array:
        """by_stage[i]: stage i's rows of scale k (a list or dict over stages) -> scale k's array."""
        return paths.join_stages([by_stage[i] for i in self.members(k)])

    def split(self, k: int, x: jax.Array) -> dict[int, jax.Array]:
        """Scale k's array -> {stage: its rows}."""
        members = self.members(k)
        return dict(zip(members, paths.split_stages(x, [self.sizes[i] for i in members])))


class MoTBlock(nnx.Module):
    """A DiT block whose every weight is per scale, with block-causal global attention."""

    def __init__(self, num_scales: int, hidden: int, num_heads: int, mlp_ratio: float, *,
                 attention_backend: str, attention_mask: str = "block_causal", dtype, rngs: nnx.Rngs):
        mlp_hidden = int(hidden * mlp_ratio)
        self.num_heads = num_heads
        self.attention_backend = attention_backend
        self.attention_mask = attention_mask
        self.adaln = ScaleDense(num_scales, hidden, 6 * hidden, ("embed", "modulation"), zero_init=True, dtype=dtype,
                                rngs=rngs)
        self.qkv = ScaleDense(num_scales, hidden, 3 * hidden, ("embed", "qkv"), dtype=dtype, rngs=rngs)
        self.out = ScaleDense(num_scales, hidden, hidden, ("heads", "embed"), dtype=dtype, rngs=rngs)
        self.mlp_in = ScaleDense(num_scales, hidden, mlp_hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.mlp_out = ScaleDense(num_scales, mlp_hidden, hidden, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def over_rows(self, xs: Sequence[jax.Array], conds: Sequence[jax.Array], rows: StageRows) -> list[jax.Array]:
        """The block over several stages at once. xs[j], conds[j]: scale rows.scales[j]'s tokens
        [B_k, N_k, D] and conditioning [B_k, D], every stage that has the scale joined (`StageRows`).
        The per-scale layers run on the joined rows; attention per stage. Returns xs' layout."""

        def project(k, x, cond):
            x = parallel.constrain(x, TOKENS)
            mod = self.adaln(jax.nn.silu(cond), k)
            shift, scale = jnp.split(mod, 6, axis=-1)[:2]
            qkv = self.qkv(_modulate(_layer_norm(x), shift, scale), k)
            b, n, _ = qkv.shape
            # Head-major columns (head, q/k/v, head_dim): a contiguous slice of the 3*hidden axis
            # holds whole heads' q, k and v, so column-parallel QKV over 'model' gives each device
            # its own heads with no resharding (Megatron).
            qkv = qkv.reshape(b, n, self.num_heads, 3, -1)
            return [parallel.constrain(qkv[:, :, :, i], HEADS) for i in range(3)], mod

        scales = rows.scales
        projected = [project(k, x, cond) for k, x, cond in zip(scales, xs, conds)]
        qkv_by_stage = [[rows.split(k, a) for a in qkv] for k, (qkv, _) in zip(scales, projected)]
        attended = {k: {} for k in scales}
        for i, first in enumerate(rows.firsts):
            own = [qkv_by_stage[k - scales.start] for k in range(first, rows.num_scales)]
            outputs = attention.multiscale_attention([q[i] for q, _, _ in own], [kk[i] for _, kk, _ in own],
                                                     [v[i] for _, _, v in own], backend=self.attention_backend,
                                                     mask=self.attention_mask)
            for k, o in zip(range(first, rows.num_scales), outputs):
                attended[k][i] = o

        def mix(k, x, o, mod):
            b, n = o.shape[:2]
            mod = jnp.split(mod, 6, axis=-1)
            o = parallel.constrain(o, HEADS)
            x = x + mod[2][:, None] * self.out(o.reshape(b, n, -1), k)
            h = _modulate(_layer_norm(x), mod[3], mod[4])
            h = parallel.constrain(jax.nn.gelu(self.mlp_in(h, k), approximate=True), HIDDEN)
            h = self.mlp_out(h, k)
            return parallel.constrain(x + mod[5][:, None] * h, TOKENS)

        return [mix(k, x, rows.join(k, attended[k]), mod) for k, x, (_, mod) in zip(scales, xs, projected)]


class MoT(nnx.Module):
    """Velocity model over L Laplacian scales. L = 1 is DiT.

    Args:
      image_shape: (H, W, C) of the finest scale (the image, or its latent).
      num_scales: L.
      patch_sizes: patch size per scale, finest first.
      hidden_size, depth, num_heads, mlp_ratio: transformer size (see `presets.PRESETS`).
      num_classes: 0 for unconditional; otherwise labels in [0, num_classes) and the null class
        `num_classes` (used for classifier-free guidance) when `class_dropout > 0`.
      attention_backend: see `attention.BACKENDS`.
      attention_mask: visibility between scales, one of `attention.MASKS` ("block_causal" is the
        method; "full" and "self" are the paper's ablations).
      time_scale: t in [0, 1] is multiplied by this before the sinusoidal embedding, so the
        embedding sees DiT's range of frequencies.
      dtype: compute dtype; parameters stay float32.
      remat: activation checkpointing policy of each block, a key of `REMAT_POLICIES`.
      scan_layers: store the blocks stacked ([depth, ...] under `blocks`) and run them with
        `lax.scan` (one compiled block); False keeps one `blocks/<i>` entry per block.
    """

    def __init__(self, *, image_shape: tuple[int, int, int], num_scales: int, patch_sizes: Sequence[int],
                 hidden_size: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 num_classes: int = 0, class_dropout: float = 0.1, attention_backend: str = "xla",
                 attention_mask: str = "block_causal", time_scale: float = 1000.0, dtype=jnp.float32, remat: str = "none", scan_layers: bool = False,
                 rngs: nnx.Rngs):
        height, width, channels = image_shape
        if len(patch_sizes) != num_scales:
            raise ValueError(f"patch_sizes={tuple(patch_sizes)} must have one entry per scale ({num_scales}).")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}.")
        if attention_backend not in attention.BACKENDS:
            raise ValueError(f"attention_backend {attention_backend!r} is not one of {attention.BACKENDS}.")
        if attention_mask not in attention.MASKS:
            raise ValueError(f"attention_mask {attention_mask!r} is not one of {attention.MASKS}.")
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat {remat!r} is not one of {tuple(REMAT_POLICIES)}.")
        self.remat = remat
        self.scan_layers = bool(scan_layers)
        self.depth = depth
        self.num_scales = num_scales
        self.patch_sizes = tuple(int(p) for p in patch_sizes)
        self.scale_shapes = tuple((height >> k, width >> k, channels) for k in range(num_scales))
        for k, ((h, w, _), p) in enumerate(zip(self.scale_shapes, self.patch_sizes)):
            if h % p or w % p or (h << k) != height or (w << k) != width:
                raise ValueError(
                    f"scale {k} has spatial size {h}x{w} (image {height}x{width} halved {k} times), "
                    f"which patch size {p} does not divide, or the image cannot be halved {num_scales - 1} "
                    f"times evenly.")
        if height != width:
            raise ValueError(f"image_shape {image_shape}: only square images are supported.")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.time_scale = time_scale
        self.dtype = dtype

        # Per-scale patch embeddings are stored as separate layers: their input widths differ
        # when patch sizes differ.
        self.patch_embed = nnx.List([
            Dense(p * p * channels, hidden_size, ("patch", "embed"),
                  init=nnx.initializers.xavier_uniform(), dtype=dtype, rngs=rngs)
            for p in self.patch_sizes])
        self.time_mlp_in = Dense(TIME_FREQUENCY_DIM, hidden_size, ("freq", "embed"), dtype=dtype, rngs=rngs)
        self.time_mlp_out = Dense(hidden_size, hidden_size, ("embed", "embed_out"), dtype=dtype, rngs=rngs)
        if num_classes > 0:
            table_size = num_classes + (1 if class_dropout > 0 else 0)
            self.class_embed = _param(nnx.initializers.normal(0.02), ("vocab", "embed"), rngs,
                                      (table_size, hidden_size))
        # One learned vector per scale tells the shared attention which scale a token is from;
        # DiT has none, so the single-scale baseline does not either.
        if num_scales > 1:
            self.scale_embed = _param(nnx.initializers.normal(0.02), ("scale", "embed"), rngs,
                                      (num_scales, hidden_size))
        make_block = lambda r: MoTBlock(num_scales, hidden_size, num_heads, mlp_ratio,
                                        attention_backend=attention_backend, attention_mask=attention_mask,
                                        dtype=dtype, rngs=r)
        if self.scan_layers:
            # One MoTBlock whose every weight has a leading 'layers' axis; each layer draws its
            # own keys (split_rngs), as separately built blocks would.
            @nnx.split_rngs(splits=depth)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked(r):
                return make_block(r)

            self.blocks = stacked(rngs)
        else:
            self.blocks = nnx.List([make_block(rngs) for _ in range(depth)])
        self.final_adaln = ScaleDense(num_scales, hidden_size, 2 * hidden_size, ("embed", "modulation"),
                                      zero_init=True, dtype=dtype, rngs=rngs)
        self.final_linear = nnx.List([
            Dense(hidden_size, p * p * channels, ("embed", "patch"), init=nnx.initializers.zeros_init(),
                  dtype=dtype, rngs=rngs) for p in self.patch_sizes])

    @property
    def null_class(self) -> int:
        return self.num_classes

    def _run_blocks(self, tokens: list[jax.Array], conds: list[jax.Array], rows: StageRows) -> list[jax.Array]:
        """All blocks, under the remat policy, unrolled or as one scan, over the tokens of every
        scale in `rows.scales` (each [B_k, N_k, D], the stages' rows joined) with their
        conditioning [B_k, D]. One layer call per scale per layer: its weights are read, under FSDP
        gathered, and their gradients reduced once per pass."""
        policy = REMAT_POLICIES[self.remat]

        def apply(graphdef, layer_state, toks, conds):
            return nnx.merge(graphdef, layer_state).over_rows(toks, conds, rows)

        if self.remat != "none":
            # prevent_cse=False inside scan (the loop already keeps XLA from merging the
            # recomputation into the forward pass); True when unrolled.
            apply = jax.checkpoint(apply, policy=policy, prevent_cse=not self.scan_layers, static_argnums=(0,))
        if self.scan_layers:
            graphdef, state = nnx.split(self.blocks)
            tokens, _ = jax.lax.scan(lambda toks, layer: (apply(graphdef, layer, toks, conds), None),
                                     tokens, state)
            return tokens
        for block in self.blocks:
            if self.remat == "none":
                tokens = block.over_rows(tokens, conds, rows)
            else:
                graphdef, state = nnx.split(block)
                tokens = apply(graphdef, state, tokens, conds)
        return tokens

    def _first_scale(self, states: Sequence[jax.Array]) -> int:
        first = self.num_scales - len(states)
        if not 0 <= first < self.num_scales:
            raise ValueError(f"got {len(states)} scale states; the model has {self.num_scales} scales.")
        return first

    def _condition(self, t: jax.Array, labels: jax.Array | None) -> jax.Array:
        """The conditioning vector [B, D] of times t [B] and class ids [B]."""
        cond = self.time_mlp_out(jax.nn.silu(self.time_mlp_in(timestep_embedding(t * self.time_scale))))
        if self.num_classes > 0:
            if labels is None:
                raise ValueError("this model is class-conditional: pass labels (or the null class).")
            cond = cond + self.class_embed[...][labels].astype(self.dtype)
        return parallel.constrain(cond, ("activation_batch", "activation_embed"))

    def _embed_scale(self, x: jax.Array, k: int) -> jax.Array:
        """Scale k's state [B, h, w, C] -> its tokens [B, N_k, D]."""
        p = self.patch_sizes[k]
        h = self.patch_embed[k](patchify(x, p))
        reference_grid = self.scale_shapes[0][0] // self.patch_sizes[0]
        h = h + jnp.asarray(sincos_positions(x.shape[1] // p, reference_grid, self.hidden_size), self.dtype)[None]
        if self.num_scales > 1:
            h = h + self.scale_embed[k].astype(self.dtype)
        return parallel.constrain(h, TOKENS)

    def _head_scale(self, h: jax.Array, cond: jax.Array, k: int) -> jax.Array:
        """Scale k's tokens [B, N_k, D] -> its velocity [B, h, w, C], float32."""
        shift, scale = jnp.split(self.final_adaln(jax.nn.silu(cond), k), 2, axis=-1)
        h = self.final_linear[k](_modulate(_layer_norm(h), shift, scale))
        height, width, channels = self.scale_shapes[k]
        return unpatchify(h, self.patch_sizes[k], height, width, channels).astype(jnp.float32)

    def stages(self, inputs: Sequence[tuple[Sequence[jax.Array], jax.Array, jax.Array | None]]
               ) -> list[list[jax.Array]]:
        """Velocities of several independent inputs (the training stages' sub-batches), each as
        `__call__` would give it, in one pass through the model.

        inputs: per stage (states, t, labels) as `__call__` takes them; stages may differ in
        batch size and in the scales present. Every layer meets all stages' rows in one call
        (per scale over every stage's rows, `StageRows`), so each weight is read,
        under FSDP gathered, and its gradient reduced once per step rather than once per stage.
        Returns per stage its velocities, finest first."""
        rows = StageRows(tuple(self._first_scale(states) for states, _, _ in inputs),
                         tuple(t.shape[0] for _, t, _ in inputs), self.num_scales)
        every = range(len(inputs))
        labels = None if inputs[0][2] is None else paths.join_stages([labels for _, _, labels in inputs])
        cond = self._condition(paths.join_stages([t for _, t, _ in inputs]), labels)
        cond_by_stage = dict(zip(every, paths.split_stages(cond, rows.sizes)))
        # The coarsest scale has every stage, so its rows are `cond`'s own.
        conds = [cond if rows.members(k) == list(every) else rows.join(k, cond_by_stage) for k in rows.scales]
        states = [rows.join(k, {i: inputs[i][0][k - rows.firsts[i]] for i in rows.members(k)}) for k in rows.scales]
        tokens = self._run_blocks([self._embed_scale(x, k) for k, x in zip(rows.scales, states)], conds, rows)
        outputs = [rows.split(k, self._head_scale(h, c, k)) for k, h, c in zip(rows.scales, tokens, conds)]
        return [[outputs[k - rows.scales.start][i] for k in range(first, self.num_scales)]
                for i, first in enumerate(rows.firsts)]

    def __call__(self, states: Sequence[jax.Array], t: jax.Array, labels: jax.Array | None = None) -> list[jax.Array]:
        """Velocities of the active scales.

        Args:
          states: noisy states of the active scales f..L-1, finest first; scale k is
            [B, H/2^k, W/2^k, C]. Which scales are active follows from len(states): always a
            coarsest-aligned suffix, since finer scales only join later.
          t: [B] global time.
          labels: [B] int class ids (or the null class), or None for an unconditional model.

        Returns:
          Per active scale velocity, finest first, shaped like `states`, float32.
        """
        return self.stages([(states, t, labels)])[0]


def _split_blocks(tree: dict) -> tuple[dict, dict]:
    rest = {k: v for k, v in tree.items() if k != "blocks"}
    return tree["blocks"], rest


def stack_blocks(params: dict) -> dict:
    """Pure-dict parameters of an unrolled MoT -> the `scan_layers=True` layout (blocks stacked)."""
    blocks, rest = _split_blocks(params)
    layers = [blocks[i] for i in sorted(blocks, key=int)]
    return {**rest, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_blocks(params: dict) -> dict:
    """Inverse of `stack_blocks`: `scan_layers=True` parameters -> one `blocks/<i>` per block."""
    blocks, rest = _split_blocks(params)
    depth = jax.tree.leaves(blocks)[0].shape[0]
    return {**rest, "blocks": {i: jax.tree.map(lambda x: x[i], blocks) for i in range(depth)}}


ARCHITECTURES = ("mot", "separate")


class SeparateScaleModels(nnx.Module):
    """The paper's "separate per-scale models" ablation, as we read it: scale k has a transformer
    of its own (its own embeddings, blocks and conditioning, nothing shared with other scales)
    that reads the tokens of scale k and of every coarser scale and predicts scale k's velocity
    only. Each is a `MoT` over scales k..L-1 (inside it, the same per-scale projections and
    visibility as the MoT), of which the finest output is kept. The coarse tokens are thus
    processed once per finer scale, by different weights: about L times the parameters and more
    FLOPs per call than one MoT (paper: 38.9 vs 16.5 GFLOPs, FID 3.60 vs 3.53).

    Same constructor arguments and call as `MoT`; with one scale it is one MoT (DiT).
    """

    def __init__(self, *, image_shape: tuple[int, int, int], num_scales: int, patch_sizes: Sequence[int],
                 rngs: nnx.Rngs, **kwargs):
        if len(patch_sizes) != num_scales:
            raise ValueError(f"patch_sizes={tuple(patch_sizes)} must have one entry per scale ({num_scales}).")
        height, width, channels = image_shape
        self.num_scales = num_scales
        self.models = nnx.List([
            MoT(image_shape=(height >> k, width >> k, channels), num_scales=num_scales - k,
                patch_sizes=tuple(patch_sizes[k:]), rngs=rngs, **kwargs) for k in range(num_scales)])

    @property
    def class_embed(self):
        """The finest model's class table (every model has one of the same size): what guidance checks."""
        return self.models[0].class_embed

    @property
    def null_class(self) -> int:
        return self.models[0].null_class

    @property
    def num_heads(self) -> int:
        """Every scale's transformer has the same heads (what the sharding check divides by)."""
        return self.models[0].num_heads

    def __call__(self, states: Sequence[jax.Array], t: jax.Array, labels: jax.Array | None = None) -> list[jax.Array]:
        """As `MoT.__call__`: states of the active scales f..L-1, finest first -> their velocities."""
        first = self.num_scales - len(states)
        if not 0 <= first < self.num_scales:
            raise ValueError(f"got {len(states)} scale states; the model has {self.num_scales} scales.")
        return [self.models[k](states[k - first:], t, labels)[0] for k in range(first, self.num_scales)]

"""Block-causal multi-scale attention.

Tokens of all active scales attend globally, but a query of scale k only sees keys of scale k and
of coarser scales. With keys ordered coarsest first, scale k's visible keys are a *prefix* of the
key sequence, so the production form runs one dense attention per scale over its key prefix and
does no masked work at all. `masked_attention` computes the same thing as a single attention over
all tokens with a block-causal mask; it is the reference the prefix form is tested against.

The visibility pattern is a choice (MASKS, config `model.attention_mask`), for the paper's
ablation (CelebA-HQ 256 FID: block-causal 3.53, full 3.91, self-only 5.19):
  "block_causal": scale k sees scales k..L-1 (itself and coarser): the method;
  "full": every active token sees every active token (coarse also sees fine);
  "self": scale k sees only its own tokens (each scale is then modelled from its own state alone;
    the scales share only the time and class embeddings).
Whatever the pattern, only the *active* scales are ever given to attention: a scale before its
window start is absent from the lists, not present as zeros, so "full" never attends to a scale
that has not started. Every backend implements every pattern: the XLA/cuDNN form as one dense
attention per scale over its visible keys (a prefix for block-causal, all keys for full, its own
keys for self), splash with the pattern's block mask, and the masked reference with the same mask.

Shapes: q, k, v per scale are [B, N_k, H, Dh] (batch, tokens of the scale, heads, head dim).
Lists of per-scale arrays are ordered finest first, like the rest of the package.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lapflow_jax import parallel

BACKENDS = ("auto", "xla", "cudnn", "splash", "masked")
MASKS = ("block_causal", "full", "self")

# Splash attention tiles the sequence in blocks of this many tokens; the token sequence is padded
# up to a multiple of it (padding keys are masked out, padding queries are dropped).
SPLASH_BLOCK = 128


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention with float32 logits and softmax whatever the input dtype.

    q: [B, Nq, H, Dh]; k, v: [B, Nk, H, Dh]; mask: [Nq, Nk] bool (True = visible) or None.
    Returns [B, Nq, H, Dh] in q's dtype.
    """
    scale = 1.0 / np.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v,
                      preferred_element_type=jnp.float32).astype(q.dtype)


def _single_attention(q, k, v, backend: str) -> jax.Array:
    if backend == "xla":
        return dense_attention(q, k, v)
    if backend == "cudnn":
        # cuDNN's fused flash attention; needs a GPU and bf16/fp16 inputs.
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}.")


def resolve_backend(backend: str, dtype) -> str:
    """"auto" picks by the platform the program is for (`parallel.target_platform`): Pallas splash
    attention on TPU, cuDNN flash attention on GPU (it needs 16-bit inputs, so float32 falls back
    to XLA), and the XLA prefix form elsewhere."""
    if backend != "auto":
        return backend
    platform = parallel.target_platform()
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def multiscale_attention(qs: Sequence[jax.Array], ks: Sequence[jax.Array], vs: Sequence[jax.Array],
                         backend: str = "xla", mask: str = "block_causal") -> list[jax.Array]:
    """Global attention over the active scales with visibility `mask` (one of MASKS).

    Args and returns as `block_causal_attention`; mask "block_causal" is exactly that function.
    """
    if mask not in MASKS:
        raise ValueError(f"attention mask {mask!r} is not one of {MASKS}.")
    backend = resolve_backend(backend, qs[0].dtype)
    if backend == "masked":
        return masked_attention(qs, ks, vs, mask=mask)
    if backend == "splash":
        return splash_attention(qs, ks, vs, mask=mask)
    return prefix_attention(qs, ks, vs, backend, mask=mask)


def block_causal_attention(qs: Sequence[jax.Array], ks: Sequence[jax.Array], vs: Sequence[jax.Array],
                           backend: str = "xla") -> list[jax.Array]:
    """Global attention over all active scales where scale k sees only scales >= k (coarser).

    Args:
      qs, ks, vs: per active scale, finest first, each [B, N_k, H, Dh].
      backend: one of BACKENDS: "xla" / "cudnn" run one dense attention per scale over its key
        prefix; "splash" runs TPU splash attention with the block-causal mask (its block-sparse
        mask skips the invisible blocks); "masked" is the reference.

    Returns:
      Per-scale outputs, finest first, each [B, N_k, H, Dh].
    """
    return multiscale_attention(qs, ks, vs, backend, "block_causal")


def prefix_attention(qs: Sequence[jax.Array], ks: Sequence[jax.Array], vs: Sequence[jax.Array],
                     backend: str = "xla", mask: str = "block_causal") -> list[jax.Array]:
    """Attention as one dense attention per scale over its visible keys, no masked work:
    a key prefix (block-causal), all keys (full) or its own keys (self).

    Same arguments as `multiscale_attention`; backend "xla" or "cudnn".
    """
    if mask == "self":
        return [_single_attention(q, k, v, backend) for q, k, v in zip(qs, ks, vs)]
    # Coarsest first, so that scale k's visible keys are keys_all[:, :prefix_len[k]].
    keys_all = jnp.concatenate(list(reversed(ks)), axis=1)
    values_all = jnp.concatenate(list(reversed(vs)), axis=1)
    lengths = [k.shape[1] for k in ks]
    outputs = []
    for i, q in enumerate(qs):
        prefix = sum(lengths[i:]) if mask == "block_causal" else sum(lengths)
        outputs.append(_single_attention(q, keys_all[:, :prefix], values_all[:, :prefix], backend))
    return outputs


def block_causal_mask(lengths: Sequence[int]) -> np.ndarray:
    """[N, N] bool visibility over tokens ordered coarsest first; lengths are finest first."""
    return visibility_mask(lengths, "block_causal")


def visibility_mask(lengths: Sequence[int], mask: str = "block_causal") -> np.ndarray:
    """[N, N] bool visibility (query row, key column) of pattern `mask` over tokens ordered
    coarsest first; lengths are the active scales' token counts, finest first."""
    coarse_first = list(reversed(lengths))
    block_of_token = np.repeat(np.arange(len(coarse_first)), coarse_first)
    query, key = block_of_token[:, None], block_of_token[None, :]
    if mask == "block_causal":
        return query >= key  # block b (0 = coarsest) sees blocks 0..b
    if mask == "full":
        return np.ones((len(block_of_token),) * 2, bool)
    if mask == "self":
        return query == key
    raise ValueError(f"attention mask {mask!r} is not one of {MASKS}.")


def masked_attention(qs: Sequence[jax.Array], ks: Sequence[jax.Array],
                     vs: Sequence[jax.Array], mask: str = "block_causal") -> list[jax.Array]:
    """Reference: one attention over all tokens with the pattern's mask. Same I/O as prefix."""
    lengths = [q.shape[1] for q in qs]
    q_all = jnp.concatenate(list(reversed(qs)), axis=1)
    k_all = jnp.concatenate(list(reversed(ks)), axis=1)
    v_all = jnp.concatenate(list(reversed(vs)), axis=1)
    out = dense_attention(q_all, k_all, v_all, jnp.asarray(visibility_mask(lengths, mask)))
    # Split back (coarsest first in `out`) and return finest first.
    splits = np.cumsum(list(reversed(lengths)))[:-1]
    return list(reversed(jnp.split(out, splits, axis=1)))


def splash_attention(qs: Sequence[jax.Array], ks: Sequence[jax.Array], vs: Sequence[jax.Array], *,
                     block: int = SPLASH_BLOCK, interpret: bool | None = None,
                     mask: str = "block_causal") -> list[jax.Array]:
    """Block-causal attention with the Pallas TPU splash-attention kernel.

    The block-causal visibility is a static block-sparse mask over the coarse-to-fine token
    sequence, so the kernel skips every fully invisible (query block, key block) tile. Same I/O as
    `prefix_attention`.

    A Mosaic kernel cannot be partitioned by the compiler, so inside `parallel.activation_sharding`
    it runs under `shard_map`: each device attends over its own rows of the batch ('data') and its
    own heads ('model'), the layout Megatron attention already has, and no activation moves
    between devices. Off TPU (no TPU mesh, or a CPU default backend) the kernel runs in Pallas'
    interpret mode (slow; for tests).
    """
    if interpret is None:
        interpret = parallel.target_platform() != "tpu"
    lengths = [q.shape[1] for q in qs]
    total = sum(lengths)
    padded = -(-total // block) * block
    head_dim = qs[0].shape[3]

    def to_heads_first(xs):  # coarse-first [B, N, H, D] -> padded [B, H, N_pad, D]
        x = jnp.concatenate(list(reversed(xs)), axis=1)
        x = jnp.pad(x, ((0, 0), (0, padded - total), (0, 0), (0, 0)))
        return x.transpose(0, 2, 1, 3)

    # Splash does not scale the logits itself.
    q = to_heads_first(qs) * jnp.asarray(1.0 / np.sqrt(head_dim), qs[0].dtype)
    k, v = to_heads_first(ks), to_heads_first(vs)
    attend = functools.partial(_splash_local, lengths=tuple(lengths), padded=padded, block=block,
                               interpret=interpret, pattern=mask)
    spec = parallel.activation_spec(q.shape, ("activation_batch", "activation_heads", "activation_length", None))
    if spec is not None:
        attend = jax.shard_map(attend, mesh=parallel.active_mesh(), in_specs=(spec, spec, spec), out_specs=spec,
                               check_vma=False)
    out = attend(q, k, v)  # [B, H, N_pad, D]
    out = out.transpose(0, 2, 1, 3)[:, :total].astype(qs[0].dtype)
    splits = np.cumsum(list(reversed(lengths)))[:-1]
    return list(reversed(jnp.split(out, splits, axis=1)))


def _splash_local(q, k, v, *, lengths, padded, block, interpret, pattern="block_causal"):
    """The splash kernel over the arrays one device holds: [b, h, N_pad, D] -> [b, h, N_pad, D]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    total = sum(lengths)
    mask = np.zeros((padded, padded), bool)
    # Padding keys stay invisible under every pattern (the active tokens end at `total`).
    mask[:total, :total] = visibility_mask(lengths, pattern)
    mask[total:, 0] = True  # padding queries need one visible key; their outputs are dropped
    kernel = splash.make_splash_mha(
        splash_mask.MultiHeadMask([splash_mask.NumpyMask(mask)] * q.shape[1]),
        block_sizes=splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                                      block_q_dq=block, block_kv_dq=block),
        head_shards=1, q_seq_shards=1, interpret=interpret)
    return jax.vmap(kernel)(q, k, v)

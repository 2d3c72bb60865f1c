"""Block-causal multi-scale attention.

Tokens of all active scales attend globally, but a query of scale k only sees keys of scale k and
of coarser scales. With keys ordered coarsest first, scale k's visible keys are a *prefix* of the
key sequence, so the production form runs one dense attention per scale over its key prefix and
does no masked work at all. `masked_attention` computes the same thing as a single attention over
all tokens with a block-causal mask; it is the reference the prefix form is tested against.

Shapes: q, k, v per scale are [B, N_k, H, Dh] (batch, tokens of the scale, heads, head dim).
Lists of per-scale arrays are ordered finest first, like the rest of the package.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("xla", "cudnn", "masked")


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


def prefix_attention(qs: Sequence[jax.Array], ks: Sequence[jax.Array], vs: Sequence[jax.Array],
                     backend: str = "xla") -> list[jax.Array]:
    """Block-causal attention as one dense attention per scale over its key prefix.

    Args:
      qs, ks, vs: per active scale, finest first, each [B, N_k, H, Dh].
      backend: "xla" (portable reference kernel) or "cudnn".

    Returns:
      Per-scale outputs, finest first, each [B, N_k, H, Dh].
    """
    if backend == "masked":
        return masked_attention(qs, ks, vs)
    # Coarsest first, so that scale k's visible keys are keys_all[:, :prefix_len[k]].
    keys_all = jnp.concatenate(list(reversed(ks)), axis=1)
    values_all = jnp.concatenate(list(reversed(vs)), axis=1)
    lengths = [k.shape[1] for k in ks]
    outputs = []
    for i, q in enumerate(qs):
        prefix = sum(lengths[i:])
        outputs.append(_single_attention(q, keys_all[:, :prefix], values_all[:, :prefix], backend))
    return outputs


def block_causal_mask(lengths: Sequence[int]) -> np.ndarray:
    """[N, N] bool visibility over tokens ordered coarsest first; lengths are finest first."""
    coarse_first = list(reversed(lengths))
    block_of_token = np.repeat(np.arange(len(coarse_first)), coarse_first)
    # Block b (0 = coarsest) sees blocks 0..b.
    return block_of_token[:, None] >= block_of_token[None, :]


def masked_attention(qs: Sequence[jax.Array], ks: Sequence[jax.Array],
                     vs: Sequence[jax.Array]) -> list[jax.Array]:
    """Reference: one attention over all tokens with the block-causal mask. Same I/O as prefix."""
    lengths = [q.shape[1] for q in qs]
    q_all = jnp.concatenate(list(reversed(qs)), axis=1)
    k_all = jnp.concatenate(list(reversed(ks)), axis=1)
    v_all = jnp.concatenate(list(reversed(vs)), axis=1)
    out = dense_attention(q_all, k_all, v_all, jnp.asarray(block_causal_mask(lengths)))
    # Split back (coarsest first in `out`) and return finest first.
    splits = np.cumsum(list(reversed(lengths)))[:-1]
    return list(reversed(jnp.split(out, splits, axis=1)))

"""Every attention backend equals the masked reference, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lapflow_jax.models import attention

# (tokens per scale, finest first): 1, 2 and 3 scales; the 3-scale case spans several splash blocks.
LENGTHS = [(16,), (64, 16), (256, 64, 16)]


def random_qkv(lengths, dtype=jnp.float32, heads=2, head_dim=8):
    keys = jax.random.split(jax.random.key(len(lengths)), 3)
    make = lambda key: [jax.random.normal(k, (2, n, heads, head_dim)).astype(dtype)
                        for k, n in zip(jax.random.split(key, len(lengths)), lengths)]
    return make(keys[0]), make(keys[1]), make(keys[2])


def max_rel_err(outs, refs):
    return max(float(jnp.abs(o.astype(jnp.float32) - r.astype(jnp.float32)).max() /
                     jnp.abs(r.astype(jnp.float32)).max()) for o, r in zip(outs, refs))


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("backend", ["xla", "splash"])
def test_backend_matches_reference_float32(backend, lengths):
    qs, ks, vs = random_qkv(lengths)
    reference = attention.masked_attention(qs, ks, vs)
    out = attention.block_causal_attention(qs, ks, vs, backend=backend)
    for o, r in zip(out, reference):
        np.testing.assert_allclose(o, r, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("backend", ["xla", "splash"])
def test_backend_matches_reference_bfloat16(backend, lengths):
    qs, ks, vs = random_qkv(lengths, jnp.bfloat16)
    reference = attention.masked_attention(*(list(map(lambda x: x.astype(jnp.float32), xs)) for xs in (qs, ks, vs)))
    out = attention.block_causal_attention(qs, ks, vs, backend=backend)
    assert all(o.dtype == jnp.bfloat16 for o in out)
    assert max_rel_err(out, reference) < 2e-2


def test_splash_gradients_match_reference():
    qs, ks, vs = random_qkv(LENGTHS[1])

    def loss(fn):
        return lambda q, k, v: sum(jnp.sum(jnp.sin(o)) for o in fn(q, k, v))

    ref = jax.grad(loss(attention.masked_attention), argnums=(0, 1, 2))(qs, ks, vs)
    got = jax.grad(loss(attention.splash_attention), argnums=(0, 1, 2))(qs, ks, vs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_auto_backend_choice_on_this_platform():
    expected = {"tpu": "splash", "gpu": "cudnn"}.get(jax.default_backend(), "xla")
    assert attention.resolve_backend("auto", jnp.bfloat16) == expected
    # cuDNN flash attention takes only 16-bit inputs: float32 never goes there.
    assert attention.resolve_backend("auto", jnp.float32) in ("splash", "xla")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_matches_reference():
    qs, ks, vs = random_qkv(LENGTHS[1], jnp.bfloat16, heads=4, head_dim=64)
    reference = attention.masked_attention(*(list(map(lambda x: x.astype(jnp.float32), xs)) for xs in (qs, ks, vs)))
    assert max_rel_err(attention.block_causal_attention(qs, ks, vs, backend="cudnn"), reference) < 2e-2

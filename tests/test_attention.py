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


def test_splash_under_shard_map_matches_xla_values_and_gradients():
    """Inside the train step's activation context on a (data 4, model 2) mesh, splash runs under
    shard_map on each device's rows and heads; values and gradients equal the XLA prefix form
    (both interpret the same math; shard_map only changes where it runs)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from lapflow_jax import parallel

    mesh = parallel.make_mesh((4, 2), jax.devices()[:8])
    qs, ks, vs = random_qkv(LENGTHS[2], heads=4)
    place = lambda xs: [jax.device_put(jnp.concatenate([x] * 2), NamedSharding(mesh, P("data", None, "model")))
                        for x in xs]
    qs, ks, vs = place(qs), place(ks), place(vs)  # batch 4: one row per 'data' device

    def loss(backend):
        def fn(q, k, v):
            with parallel.activation_sharding(mesh, parallel.logical_rules()):
                outs = attention.block_causal_attention(q, k, v, backend=backend)
            return sum(jnp.sum(jnp.sin(o) * (i + 1)) for i, o in enumerate(outs)), outs
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))

    (_, got), got_grads = loss("splash")(qs, ks, vs)
    (_, want), want_grads = loss("xla")(qs, ks, vs)
    for a, b in zip(jax.tree.leaves((got, got_grads)), jax.tree.leaves((want, want_grads))):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    text = loss("splash").lower(qs, ks, vs).as_text()
    assert "sdy.manual_computation" in text or "shard_map" in text  # the kernel is per device

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
    place = lambda xs: [jax.device_put(jnp.concatenate([x] * 2), NamedSharding(mesh, P(parallel.BATCH_AXES, None, "model")))
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


# --- Attention patterns (config model.attention_mask) ---------------------------------------------

# Which scales' keys a query of scale i sees, written out by hand (rows: query scale, columns: key
# scale, finest first, 3 active scales): the method, the "none" ablation, the self-only ablation.
EXPECTED_VISIBILITY = {
    "block_causal": [[1, 1, 1],
                     [0, 1, 1],
                     [0, 0, 1]],
    "full": [[1, 1, 1],
             [1, 1, 1],
             [1, 1, 1]],
    "self": [[1, 0, 0],
             [0, 1, 0],
             [0, 0, 1]],
}


def read_visibility(fn, lengths):
    """Reads the scale-to-scale visibility off the outputs: entry (i, j) is 1 when perturbing
    scale j's keys and values changes scale i's outputs at all, 0 when they stay bit-identical."""
    qs, ks, vs = random_qkv(lengths)
    base = fn(qs, ks, vs)
    seen = np.zeros((len(lengths),) * 2, int)
    for j in range(len(lengths)):
        bump = lambda xs: [x + (3.0 * jax.random.normal(jax.random.key(40 + j), x.shape) if i == j else 0.0)
                           for i, x in enumerate(xs)]
        out = fn(qs, bump(ks), bump(vs))
        for i in range(len(lengths)):
            change = float(jnp.abs(out[i] - base[i]).max())
            assert change == 0.0 or change > 1e-3, f"scale {i} moved by only {change} when scale {j} changed"
            seen[i, j] = change > 0
    return seen


@pytest.mark.parametrize("mask", attention.MASKS)
@pytest.mark.parametrize("backend", ["xla", "masked", "splash"])
def test_each_pattern_visibility_read_off_outputs(backend, mask):
    fn = lambda q, k, v: attention.multiscale_attention(q, k, v, backend=backend, mask=mask)
    np.testing.assert_array_equal(read_visibility(fn, (16, 4, 1)), EXPECTED_VISIBILITY[mask])


@pytest.mark.parametrize("mask", attention.MASKS)
def test_visibility_mask_blocks(mask):
    # Tokens ordered coarsest first: scale 2 (1 token), scale 1 (2), scale 0 (3).
    m = attention.visibility_mask((3, 2, 1), mask)
    block = np.repeat([2, 1, 0], [1, 2, 3])  # scale of each token
    expected = np.array(EXPECTED_VISIBILITY[mask])[block[:, None], block[None, :]].astype(bool)
    np.testing.assert_array_equal(m, expected)


@pytest.mark.parametrize("mask", attention.MASKS)
@pytest.mark.parametrize("backend", ["xla", "splash"])
def test_every_pattern_matches_masked_reference(backend, mask):
    # Two active scales (a stage where the finest has not started), 9 tokens padded to one splash
    # block of 128: the padding keys must stay invisible under "full" too, or the output mixes in
    # zeros from keys that belong to no scale.
    lengths = (8, 1)
    qs, ks, vs = random_qkv(lengths)
    reference = attention.masked_attention(qs, ks, vs, mask=mask)
    out = attention.multiscale_attention(qs, ks, vs, backend=backend, mask=mask)
    assert max_rel_err(out, reference) < 1e-5


def test_full_attention_sees_only_the_active_scales():
    # Full attention over the two active scales is one plain attention over exactly their tokens:
    # nothing of an absent (not yet started) scale, e.g. zero tokens, takes part.
    qs, ks, vs = random_qkv((8, 2))
    out = attention.multiscale_attention(qs, ks, vs, backend="xla", mask="full")
    cat = lambda xs: jnp.concatenate(list(reversed(xs)), axis=1)
    plain = attention.dense_attention(cat(qs), cat(ks), cat(vs))
    np.testing.assert_allclose(cat(out), plain, rtol=1e-6, atol=1e-6)


def test_unknown_mask_is_a_clear_error():
    qs, ks, vs = random_qkv((4, 1))
    with pytest.raises(ValueError, match="attention mask 'causal'"):
        attention.multiscale_attention(qs, ks, vs, mask="causal")

"""The MoT: block-causal attention, causality across scales, DiT parameter counts."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lapflow_jax.models import attention
from lapflow_jax.models.mot import MoT


def randomize(model: nnx.Module, seed: int = 0, std: float = 0.1) -> nnx.Module:
    """Gives every parameter random values: adaLN-Zero and zero final layers would otherwise make
    every block the identity and every output zero, which would pass any causality test."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [leaf + std * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)


def tiny_model(num_scales, *, backend="xla", num_classes=10, side=16, channels=3, patch=2, dtype=jnp.float32):
    return randomize(MoT(image_shape=(side, side, channels), num_scales=num_scales,
                         patch_sizes=(patch,) * num_scales, hidden_size=32, depth=2, num_heads=4,
                         num_classes=num_classes, attention_backend=backend, dtype=dtype, rngs=nnx.Rngs(0)))


def states_for(num_scales, batch=2, side=16, channels=3, seed=1):
    keys = jax.random.split(jax.random.key(seed), num_scales)
    return [jax.random.normal(keys[k], (batch, side >> k, side >> k, channels)) for k in range(num_scales)]


@pytest.mark.parametrize("lengths", [(16,), (64, 16), (64, 16, 4), (5, 3, 2)])
def test_prefix_attention_equals_masked_reference(lengths):
    keys = jax.random.split(jax.random.key(0), 3 * len(lengths))
    make = lambda key, n: jax.random.normal(key, (2, n, 4, 8))
    qs = [make(keys[3 * i], n) for i, n in enumerate(lengths)]
    ks = [make(keys[3 * i + 1], n) for i, n in enumerate(lengths)]
    vs = [make(keys[3 * i + 2], n) for i, n in enumerate(lengths)]
    prefix = attention.prefix_attention(qs, ks, vs)
    masked = attention.masked_attention(qs, ks, vs)
    chex.assert_trees_all_close(prefix, masked, atol=1e-5, rtol=0)


def test_block_causal_mask_layout():
    # Finest first lengths (2, 1): coarse-first token order is [coarse, fine, fine].
    mask = attention.block_causal_mask((2, 1))
    np.testing.assert_array_equal(mask, [[1, 0, 0], [1, 1, 1], [1, 1, 1]])


@pytest.mark.parametrize("num_scales", [2, 3])
def test_model_prefix_equals_masked(num_scales):
    xs = states_for(num_scales)
    t, y = jnp.array([0.3, 0.8]), jnp.array([1, 10])
    out_prefix = tiny_model(num_scales)(xs, t, y)
    out_masked = tiny_model(num_scales, backend="masked")(xs, t, y)
    for a, b in zip(out_prefix, out_masked):
        assert float(jnp.abs(a).max()) > 1e-3  # the randomised model really computes something
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_scales", [2, 3])
def test_coarse_scales_never_see_finer_ones(num_scales):
    model = tiny_model(num_scales)
    xs = states_for(num_scales)
    t, y = jnp.array([0.6, 0.9]), jnp.array([3, 4])
    full = model(xs, t, y)
    perturbed = model([xs[0] + 5.0 * jax.random.normal(jax.random.key(9), xs[0].shape)] + xs[1:], t, y)
    without_finest = model(xs[1:], t, y)
    for k in range(1, num_scales):
        np.testing.assert_array_equal(full[k], perturbed[k])
        np.testing.assert_array_equal(full[k], without_finest[k - 1])
    # ... while a coarse change does reach the finer outputs.
    coarse_changed = model(xs[:-1] + [xs[-1] + 1.0], t, y)
    for k in range(num_scales - 1):
        assert float(jnp.abs(coarse_changed[k] - full[k]).max()) > 1e-4


@pytest.mark.parametrize("num_scales", [1, 2, 3])
def test_bfloat16_compute_close_to_float32(num_scales):
    """The whole MoT in bf16 compute (float32 parameters, norms, softmax logits and outputs) against
    the same parameters in float32: the mixed-precision bound of 2e-2 relative, per scale."""
    xs = states_for(num_scales)
    t, y = jnp.array([0.3, 0.8]), jnp.array([1, 10])
    model16 = tiny_model(num_scales, dtype=jnp.bfloat16)
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model16, nnx.Param))} == {jnp.dtype(jnp.float32)}
    reference = tiny_model(num_scales)(xs, t, y)
    out = model16(xs, t, y)
    errors = []
    for o, r in zip(out, reference):
        assert o.dtype == jnp.float32
        errors.append(float(jnp.abs(o - r).max() / jnp.abs(r).max()))
    print(f"\n{num_scales} scale(s): bf16 vs float32 max relative error per scale {errors}")
    assert max(errors) < 2e-2
    assert min(errors) > 1e-5  # bf16 really computed: float32 would agree to ~1e-7


def test_unconditional_and_label_checks():
    model = tiny_model(2, num_classes=0)
    out = model(states_for(2), jnp.array([0.6, 0.9]))
    assert [o.shape for o in out] == [(2, 16, 16, 3), (2, 8, 8, 3)]
    with pytest.raises(ValueError, match="class-conditional"):
        tiny_model(2)(states_for(2), jnp.array([0.6, 0.9]))


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="patch size 4"):
        MoT(image_shape=(12, 12, 3), num_scales=2, patch_sizes=(4, 4), hidden_size=32, depth=1, num_heads=4,
            rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="one entry per scale"):
        MoT(image_shape=(16, 16, 3), num_scales=2, patch_sizes=(2,), hidden_size=32, depth=1, num_heads=4,
            rngs=nnx.Rngs(0))


def count_params(num_scales, hidden, depth, heads):
    model = nnx.eval_shape(lambda: MoT(image_shape=(32, 32, 4), num_scales=num_scales,
                                       patch_sizes=(2,) * num_scales, hidden_size=hidden, depth=depth,
                                       num_heads=heads, num_classes=1000, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name,size,published", [("B/2", (768, 12, 12), 130e6), ("XL/2", (1152, 28, 16), 675e6)])
def test_single_scale_is_dit(name, size, published):
    counts = {L: count_params(L, *size) for L in (1, 2, 3)}
    print(f"{name} on 32x32x4, 1000 classes: " + ", ".join(f"{L} scale(s) {n / 1e6:.1f}M" for L, n in counts.items()))
    assert abs(counts[1] - published) / published < 0.01
    # The MoT split: every non-embedding weight per scale, so parameters grow ~L-fold.
    assert 1.9 < counts[2] / counts[1] < 2.0


# Rows: query scale, columns: key scale (finest first), as in test_attention.py.
EXPECTED_VISIBILITY = {"block_causal": [[1, 1, 1], [0, 1, 1], [0, 0, 1]],
                       "full": [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
                       "self": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}


@pytest.mark.parametrize("mask", attention.MASKS)
def test_model_visibility_per_pattern(mask):
    """Perturb one scale's input state and read which scales' velocities change (3 scales active,
    then the finest absent): the pattern's visibility, read off the whole model."""
    model = randomize(MoT(image_shape=(16, 16, 3), num_scales=3, patch_sizes=(2, 2, 2), hidden_size=32, depth=2,
                          num_heads=4, num_classes=10, attention_mask=mask, rngs=nnx.Rngs(0)))
    y = jnp.array([1, 2])
    t = jnp.array([0.7, 0.9])
    for first in (0, 1):  # first = 1: the finest scale has not started and is not fed
        xs = states_for(3)[first:]
        base = model(xs, t, y)
        seen = np.zeros((len(xs),) * 2, int)
        for j in range(len(xs)):
            bumped = [x + (jax.random.normal(jax.random.key(7), x.shape) if i == j else 0.0) for i, x in enumerate(xs)]
            out = model(bumped, t, y)
            for i in range(len(xs)):
                change = float(jnp.abs(out[i] - base[i]).max())
                assert change == 0.0 or change > 1e-4
                seen[i, j] = change > 0
        expected = np.array(EXPECTED_VISIBILITY[mask])[first:, first:]
        np.testing.assert_array_equal(seen, expected, err_msg=f"{mask}, scales {first}..2 active")


def test_config_names_the_attention_mask_field():
    from lapflow_jax import config as config_lib

    c = config_lib.base_config()
    assert c.model.attention_mask == "block_causal"
    c.model.attention_mask = "none"
    with pytest.raises(ValueError, match="config.model.attention_mask='none'"):
        config_lib.validate(c)


def test_checkpoint_without_attention_mask_resumes_as_block_causal():
    # Checkpoints written before the field existed were trained block-causal: no refusal for them,
    # but a real change of pattern is still refused.
    import json

    from lapflow_jax import checkpoint, config as config_lib

    c = config_lib.base_config()
    saved = json.loads(c.to_json())
    del saved["model"]["attention_mask"]
    assert checkpoint.config_differences(saved, c) == []
    c.model.attention_mask = "full"
    assert checkpoint.config_differences(saved, c) == [
        "model.attention_mask: checkpoint has 'block_causal', config has 'full'"]


@pytest.mark.slow  # ~30 s idle (170 s on the shared cores): many eager calls of a 3-model stack
def test_separate_per_scale_models():
    """model.architecture="separate": scale k's velocity comes from a transformer of its own that
    sees scales k..L-1; nothing is shared between the scales' models."""
    from lapflow_jax import config as config_lib
    from lapflow_jax.models import build_model
    from lapflow_jax.models.mot import SeparateScaleModels

    c = config_lib.base_config()
    c.num_scales, c.window_starts = 3, (2 / 3, 1 / 3, 0.0)
    c.model.architecture = "separate"
    c.model.hidden_size, c.model.depth, c.model.num_heads, c.model.patch_sizes = 32, 2, 4, (2, 2, 2)
    config_lib.validate(c)
    model = randomize(build_model(c, image_shape=(16, 16, 3), num_classes=10, rngs=nnx.Rngs(0)))
    assert isinstance(model, SeparateScaleModels) and model.class_embed.shape == (11, 32)
    y, t = jnp.array([1, 2]), jnp.array([0.7, 0.9])
    for first in (0, 1, 2):  # every training stage / sampling segment
        xs = states_for(3)[first:]
        base = model(xs, t, y)
        assert [v.shape for v in base] == [x.shape for x in xs]
        # Scale k is what its own model says, given scales k.. (the finest output of that MoT).
        for k in range(first, 3):
            np.testing.assert_allclose(base[k - first], model.models[k](xs[k - first:], t, y)[0], rtol=1e-6, atol=1e-6)
        seen = np.zeros((len(xs),) * 2, int)
        for j in range(len(xs)):
            bumped = [x + (jax.random.normal(jax.random.key(7), x.shape) if i == j else 0.0) for i, x in enumerate(xs)]
            out = model(bumped, t, y)
            seen[:, j] = [float(jnp.abs(o - b).max()) > 0 for o, b in zip(out, base)]
        np.testing.assert_array_equal(seen, np.array(EXPECTED_VISIBILITY["block_causal"])[first:, first:])
    # No weight is shared: scale 0's velocity has zero gradient w.r.t. the other scales' models.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def scale0(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(states_for(3), t, y)[0] ** 2)

    grads = nnx.to_pure_dict(jax.grad(scale0)(params))
    norms = [sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["models"][k])) for k in range(3)]
    assert norms[0] > 0 and norms[1] == norms[2] == 0, norms
    mot_params = sum(x.size for x in jax.tree.leaves(nnx.state(tiny_model(3), nnx.Param)))
    separate_params = sum(x.size for x in jax.tree.leaves(params))
    assert separate_params > 2 * mot_params


def test_config_names_the_architecture_field():
    from lapflow_jax import config as config_lib

    c = config_lib.base_config()
    c.model.architecture = "moe"
    with pytest.raises(ValueError, match="config.model.architecture='moe'"):
        config_lib.validate(c)

"""The training loss: all stages in one pass through the MoT's blocks give the loss and gradients
of one model call per stage."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lapflow_jax import loss as loss_lib
from lapflow_jax import paths
from lapflow_jax.models.mot import MoT
from test_models import randomize


class PerStage:
    """The MoT called once per stage (the loss's fallback for models without `stages`)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, states, t, labels):
        return self.model(states, t, labels)


def _model(num_scales, *, scan_layers, remat):
    return randomize(MoT(image_shape=(16, 16, 3), num_scales=num_scales, patch_sizes=(2,) * num_scales,
                         hidden_size=16, depth=2, num_heads=2, num_classes=10, scan_layers=scan_layers,
                         remat=remat, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("num_scales, scan_layers, remat", [
    (2, False, "none"), pytest.param(3, True, "full", marks=pytest.mark.slow)])
def test_one_pass_over_the_stages_equals_one_call_per_stage(num_scales, scan_layers, remat):
    model = _model(num_scales, scan_layers=scan_layers, remat=remat)
    path = paths.MultiScalePath(window_starts=(0.5, 0.25, 0.0)[-num_scales:] if num_scales > 1 else (0.0,))
    stage_sizes = paths.stage_batch_sizes(6, None, num_scales)
    keys = jax.random.split(jax.random.key(3), num_scales + 1)
    residuals = [jax.random.normal(keys[k], (6, 16 >> k, 16 >> k, 3)) for k in range(num_scales)]
    labels = jax.random.randint(keys[-1], (6,), 0, 10)
    graphdef, params = nnx.split(model)

    def loss(params, per_stage):
        m = nnx.merge(graphdef, params)
        return loss_lib.multiscale_loss(PerStage(m) if per_stage else m, residuals, labels, jax.random.key(7), path,
                                        stage_sizes, (1.0,) * num_scales)

    loss_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (one_pass, metrics), grads = loss_and_grad(params, False)
    (per_stage, reference_metrics), reference_grads = loss_and_grad(params, True)
    np.testing.assert_allclose(one_pass, per_stage, rtol=1e-6)
    for name in reference_metrics:
        np.testing.assert_allclose(metrics[name], reference_metrics[name], rtol=1e-6, err_msg=name)
    # Same tree structure, shapes and dtypes, and the same values to float32 reassociation.
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, reference_grads)
    chex.assert_trees_all_close(grads, reference_grads, rtol=1e-4, atol=1e-6)


def test_stages_returns_each_stage_as_its_own_call():
    model = _model(2, scan_layers=True, remat="none")
    keys = jax.random.split(jax.random.key(0), 4)
    fine_and_coarse = [jax.random.normal(keys[0], (3, 16, 16, 3)), jax.random.normal(keys[1], (3, 8, 8, 3))]
    coarse_only = [jax.random.normal(keys[2], (2, 8, 8, 3))]
    t0, t1 = jnp.array([0.6, 0.7, 0.9]), jnp.array([0.1, 0.3])
    l0, l1 = jnp.array([1, 2, 3]), jnp.array([4, 5])
    both = nnx.jit(lambda m, inputs: m.stages(inputs))(model, [(fine_and_coarse, t0, l0), (coarse_only, t1, l1)])
    want = [model(fine_and_coarse, t0, l0), model(coarse_only, t1, l1)]
    chex.assert_trees_all_equal_shapes(both, want)
    chex.assert_trees_all_close(both, want, rtol=1e-5, atol=1e-6)

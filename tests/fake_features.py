"""A cheap stand-in for the InceptionV3 feature network in eval tests: fixed random projections of
the pixels (resized to 8x8 RGB) with Inception's three outputs, so the whole eval walk (passes,
parts, statistics, FID, sFID, IS, precision/recall) runs in seconds."""

import jax
import jax.numpy as jnp
import numpy as np

from lapflow_jax.evaluation import networks

OUTPUTS = {"pool": 16, "spatial": 12, "logits": 10}


def _apply(state, pixels):
    x = jnp.asarray(pixels).astype(jnp.float32) / 127.5 - 1.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    x = jax.image.resize(x, (x.shape[0], 8, 8, 3), "linear").reshape(x.shape[0], -1)
    return {k: jnp.tanh(x @ w) * 3.0 for k, w in state.items()}


def fake_inception(seed: int = 0) -> networks.FeatureNetwork:
    rng = np.random.default_rng(seed)
    state = {k: jnp.asarray(rng.normal(size=(8 * 8 * 3, d)) / 8.0, jnp.float32) for k, d in OUTPUTS.items()}
    return networks.FeatureNetwork(name="inception", outputs=dict(OUTPUTS), state=state, apply=_apply,
                                   identity={"network": "fake_inception", "seed": seed})

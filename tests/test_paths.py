"""Windows, coefficients, targets and training stages of the multi-scale path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lapflow_jax import parallel
from lapflow_jax.paths import (MultiScalePath, join_stages, split_stages, stage_batch_sizes,
                                validate_window_starts)


@pytest.mark.parametrize("starts,message", [
    ((), "empty"),
    ((0.5, 0.1), "must start at 0.0"),
    ((0.3, 0.5, 0.0), "strictly increase"),
    ((0.5, 0.5, 0.0), "strictly increase"),
    ((1.0, 0.0), "< 1"),
])
def test_window_starts_are_validated(starts, message):
    with pytest.raises(ValueError, match=message):
        validate_window_starts(starts)


def test_unknown_path_kind():
    with pytest.raises(ValueError, match="path kind 'linear'"):
        MultiScalePath((0.5, 0.0), "linear")


def test_segments_and_active_scales():
    path = MultiScalePath((2 / 3, 1 / 3, 0.0))
    assert path.segments() == [(0.0, 1 / 3, 2), (1 / 3, 2 / 3, 1), (2 / 3, 1.0, 0)]
    assert [path.finest_active(t) for t in (0.0, 0.2, 1 / 3, 0.5, 0.7, 1.0)] == [2, 2, 1, 1, 0, 0]


@pytest.mark.parametrize("kind", ["global", "local"])
def test_states_and_targets(kind):
    path = MultiScalePath((0.5, 0.0), kind)
    x1 = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    eps = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
    # Scale 0 enters at t = 0.5 as entry_noise_scale * eps, and is the data at t = 1.
    at_entry = path.noisy_state(x1, eps, jnp.full((3,), 0.5), 0)
    np.testing.assert_allclose(at_entry, path.entry_noise_scale(0) * eps, atol=1e-6)
    np.testing.assert_allclose(path.noisy_state(x1, eps, jnp.ones(3), 0), x1, atol=1e-6)
    assert path.entry_noise_scale(0) == (0.5 if kind == "global" else 1.0)
    # The target is the time derivative of the state (finite differences; the path is linear in t).
    t, h = jnp.array([0.6, 0.7, 0.9]), 1e-3
    for k in (0, 1):
        numeric = (path.noisy_state(x1, eps, t + h, k) - path.noisy_state(x1, eps, t - h, k)) / (2 * h)
        np.testing.assert_allclose(numeric, path.velocity_target(x1, eps, k), atol=2e-3)
        # ... and the clean estimate from the exact velocity is x1 itself.
        clean = path.predict_clean(path.noisy_state(x1, eps, t, k), path.velocity_target(x1, eps, k), t)
        np.testing.assert_allclose(clean, x1, atol=1e-5)


def test_training_times_lie_in_the_stage_window():
    path = MultiScalePath((2 / 3, 1 / 3, 0.0))
    for f in range(3):
        t = path.sample_times(jax.random.key(f), f, 4096)
        assert float(t.min()) >= path.window_starts[f] and float(t.max()) < 1.0
        assert abs(float(t.mean()) - (1 + path.window_starts[f]) / 2) < 0.02


def test_stage_batch_sizes():
    assert stage_batch_sizes(32, None, 2) == (16, 16)
    assert stage_batch_sizes(10, None, 3) == (4, 3, 3)
    assert stage_batch_sizes(32, (3, 1), 2) == (24, 8)
    assert sum(stage_batch_sizes(37, (1, 2, 3), 3)) == 37
    with pytest.raises(ValueError, match="too small"):
        stage_batch_sizes(2, None, 3)
    with pytest.raises(ValueError, match="3 scales"):
        stage_batch_sizes(8, (1, 1), 3)


def test_split_stages_interleaves_and_join_inverts_it():
    rows = np.arange(12)
    assert [p.tolist() for p in split_stages(rows, (8, 4))] == [[0, 1, 3, 4, 6, 7, 9, 10], [2, 5, 8, 11]]
    assert [p.tolist() for p in split_stages(rows, (4, 4, 4))] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    x = np.arange(12 * 3).reshape(12, 3)
    np.testing.assert_array_equal(join_stages(split_stages(x, (6, 3, 3))), x)
    assert split_stages(x, (12,))[0] is x and join_stages([x]) is x   # one stage: untouched


def test_stage_rows_stay_on_their_devices():
    """On 4 data devices a stage's rows, spread over all of them for the model, take no
    communication: each device already holds its share of every stage, and joining the stages
    back is local too. A contiguous slice of the batch (the rule before) lives on 2 of the 4
    devices and must be moved."""
    mesh = parallel.make_mesh((4, 1), jax.devices()[:4])
    sharding = parallel.batch_sharding(mesh)
    batch = jax.device_put(jnp.zeros((16, 8)), sharding)

    def collectives(fn):
        hlo = jax.jit(fn, out_shardings=sharding).lower(batch).compile().as_text()
        return [c for c in ("all-gather", "all-reduce", "all-to-all", "collective-permute") if c in hlo]

    assert collectives(lambda x: 2 * split_stages(x, (8, 8))[1]) == []
    assert collectives(lambda x: join_stages([2 * part for part in split_stages(x, (8, 4, 4))])) == []
    assert collectives(lambda x: 2 * x[8:]) != []

"""GFLOPs from XLA's cost analysis: per call with only the active scales, per sample over segments."""

import pytest

from lapflow_jax import config as config_lib
from lapflow_jax import flops, generate
from lapflow_jax.models import presets

WIDTH, DEPTH, PATCH, SIZE, CHANNELS = 32, 2, 2, 16, 3


def tiny_config(window_starts=(0.5, 0.0), guidance=1.0):
    c = config_lib.base_config()
    c.num_scales = len(window_starts)
    c.window_starts = tuple(window_starts)
    c.model.hidden_size, c.model.depth, c.model.num_heads = WIDTH, DEPTH, 2
    c.model.patch_sizes = (PATCH,) * len(window_starts)
    c.sample.guidance_scale = guidance
    return c


def hand_count_flops(tokens: int, num_classes: int = 0) -> float:
    """Matmul FLOPs (2 per multiply-add) of one DiT call on one sample with `tokens` tokens."""
    d, p2c = WIDTH, PATCH * PATCH * CHANNELS
    per_token_per_block = 2 * (3 * d * d + d * d + 2 * 4 * d * d)  # QKV, out, MLP in + out
    attention = 2 * 2 * tokens * tokens * d                         # QK^T and PV
    adaln = 2 * d * 6 * d                                           # per sample per block
    embed = 2 * tokens * p2c * d + 2 * tokens * d * p2c             # patch embed, final linear
    time_mlp = 2 * (256 * d + d * d) + 2 * d * 2 * d                 # time MLP, final adaLN
    return DEPTH * (tokens * per_token_per_block + attention + adaln) + embed + time_mlp


def test_single_scale_call_matches_a_hand_count():
    config = tiny_config((0.0,))
    counted = flops.sampling_flops(config, [10], image_shape=(SIZE, SIZE, CHANNELS), num_classes=0, baseline=False)
    want = hand_count_flops((SIZE // PATCH) ** 2) / 1e9
    # XLA also counts elementwise work (norms, GELU, softmax, modulation): a few percent more.
    assert want <= counted.gflops_per_call[0] <= 1.15 * want, (counted.gflops_per_call, want)
    assert counted.gflops_per_sample == pytest.approx(10 * counted.gflops_per_call[0])
    assert counted.gmacs_per_sample == pytest.approx(counted.gflops_per_sample / 2)


def test_two_scale_ratio_follows_the_token_arithmetic():
    config = tiny_config((0.5, 0.0))
    counted = flops.sampling_flops(config, [6, 6], image_shape=(SIZE, SIZE, CHANNELS), num_classes=0)
    coarse, both = counted.gflops_per_call
    # Segment 1 sees 16 coarse tokens, segment 2 those plus 64 fine ones; the baseline 64.
    assert coarse < counted.baseline_gflops_per_call < both
    assert counted.baseline_gflops_per_sample == pytest.approx(12 * counted.baseline_gflops_per_call)
    token_ratio = flops.token_ratio((0.5, 0.0), (PATCH, PATCH), SIZE)
    assert token_ratio == pytest.approx(64 / (0.5 * 16 + 0.5 * 80))
    assert counted.ratio == pytest.approx(token_ratio, rel=0.06), (counted.ratio, token_ratio)
    summary = counted.as_dict()
    assert summary["nfe_total"] == 12 and summary["baseline_over_lapflow"] == counted.ratio


def test_guidance_doubles_the_cost_and_errors():
    config = tiny_config()
    graphdef, params = flops.abstract_model(config, (SIZE, SIZE, CHANNELS), 10)
    coarse = [(SIZE // 2, SIZE // 2, CHANNELS)]  # the first segment: the coarse scale alone
    plain = flops.call_flops(generate.velocity_for(config, graphdef, 10), params, active_shapes=coarse,
                             with_labels=True)
    guided_fn = generate.velocity_for(tiny_config(guidance=2.0), graphdef, 10)
    guided = flops.call_flops(guided_fn, params, active_shapes=coarse, with_labels=True)
    assert guided == pytest.approx(2 * plain, rel=0.02)
    # FLOPs are per sample: linear in the batch.
    assert flops.call_flops(guided_fn, params, active_shapes=coarse, with_labels=True, batch=2) == pytest.approx(
        2 * guided, rel=0.01)
    with pytest.raises(ValueError, match="2 segments"):
        flops.sampling_flops(tiny_config(), [3], image_shape=(SIZE, SIZE, CHANNELS), num_classes=0)


def test_three_scale_token_ratio_and_baseline_config():
    assert flops.token_ratio((2 / 3, 1 / 3, 0.0), (2, 2, 2), 32) == pytest.approx(256 / ((16 + 80 + 336) / 3))
    config = tiny_config((2 / 3, 1 / 3, 0.0))
    config.pyramid.sigmas = (0.2, 0.5, 1.0)
    config.train.scale_weights = (1.0, 1.0, 2.0)
    config.model.attention_backend = "cudnn"
    base = flops.baseline_config(config)
    config_lib.validate(base)
    assert (base.num_scales, tuple(base.window_starts), tuple(base.model.patch_sizes)) == (1, (0.0,), (2,))
    assert tuple(base.pyramid.sigmas) == (0.2,) and base.train.scale_weights is None
    assert presets.model_size(base.model) == presets.model_size(config.model)
    # Fused attention kernels hide their FLOPs from XLA: counting always uses XLA attention.
    assert flops.counting_config(config).model.attention_backend == "xla"
    assert config.model.attention_backend == "cudnn"

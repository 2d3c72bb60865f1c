"""GFLOPs of sampling: per model call from XLA's cost analysis, per sample summed over segments.

LapFlow's sampling cost is not one number per call: on the segment [T_{f+1}, T_f] only scales
f..L-1 are fed to the model, so each segment has its own compiled velocity call. We compile that
call for ONE sample with exactly the active scales (abstract shapes: nothing is allocated or run)
and read the FLOPs from XLA's cost analysis of the compiled program; then

    GFLOPs per sample = sum over segments of NFE_segment * GFLOPs_per_call_segment.

The single-scale baseline (the same width, depth and finest patch size, L = 1: DiT/SiT) is
counted the same way at the same total NFE. With classifier-free guidance the velocity function
runs the model on a doubled batch, and the count includes it, as it should. The count is of the
flow model alone, as in DiT's and the paper's tables: the autoencoder's decode (latent models),
the final pyramid reconstruction and the optional coarse-to-fine preview decodes are not in it.

Units: XLA counts a multiply-add as 2 FLOPs. DiT's tables (and papers that copy them, LapFlow's
included) report "GFLOPs" that are multiply-accumulates, i.e. half our number: DiT-B/2 on a
32x32x4 latent is "23.01 GFLOPs" there and 46.8 XLA GFLOPs per forward pass here (23.4 GMACs; the
surplus is elementwise work). `SamplingFlops.gmacs_per_sample` gives the DiT-comparable figure.

Token arithmetic (the check): with patch p at every scale and windows T, the model sees
sum_k (N / 4^k) tokens while scale k is active. For 2 scales and T = 0.5 the average token count
is 0.5 * N/4 + 0.5 * (N + N/4) = 0.75 N, so about 1.33x fewer FLOPs than the baseline's N
(attention's quadratic term and the per-call constant shift it a little).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lapflow_jax import generate, pyramid, sampling
from lapflow_jax.models import build_model
from lapflow_jax.paths import MultiScalePath


def compiled_flops(compiled) -> float:
    """FLOPs of one call of a compiled program (per device), from XLA's cost analysis.

    Raises RuntimeError when the backend gives no FLOP count (never silently 0).
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        raise RuntimeError(f"XLA's cost analysis gave no 'flops' for this program (got {cost!r}).")
    return float(cost["flops"])


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs without shardings: compile for one device, whatever the inputs' placement."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def call_flops(velocity_fn: sampling.VelocityFn, params: Any, *, active_shapes: Sequence[tuple[int, int, int]],
               batch: int = 1, with_labels: bool) -> float:
    """FLOPs of one velocity call on `batch` samples with the given active scales.

    Args:
      velocity_fn: a pure velocity function (sampling.model_velocity_fn / guided_velocity_fn).
      params: model parameters (arrays or ShapeDtypeStructs; only shapes are used).
      active_shapes: (h, w, c) of each active scale, finest first.
      batch: samples per call.
      with_labels: pass int32 labels [batch] (class-conditional model) instead of None.
    """
    states = [jax.ShapeDtypeStruct((batch,) + tuple(s), jnp.float32) for s in active_shapes]
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32) if with_labels else None
    compiled = jax.jit(velocity_fn).lower((_abstract(params), labels), states, t).compile()
    return compiled_flops(compiled)


@dataclasses.dataclass
class SamplingFlops:
    """FLOPs of sampling one image.

    segments: (t0, t1, finest active scale) per segment, in time order.
    nfe_per_segment: model calls per segment (a float when it is a mean over batches).
    gflops_per_call: XLA GFLOPs of one call (one sample) per segment.
    baseline_gflops_per_call: the same for the single-scale model (None if not computed).
    """

    segments: list[tuple[float, float, int]]
    nfe_per_segment: tuple[float, ...]
    gflops_per_call: tuple[float, ...]
    baseline_gflops_per_call: float | None = None

    @property
    def gflops_per_sample(self) -> float:
        return float(sum(n * g for n, g in zip(self.nfe_per_segment, self.gflops_per_call)))

    @property
    def gmacs_per_sample(self) -> float:
        """DiT-style "GFLOPs" (multiply-accumulates): half of XLA's count."""
        return self.gflops_per_sample / 2

    @property
    def baseline_gflops_per_sample(self) -> float | None:
        if self.baseline_gflops_per_call is None:
            return None
        return float(sum(self.nfe_per_segment) * self.baseline_gflops_per_call)

    @property
    def ratio(self) -> float | None:
        """Baseline / LapFlow GFLOPs per sample at equal NFE (> 1: LapFlow is cheaper)."""
        base = self.baseline_gflops_per_sample
        return None if base is None else base / self.gflops_per_sample

    def as_dict(self) -> dict[str, Any]:
        return {
            "segments": [list(s) for s in self.segments],
            "nfe_per_segment": list(self.nfe_per_segment),
            "nfe_total": sum(self.nfe_per_segment),
            "gflops_per_call_per_segment": list(self.gflops_per_call),
            "gflops_per_sample": self.gflops_per_sample,
            "gmacs_per_sample_dit_units": self.gmacs_per_sample,
            "baseline_gflops_per_call": self.baseline_gflops_per_call,
            "baseline_gflops_per_sample": self.baseline_gflops_per_sample,
            "baseline_over_lapflow": self.ratio,
        }


def baseline_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The single-scale (DiT/SiT) config of the same width, depth and finest patch size."""
    base = ml_collections.ConfigDict(config.to_dict())
    base.num_scales = 1
    base.window_starts = (0.0,)
    base.model.patch_sizes = (int(config.model.patch_sizes[0]),)
    if config.pyramid.get("sigmas") is not None:
        base.pyramid.sigmas = (float(config.pyramid.sigmas[0]),)
    # Per-stage fields have one entry per scale; the baseline has one stage.
    base.train.stage_fractions = None
    base.train.scale_weights = None
    return base


@functools.lru_cache(maxsize=32)
def _abstract_model(config_json: str, image_shape: tuple[int, int, int], num_classes: int):
    config = ml_collections.ConfigDict(json.loads(config_json))
    model = nnx.eval_shape(lambda: build_model(config, image_shape=image_shape, num_classes=num_classes,
                                               rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def abstract_model(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int], num_classes: int):
    """(graphdef, abstract pure-dict params) of the config's model, built with eval_shape (no init)."""
    return _abstract_model(config.to_json(), tuple(image_shape), int(num_classes))


def segment_call_gflops(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, params: Any, *,
                        image_shape: tuple[int, int, int], num_classes: int) -> tuple[float, ...]:
    """GFLOPs of one velocity call for one sample on each segment (time order)."""
    path = MultiScalePath(tuple(config.window_starts), config.path_kind)
    height, width, channels = image_shape
    shapes = [(h, w, channels) for h, w in pyramid.scale_shapes(height, width, config.num_scales)]
    fn = generate.velocity_for(config, graphdef, num_classes)
    return tuple(call_flops(fn, params, active_shapes=shapes[finest:], with_labels=num_classes > 0) / 1e9
                 for _, _, finest in path.segments())


def counting_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with XLA attention: fused kernels (cuDNN flash attention, TPU splash attention)
    are custom calls whose FLOPs XLA's cost analysis does not see. The XLA form computes the same
    attention (one dense attention per scale over its key prefix), so its count is the model's."""
    counted = ml_collections.ConfigDict(config.to_dict())
    counted.model.attention_backend = "xla"
    # XLA's cost analysis counts a scan body once, so count the unrolled blocks.
    if "scan_layers" in counted.model:
        counted.model.scan_layers = False
    # ...and a chunked sampling call's lax.map likewise: one call on the whole (one-sample) batch.
    if "rows_per_call" in counted.sample:
        counted.sample.rows_per_call = 0
    return counted


def sampling_flops(config: ml_collections.ConfigDict, nfe_per_segment: Sequence[int], *,
                   image_shape: tuple[int, int, int], num_classes: int, baseline: bool = True) -> SamplingFlops:
    """GFLOPs per sample of sampling with `nfe_per_segment` model calls, and of the baseline.

    The model is built abstractly from the config (nothing is initialised or run), with XLA
    attention (see `counting_config`).

    Args:
      config: the experiment config (model, scales, windows, sample.guidance_scale).
      nfe_per_segment: calls per segment in time order (from `sampling.sample` or planned).
      image_shape: (H, W, C) of the finest scale.
      num_classes: 0 for an unconditional model.
      baseline: also count the single-scale model at the same total NFE.
    """
    config = counting_config(config)
    graphdef, params = abstract_model(config, image_shape, num_classes)
    path = MultiScalePath(tuple(config.window_starts), config.path_kind)
    segments = path.segments()
    if len(nfe_per_segment) != len(segments):
        raise ValueError(f"nfe_per_segment {tuple(nfe_per_segment)} has {len(nfe_per_segment)} entries; the "
                         f"path has {len(segments)} segments (config.window_starts={tuple(config.window_starts)}).")
    per_call = segment_call_gflops(config, graphdef, params, image_shape=image_shape, num_classes=num_classes)
    base = None
    if baseline:
        base_cfg = baseline_config(config)
        base_graph, base_params = abstract_model(base_cfg, image_shape, num_classes)
        base = segment_call_gflops(base_cfg, base_graph, base_params, image_shape=image_shape,
                                   num_classes=num_classes)[0]
    # NFE may be a mean over batches (dopri5): keep fractions, but integers stay integers.
    nfe = tuple(int(n) if float(n).is_integer() else float(n) for n in nfe_per_segment)
    return SamplingFlops(segments=segments, nfe_per_segment=nfe,
                         gflops_per_call=per_call, baseline_gflops_per_call=base)


def token_ratio(window_starts: Sequence[float], patch_sizes: Sequence[int], image_size: int) -> float:
    """Baseline / LapFlow token count averaged over t in [0, 1] (the baseline uses the finest patch).

    The linear-cost approximation of the FLOPs ratio at equal NFE spread in proportion to
    segment length.
    """
    tokens = [(image_size >> k) // p * ((image_size >> k) // p) for k, p in enumerate(patch_sizes)]
    path = MultiScalePath(tuple(window_starts))
    average = sum((t1 - t0) * sum(tokens[finest:]) for t0, t1, finest in path.segments())
    baseline = (image_size // patch_sizes[0]) ** 2
    return baseline / average

"""Model size presets (DiT's) and building the MoT from a config.

"B/2" means preset B with patch size 2 at every scale.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from lapflow_jax.models.mot import ARCHITECTURES, MoT, SeparateScaleModels

# name: (hidden_size, depth, num_heads), as in DiT (Peebles & Xie 2023, Table 1).
PRESETS = {
    "tiny": (64, 2, 4),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_size(model_cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(hidden_size, depth, num_heads) from `preset`, with any explicit field overriding it."""
    if model_cfg.preset not in PRESETS:
        raise ValueError(f"config.model.preset={model_cfg.preset!r} is not one of {sorted(PRESETS)}.")
    hidden, depth, heads = PRESETS[model_cfg.preset]
    return (model_cfg.get("hidden_size") or hidden, model_cfg.get("depth") or depth,
            model_cfg.get("num_heads") or heads)


def build_model(config: ml_collections.ConfigDict, *, image_shape: tuple[int, int, int],
                num_classes: int, rngs: nnx.Rngs) -> MoT:
    """The MoT for `config.model` on inputs of `image_shape` (the image, or its latent)."""
    hidden, depth, heads = model_size(config.model)
    if config.model.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={config.model.dtype!r} is not one of {sorted(DTYPES)}.")
    architecture = config.model.get("architecture", "mot")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"config.model.architecture={architecture!r} is not one of {ARCHITECTURES}.")
    model_class = SeparateScaleModels if architecture == "separate" else MoT
    return model_class(
        image_shape=image_shape,
        num_scales=config.num_scales,
        patch_sizes=tuple(config.model.patch_sizes),
        hidden_size=hidden, depth=depth, num_heads=heads,
        mlp_ratio=config.model.mlp_ratio,
        num_classes=num_classes,
        class_dropout=config.model.class_dropout,
        attention_backend=config.model.attention_backend,
        attention_mask=config.model.get("attention_mask", "block_causal"),
        time_scale=config.model.time_scale,
        dtype=DTYPES[config.model.dtype],
        remat=config.model.get("remat", "none"),
        scan_layers=config.model.get("scan_layers", False),
        rngs=rngs)

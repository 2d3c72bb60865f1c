"""The MoT velocity model: `MoT`, size `PRESETS` and `build_model` from a config."""

from lapflow_jax.models.mot import MoT
from lapflow_jax.models.presets import PRESETS, build_model, model_size

__all__ = ["MoT", "PRESETS", "build_model", "model_size"]

"""configs/demo.py with dotted overrides ("model.depth": 1), in process or as command-line flags:
shared by the tests that run the trainer both ways, so the two stay the same config."""

import sys
from pathlib import Path

import ml_collections

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(REPO / "configs" / "demo.py")


def demo_config(overrides: dict) -> ml_collections.ConfigDict:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from configs import demo

    config = demo.get_config()
    config.update_from_flattened_dict(overrides)
    return config


def cli_args(overrides: dict) -> list[str]:
    """The same overrides as `--config.<key>=<value>` flags for `python -m lapflow_jax.main`."""
    args = []
    for key, value in overrides.items():
        if isinstance(value, tuple):
            value = "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
        args.append(f"--config.{key}={value}")
    return args

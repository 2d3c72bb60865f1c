"""configs/demo.py with dotted overrides ("model.depth": 1), in process or as command-line flags:
shared by the tests that run the trainer both ways, so the two stay the same config."""

import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np

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
            items = [repr(v) if isinstance(v, str) else str(v) for v in value]
            value = "(" + ",".join(items) + ("," if len(value) == 1 else "") + ")"
        args.append(f"--config.{key}={value}")
    return args


def write_checkpoint(workdir, config: ml_collections.ConfigDict, step: int = 2) -> None:
    """A checkpoint of `config`'s train state, as train() writes it, with a deterministic non-trivial
    pattern in every parameter (so sampling integrates a real field) and config.pyramid.sigmas,
    without compiling the train step."""
    from lapflow_jax import checkpoint as ckpt_lib
    from lapflow_jax import parallel, train
    from lapflow_jax.data import pipeline

    setup = train.make_setup(config, parallel.make_mesh((1, 1), jax.devices()[:1]))
    _, abstract = train.state_shardings(setup)
    leaves, treedef = jax.tree.flatten(abstract)
    pattern = [(0.05 * np.sin(1.7 * np.arange(a.size) + i)).reshape(a.shape).astype(a.dtype)
               for i, a in enumerate(leaves)]
    state = jax.tree.unflatten(treedef, pattern).replace(step=np.asarray(step, np.int32),
                                                          sigmas=np.asarray(config.pyramid.sigmas, np.float32))
    data = pipeline.make_train_iterator(config.data, global_batch_size=config.train.global_batch_size, seed=0,
                                        process_index=0, process_count=1)
    ckpt = ckpt_lib.Checkpointer(Path(workdir) / "checkpoints", every_steps=1, keep=3)
    ckpt.save(step, state, data, config, force=True)
    ckpt.wait()
    ckpt.close()

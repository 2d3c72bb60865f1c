"""Orbax checkpoints that hold everything needed to resume exactly.

One checkpoint = the train state (step, params, EMA, optimizer state, per-scale sigmas), the
Grain iterator state of every host, and the config that made them. Saves are asynchronous and
atomic (Orbax writes to a temporary directory and renames it when complete, so a write killed
midway is never taken for a checkpoint). Resuming refuses a config that changes what the
checkpoint means (model, scales, windows, batch), listing the differences.
"""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

# Config fields whose change makes a checkpoint mean something else. Changing anything else
# (logging, sampling, total steps, checkpoint cadence) is a harmless resume.
RESUME_CRITICAL = ("seed", "num_scales", "window_starts", "path_kind", "pyramid", "model",
                   "train.global_batch_size", "train.stage_fractions", "train.scale_weights",
                   "data.name", "data.image_size", "data.channels", "data.tfds_name", "data.folder")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
    """Resume-critical fields that differ between a checkpoint's config and the current one."""
    now = _flatten(json.loads(current.to_json()))
    before = _flatten(saved)
    diffs = []
    for key in sorted(set(now) | set(before)):
        if any(key == c or key.startswith(c + ".") for c in RESUME_CRITICAL):
            if now.get(key) != before.get(key):
                diffs.append(f"{key}: checkpoint has {before.get(key)!r}, config has {now.get(key)!r}")
    return diffs


class Checkpointer:
    """A thin layer over `ocp.CheckpointManager` with our three items."""

    def __init__(self, directory: str | epath.Path, *, every_steps: int, keep: int, async_save: bool = True):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every_steps, create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator, config: ml_collections.ConfigDict, *,
             force: bool = False) -> bool:
        """Saves if the interval says so (or force). Errors of an earlier async save surface here."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(json.loads(config.to_json())))
        return self.manager.save(step, args=args, force=force)

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore(self, step: int, abstract_state: Any, data_iterator) -> Any:
        """Restores the train state onto the shardings in `abstract_state` (ShapeDtypeStructs with
        explicit target shardings, never taken from the checkpoint) and the data iterator in place."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored["state"]

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """Restores only the train state (for sampling and evaluation)."""
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]

    def wait(self) -> None:
        """Blocks until pending async saves are done; re-raises their errors."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying the given target shardings."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

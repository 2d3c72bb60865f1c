"""Orbax checkpoints that hold everything needed to resume exactly.

One checkpoint = the train state (step, params, EMA, optimizer state, per-scale sigmas), the
Grain iterator state of every host, and the config that made them. Saves are asynchronous and
atomic (Orbax writes to a temporary directory and renames it when complete, so a write killed
midway is never taken for a checkpoint). Resuming refuses a config that changes what the
checkpoint means (model, scales, windows, batch), listing the differences, and every restore
refuses a checkpoint whose arrays do not fit the model (a different model or code version),
listing the arrays that differ. Nothing here unpickles: the state is tensorstore arrays plus
JSON metadata, the data-iterator state and the config are JSON. `Preemption` turns a SIGTERM on
any host into a save of the same step on every host.
"""

from __future__ import annotations

import dataclasses
import json
import signal
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from lapflow_jax import parallel

# Config fields whose change makes a checkpoint mean something else. Changing anything else
# (logging, sampling, total steps, checkpoint cadence) is a harmless resume.
RESUME_CRITICAL = ("seed", "num_scales", "window_starts", "path_kind", "pyramid", "model",
                   "train.global_batch_size", "train.stage_fractions", "train.scale_weights",
                   "data.name", "data.image_size", "data.channels", "data.tfds_name", "data.folder",
                   "data.latents_dir", "latent.enabled", "latent.shape")
# Fields inside the sections above that only change how the same model is computed.
# Compute-only choices: the same parameters, placed or recomputed differently (e.g. when moving to
# smaller chips).
RESUME_DEFAULTS = {"model.attention_mask": "block_causal", "model.architecture": "mot"}
RESUME_HARMLESS = ("model.attention_backend", "model.dtype", "model.remat", "pyramid.sigma_batches")


class IncompatibleCheckpointError(ValueError):
    """A checkpoint made by a different config or model than the one asking for it."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint save (possibly an earlier asynchronous one) failed."""


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
    # A field added after the checkpoint was written reads as its default (the behaviour the
    # checkpoint was trained with), so old runs still resume.
    before = {**RESUME_DEFAULTS, **_flatten(saved)}
    diffs = []
    for key in sorted(set(now) | set(before)):
        if any(key == c or key.startswith(c + ".") for c in RESUME_CRITICAL) and key not in RESUME_HARMLESS:
            if now.get(key) != before.get(key):
                diffs.append(f"{key}: checkpoint has {before.get(key)!r}, config has {now.get(key)!r}")
    return diffs


class InputShardsHandler(grain.checkpoint.CheckpointHandler):
    """Grain's per-process save (one `process_<i>-of-<P>.json` each), with a restore that reads
    every process's file: each holds the states of the input shards that process read, so a run
    resumes onto another number of processes (a process may now read shards another read before),
    as long as config.input_shards, the shard count, is unchanged."""

    @classmethod
    def typestr(cls):
        return "lapflow_jax.checkpoint.InputShardsHandler"

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        if not isinstance(item, parallel.InputShards):  # a plain Grain iterator: Grain's own restore
            return super().restore(directory, item=item)
        merged, counts = {}, set()
        for path in sorted(epath.Path(directory).glob("process_*-of-*.json")):
            state = json.loads(path.read_text())
            if "shards" not in state:
                raise IncompatibleCheckpointError(
                    f"{path} is not a LapFlow-JAX input-shards state (a checkpoint of another program?).")
            counts.add(state["input_shards"])
            merged.update(state["shards"])
        if not counts:
            raise IncompatibleCheckpointError(f"no data iterator state (process_*-of-*.json) in {directory}.")
        if len(counts) != 1:
            raise IncompatibleCheckpointError(
                f"data iterator states in {directory} disagree on the shard count: {sorted(counts)}.")
        item.set_state(json.dumps({"input_shards": counts.pop(), "shards": merged}).encode())
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(InputShardsHandler, for_save=True)
@dataclasses.dataclass
class InputShardsSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(InputShardsHandler, for_restore=True)
@dataclasses.dataclass
class InputShardsRestore(ocp.args.CheckpointArgs):
    item: Any


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
                           "data": InputShardsHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator, config: ml_collections.ConfigDict, *,
             force: bool = False) -> bool:
        """Saves if the interval says so (or force).

        Raises CheckpointSaveError when this save fails or an earlier asynchronous one did: Orbax
        re-raises a background failure at the next save, and the run must stop there rather than
        train on with nothing saved.
        """
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=InputShardsSave(data_iterator),
            config=ocp.args.JsonSave(json.loads(config.to_json())))
        try:
            return self.manager.save(step, args=args, force=force)
        except Exception as e:  # noqa: BLE001 - any failure to save is fatal; say which and where
            raise self._save_error(f"saving step {step}, or an earlier asynchronous save,", e) from e

    def _save_error(self, what: str, error: Exception) -> CheckpointSaveError:
        try:
            steps = sorted(self.manager.all_steps(read=True))
        except Exception:  # noqa: BLE001 - the message must not fail on a broken directory
            steps = "unknown"
        return CheckpointSaveError(
            f"checkpoint {what} to {self.directory} failed: {type(error).__name__}: {error}. "
            f"Complete checkpoints there: {steps}. Training stops so that no work goes unsaved; fix the "
            "cause (disk space, permissions, bucket access) and rerun to resume from the latest one.")

    def check_resume(self, step: int, config: ml_collections.ConfigDict) -> list[str]:
        """Refuses to resume checkpoint `step` with a config that changes what it means.

        Returns the resume-critical differences (empty for a clean resume); with differences, raises
        IncompatibleCheckpointError listing them unless config.checkpoint.force_resume is set, in
        which case they are logged. Parameter shapes are checked on restore either way.
        """
        diffs = config_differences(self.restore_config(step), config)
        if not diffs:
            return diffs
        listing = "\n  ".join(diffs)
        if config.checkpoint.get("force_resume", False):
            logging.warning("Resuming step %d of %s despite config changes (checkpoint.force_resume=True):\n  %s",
                            step, self.directory, listing)
            return diffs
        raise IncompatibleCheckpointError(
            f"{self.directory} holds a checkpoint (step {step}) made with a different config:\n  {listing}\n"
            "Start a new run with a new --workdir (or delete its checkpoints/ to start over), or resume anyway "
            "with --config.checkpoint.force_resume=True (the parameter shapes must still match).")

    def restore_config(self, step: int) -> dict:
        """The config (as a JSON dict) saved with checkpoint `step`."""
        if not (self.directory / str(step) / "config").exists():
            raise IncompatibleCheckpointError(
                f"checkpoint {self.directory / str(step)} has no 'config' item: it was not written by "
                "LapFlow-JAX's trainer (or is damaged). Use a new --workdir.")
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def check_structure(self, step: int, abstract_state: Any) -> None:
        """Raises IncompatibleCheckpointError, listing the arrays that differ, when checkpoint `step`'s
        train state does not have the tree, shapes and dtypes of `abstract_state`.

        Reads only Orbax's JSON array metadata, so a checkpoint of another model is refused with the
        differences named instead of an error deep inside the restore.
        """
        where = self.directory / str(step)
        try:
            metadata = self.manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - whatever is wrong, the answer is "not ours"
            raise IncompatibleCheckpointError(
                f"checkpoint {where} has no readable train state ({type(e).__name__}: {e}): it was not written "
                "by LapFlow-JAX's trainer or is damaged.") from e
        if metadata is None:
            raise IncompatibleCheckpointError(f"checkpoint {where} has no 'state' item: it was not written by "
                                              "LapFlow-JAX's trainer or is damaged.")
        saved = _shapes(getattr(metadata, "tree", metadata))
        wanted = _shapes(abstract_state)
        diffs = [f"{k}: missing in the checkpoint (model wants {wanted[k]})" for k in sorted(set(wanted) - set(saved))]
        diffs += [f"{k}: in the checkpoint {saved[k]}, not in this model" for k in sorted(set(saved) - set(wanted))]
        diffs += [f"{k}: checkpoint {saved[k]}, model {wanted[k]}" for k in sorted(set(saved) & set(wanted))
                  if saved[k] != wanted[k]]
        if diffs:
            shown = "\n  ".join(diffs[:12]) + (f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else "")
            raise IncompatibleCheckpointError(
                f"checkpoint {where} does not fit this model: {len(diffs)} array(s) differ (shape, dtype):\n  "
                f"{shown}\nIt was made by a different model config (model.*, num_scales, image size, classes) "
                "or code version. Point --workdir at this model's own run, or train into a new --workdir.")

    def restore(self, step: int, abstract_state: Any, data_iterator) -> Any:
        """Restores the train state onto the shardings in `abstract_state` (ShapeDtypeStructs with
        explicit target shardings, never taken from the checkpoint) and the data iterator in place."""
        self.check_structure(step, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=InputShardsRestore(data_iterator)))
        return restored["state"]

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """Restores only the train state (for sampling and evaluation)."""
        self.check_structure(step, abstract_state)
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]

    def wait(self) -> None:
        """Blocks until pending async saves are done; raises CheckpointSaveError if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - see save()
            raise self._save_error("an asynchronous save", e) from e

    def close(self) -> None:
        # Orbax (0.12.8) starts a temporary-folder cleanup thread when the manager is made and
        # awaits it only in save(): a process that exits right after a restore-only use (sample,
        # eval, "no checkpoint" errors) killed it mid-run, and Orbax logged its traceback.
        cleanup = getattr(self.manager, "_cleanup_tmp_directory_future", None)
        if cleanup is not None:
            cleanup.result()
        self.manager.close()


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"params/blocks/0/qkv/kernel": (shape, dtype), ...} of a state, an abstract state or Orbax's
    metadata tree (which stores dataclasses and tuples as dicts keyed by field name and index)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    out = {}
    for path, leaf in leaves:
        key = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        out[key] = (tuple(int(d) for d in leaf.shape), str(leaf.dtype))
    return out


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying the given target shardings."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Preemption:
    """Decides when a preempted run saves and stops: at the same step on every host.

    Wrap the training loop in it and call `should_stop(step)` once after every step, with the
    step number of the train state (the numbering Orbax's own preemption checks in
    CheckpointManager.save use), on every host alike. A SIGTERM on any one host makes every host
    return True at one and the same step, so all of them enter the save's collectives together;
    if hosts decided alone, the one that stops would wait in the save's barrier while the others
    wait for it in the next step's all-reduce, and the pod would hang until killed.

    - Under jax.distributed with JAX's preemption service (`jax_enable_preemption_service`, on by
      default), the service's own C++ SIGTERM handler notices the signal, the coordination service
      tells every host, and they agree on the step after the fastest host's current one;
      `reached_preemption_sync_point(step)` is True at that step everywhere. Per step that is a
      mutex and a comparison, no communication. No Python handler is installed then: signal.signal
      would replace the service's handler, and the other hosts would never hear of the signal.
      A notice that arrives before `__enter__` of a resumed run is agreed on a step the run never
      reaches (the hosts have not told the service their step yet) and so is lost, as it would be
      without this class; a fresh run stops at its first step.
    - Otherwise (one process, or several with the service turned off) a Python handler sets a
      local flag. One process reads it; several all-gather it after every step, a collective that
      every host runs at the same step and so reads the same answer from.
    """

    def __init__(self, start_step: int):
        self.requested = False  # this process got SIGTERM (only where the Python handler is in use)
        self._start_step = start_step
        self._jax_sync = False
        self._previous = None

    def __enter__(self) -> "Preemption":
        if jax.distributed.is_initialized():
            try:
                # Tells the service this host's step, so that a notice agrees on a step ahead of it.
                multihost_utils.reached_preemption_sync_point(self._start_step)
                self._jax_sync = True
            except RuntimeError:  # the preemption service is turned off
                logging.warning("jax_enable_preemption_service is off: the hosts agree on SIGTERM with one "
                                "all-gather per step instead.")
        if not self._jax_sync:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners): SIGTERM is not caught
                logging.warning("Not in the main thread: SIGTERM will end this run without a checkpoint.")
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the next step, then exiting.")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """True on every host at the same step once any host got SIGTERM."""
        if self._jax_sync:
            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() == 1:
            return self.requested
        return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

"""Faults: non-finite steps, failed asynchronous saves, untrusted or foreign checkpoints, and a
training process killed with SIGKILL at random points (during saves too) and resumed each time.

The subprocess runs use the tiny demo run of tests/test_train.py on one CPU device. The runs of
one test share a JAX persistent compilation cache (same config -> same executable), so only the
first run of each test compiles the train step.
"""

import errno
import functools
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lapflow_jax import checkpoint as ckpt_lib
from lapflow_jax import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_config import one_device_mesh, run_config, write_checkpoint  # noqa: E402
from test_train import DEMO_CONFIG, REPO, cli_args, tiny_config  # noqa: E402


def _env(cache_dir):
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _cmd(workdir, **overrides):
    return [sys.executable, "-m", "lapflow_jax.main", f"--config={DEMO_CONFIG}", f"--workdir={workdir}",
            *cli_args(**overrides)]


def _run(workdir, cache_dir, **overrides):
    return subprocess.run(_cmd(workdir, **overrides), cwd=REPO, env=_env(cache_dir), capture_output=True, text=True,
                          timeout=900)


def _records(workdir):
    """Every line of metrics.jsonl (a step re-run after a resume appears once per run)."""
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _complete_steps(workdir):
    """Checkpoints Orbax finished (renamed from their temporary directory), by step."""
    root = Path(workdir) / "checkpoints"
    return {int(p.name) for p in root.iterdir() if p.name.isdigit()} if root.exists() else set()


def _in_progress_saves(workdir, since=0.0):
    """Orbax's temporary directories (saves not finished, or torn by a kill) made after `since`."""
    root = Path(workdir) / "checkpoints"
    if not root.exists():
        return set()
    found = set()
    for p in root.iterdir():
        try:
            if "orbax-checkpoint-tmp" in p.name and p.stat().st_mtime >= since:
                found.add(p.name)
        except FileNotFoundError:  # renamed (finished) while we looked
            pass
    return found


def _restore(workdir, config, *steps):
    """The train states of checkpoints `steps` of workdir, as numpy trees."""
    setup = train.make_setup(config, one_device_mesh())
    shardings, abstract = train.state_shardings(setup)
    ckpt = ckpt_lib.Checkpointer(Path(workdir) / "checkpoints", every_steps=1, keep=100)
    states = [jax.device_get(ckpt.restore_state(s, ckpt_lib.abstract_with_shardings(abstract, shardings)))
              for s in steps]
    ckpt.close()
    return states


# ----------------------------------------------------------------------------------------------
# Non-finite steps.


def test_optimizer_skips_nonfinite_gradients_and_counts_them():
    """The optax wrapper of make_optimizer: NaN/Inf gradients leave params and Adam moments exactly
    as they were, and are counted; it never gives up and applies them (we stop on the host)."""
    tx, _ = train.make_optimizer(tiny_config().train)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,))}
    state = tx.init(params)
    good = {"w": jnp.full((2, 3), 0.5), "b": jnp.full((3,), -0.5)}
    params, state = _apply(tx, params, state, good)  # one real step, so the moments are not zero
    before = jax.device_get((params, state.inner_state))
    for i, bad in enumerate([{"w": good["w"].at[0, 0].set(jnp.nan), "b": good["b"]},
                             {"w": good["w"], "b": good["b"].at[1].set(jnp.inf)}] * 20):
        params, state = _apply(tx, params, state, bad)
        assert int(state.notfinite_count) == i + 1 and int(state.total_notfinite) == i + 1
    after = jax.device_get((params, state.inner_state))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)
    params, state = _apply(tx, params, state, good)
    assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 40
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert not np.array_equal(params["w"], before[0]["w"])


@functools.partial(jax.jit, static_argnums=0)
def _apply(tx, params, state, grads):
    updates, state = tx.update(grads, state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), state


@pytest.mark.slow
def test_divergence_is_skipped_counted_and_stops_after_k_keeping_the_last_good_checkpoint(tmp_path):
    """A real divergence: learning rate 1e30. Step 2 makes the weights ~5e29 (finite), from step 3
    on the loss is inf and the gradients NaN. Those steps are skipped and counted; after
    max_consecutive_nonfinite=3 of them the run stops at step 5, naming it and the last good
    checkpoint (step 2), which is kept: no checkpoint is written inside the streak. Resuming with a
    larger limit (a harmless config change) runs to the end: the parameters at step 6 are those of
    step 2, bit for bit, and finite."""
    workdir, cache = tmp_path / "run", tmp_path / "jax_cache"
    run = {"train.learning_rate": 1e30, "train.num_steps": 6, "checkpoint.every_steps": 1, "checkpoint.keep": 10,
           "sample.num_images": 1}
    first = _run(workdir, cache, **run, **{"train.max_consecutive_nonfinite": 3})
    assert first.returncode != 0
    assert ("NonFiniteError: 3 consecutive non-finite steps up to step 5 (config.train.max_consecutive_nonfinite=3); "
            f"the last good checkpoint (step 2) is kept in {workdir}") in first.stderr, first.stderr[-3000:]
    for step, k in ((3, 1), (4, 2), (5, 3)):
        assert f"step {step}: non-finite loss or gradient, update skipped ({k} in a row, {k} total)" in first.stderr
    assert _complete_steps(workdir) == {1, 2}
    logged = {r["step"]: r for r in _records(workdir)}
    assert sorted(logged) == [1, 2, 3, 4]  # step 5 raised before its log line
    assert np.isfinite([logged[1]["loss"], logged[2]["loss"]]).all()
    assert not np.isfinite(logged[3]["loss"]) and logged[4]["nonfinite_total"] == 2

    second = _run(workdir, cache, **run, **{"train.max_consecutive_nonfinite": 100})
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resumed from step 2" in second.stderr
    assert _complete_steps(workdir) == {1, 2, 6}  # 3, 4, 5 were inside the streak
    config = tiny_config(**run)
    good, end = _restore(workdir, config, 2, 6)
    assert int(end.step) == 6 and int(end.opt_state.total_notfinite) == 4
    for x, y in zip(jax.tree.leaves((good.params, good.opt_state.inner_state)),
                    jax.tree.leaves((end.params, end.opt_state.inner_state))):
        np.testing.assert_array_equal(x, y)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(end.params))


# ----------------------------------------------------------------------------------------------
# Failed asynchronous saves.


class FullDisk:
    """While `full` is set, the last step of every Orbax save (renaming its temporary directory,
    on the background thread of an asynchronous save) fails with ENOSPC, as on a full disk."""

    def __init__(self, monkeypatch):
        from orbax.checkpoint._src.path import atomicity

        self.full = False
        original = atomicity.async_path.rename

        async def rename(*args, **kwargs):
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            return await original(*args, **kwargs)

        monkeypatch.setattr(atomicity.async_path, "rename", rename)


def _small_state():
    return {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "step": np.int32(7)}


def _data_iterator(config):
    from lapflow_jax.data import pipeline
    return pipeline.make_train_iterator(config.data, global_batch_size=8, seed=0, process_index=0, process_count=1)


def test_failed_async_save_surfaces_at_the_next_save(tmp_path, monkeypatch):
    config, disk = tiny_config(), FullDisk(monkeypatch)
    ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints", every_steps=1, keep=3, async_save=True)
    ckpt.save(1, _small_state(), _data_iterator(config), config, force=True)
    ckpt.wait()
    disk.full = True
    assert ckpt.save(2, _small_state(), _data_iterator(config), config, force=True)  # returns before it fails
    with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
        ckpt.save(3, _small_state(), _data_iterator(config), config, force=True)
    msg = str(e.value)
    assert "OSError: [Errno 28] No space left on device" in msg and str(tmp_path / "checkpoints") in msg
    assert "Complete checkpoints there: [1]" in msg and "Training stops" in msg
    assert ckpt.latest_step() == 1  # the failed save is never taken for a checkpoint


def test_failed_async_save_surfaces_at_the_end(tmp_path, monkeypatch):
    config, disk = tiny_config(), FullDisk(monkeypatch)
    ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints", every_steps=1, keep=3, async_save=True)
    disk.full = True
    ckpt.save(1, _small_state(), _data_iterator(config), config, force=True)
    with pytest.raises(ckpt_lib.CheckpointSaveError, match=r"an asynchronous save .* No space left on device"):
        ckpt.wait()  # what train() calls before it returns
    assert ckpt.latest_step() is None


# ----------------------------------------------------------------------------------------------
# Untrusted and foreign checkpoints.


def test_checkpoints_are_read_without_any_unpickler(tmp_path, monkeypatch):
    """Saving and restoring a checkpoint (state, data iterator, config) never unpickles, and every
    file in it is JSON, plain text, or OCDBT/zstd tensorstore data."""
    config = run_config()
    write_checkpoint(tmp_path, config).close()

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(np, "load", refuse)
    ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints", every_steps=1, keep=3)
    assert ckpt.check_resume(3, config) == []
    setup = train.make_setup(config, one_device_mesh())
    shardings, abstract = train.state_shardings(setup)
    ckpt.restore(3, ckpt_lib.abstract_with_shardings(abstract, shardings), _data_iterator(config))
    ckpt.close()
    files = [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()]
    assert files
    for path in files:
        head = path.read_bytes()[:4]
        kind = ("json" if head[:1] in (b"{", b"[") else "text" if head.startswith(b"Chec") else
                "ocdbt" if head[:2] == b"\x0c\xdb" else "zstd" if head == b"\x28\xb5\x2f\xfd" else None)
        assert kind, (path, head)


def test_checkpoint_of_another_model_is_refused_clearly(tmp_path):
    config = run_config()
    write_checkpoint(tmp_path, config).close()
    ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints", every_steps=1, keep=3)
    # Sampling or evaluating with another model's config (restore_state, as sample.py does).
    other = train.make_setup(run_config(**{"model.hidden_size": 64, "model.num_heads": 4}), one_device_mesh())
    shardings, abstract = train.state_shardings(other)
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as e:
        ckpt.restore_state(3, ckpt_lib.abstract_with_shardings(abstract, shardings))
    msg = str(e.value)
    assert f"checkpoint {tmp_path / 'checkpoints' / '3'} does not fit this model" in msg
    assert "params/blocks/0/qkv/kernel: checkpoint ((2, 32, 96), 'float32'), model ((2, 64, 192), 'float32')" in msg
    assert "different model config" in msg
    ckpt.close()
    # A directory of checkpoints written by something else entirely.
    import orbax.checkpoint as ocp
    foreign = ocp.CheckpointManager(tmp_path / "foreign" / "checkpoints",
                                    item_handlers={"weights": ocp.StandardCheckpointHandler()},
                                    options=ocp.CheckpointManagerOptions(create=True))
    foreign.save(5, args=ocp.args.Composite(weights=ocp.args.StandardSave({"w": np.ones(3, np.float32)})))
    foreign.wait_until_finished()
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match=r"has no 'config' item: it was not written by "
                                                                   r"LapFlow-JAX's trainer"):
        train.train(config, str(tmp_path / "foreign"))
    ckpt = ckpt_lib.Checkpointer(tmp_path / "foreign" / "checkpoints", every_steps=1, keep=3)
    setup = train.make_setup(config, one_device_mesh())
    shardings, abstract = train.state_shardings(setup)
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="not written by LapFlow-JAX's trainer"):
        ckpt.restore_state(5, ckpt_lib.abstract_with_shardings(abstract, shardings))
    ckpt.close()


# ----------------------------------------------------------------------------------------------
# SIGKILL at random points.

STEPS, EVERY = 48, 4
FAULT_RUN = {"train.num_steps": STEPS, "checkpoint.every_steps": EVERY, "checkpoint.keep": 100,
             "sample.num_images": 1}


def _kill_when(workdir, cache, condition, timeout=600):
    """Starts a training process and SIGKILLs it as soon as condition(seen) holds (polled every
    few ms). Returns what was seen just before the kill, the start time and the process's stderr."""
    before = len(_records(workdir))
    start = time.time()
    proc = subprocess.Popen(_cmd(workdir, **FAULT_RUN), cwd=REPO, env=_env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    killed = False
    try:
        while time.time() < start + timeout and proc.poll() is None:
            records = _records(workdir)[before:]
            seen = {"last_step": records[-1]["step"] if records else None,
                    "complete": _complete_steps(workdir), "saving": _in_progress_saves(workdir, since=start)}
            if condition(seen):
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.003)
    finally:
        if not killed:
            proc.kill()
        _, err = proc.communicate(timeout=120)
    assert killed, f"the run ended (rc {proc.returncode}) before the kill point: {err[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    return seen, start, err


@pytest.mark.slow
def test_sigkill_at_random_points_and_resume_loses_nothing(tmp_path):
    """Kill -9 at random steps and during asynchronous saves, resume each time: the run completes,
    every loss any run logged equals the uninterrupted run's loss at that step, each resume starts
    from the newest complete checkpoint, no complete checkpoint ever disappears, and the final
    checkpoints equal the uninterrupted run's bit for bit."""
    t0 = time.time()
    cache = tmp_path / "jax_cache"
    straight, workdir = tmp_path / "straight", tmp_path / "killed"
    ref = _run(straight, cache, **FAULT_RUN)
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = {r["step"]: r["loss"] for r in _records(straight)}
    assert sorted(expected) == list(range(1, STEPS + 1))

    rng = random.Random(6)
    plans = ["step", "save", "step", "save"]
    mid_save, complete, kills = 0, set(), []
    for plan in plans:
        resume = max(complete, default=0)
        # A random step up to three checkpoint intervals past the resume point...
        target = resume + rng.randint(1, 3 * EVERY)
        if plan == "step":  # ... killed as soon as it is logged,
            seen, start, err = _kill_when(workdir, cache, lambda s: (s["last_step"] or 0) >= target)
        else:  # ... or at the first save from then on, once its temporary directory exists.
            seen, start, err = _kill_when(workdir, cache,
                                          lambda s: bool(s["saving"]) and (s["last_step"] or 0) >= target)
            mid_save += bool(_in_progress_saves(workdir, since=start))  # still there: a torn save
        kills.append((plan, seen["last_step"], sorted(seen["saving"])))
        resumed = re.search(r"Resumed from step (\d+)", err)
        if complete:
            assert resumed and int(resumed.group(1)) == resume, err[-2000:]
        else:
            assert resumed is None
        after = _complete_steps(workdir)
        assert seen["complete"] <= after and complete <= after, "a complete checkpoint disappeared"
        complete = after
        for record in _records(workdir):
            assert record["loss"] == expected[record["step"]], record
    assert mid_save >= 1, f"no kill landed inside a save: {kills}"

    final = _run(workdir, cache, **FAULT_RUN)
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"Resumed from step {max(complete)}" in final.stderr
    records = _records(workdir)
    assert {r["step"] for r in records} == set(range(1, STEPS + 1))
    assert all(r["loss"] == expected[r["step"]] for r in records)
    assert not _in_progress_saves(workdir)  # torn saves were cleaned up
    steps = sorted(_complete_steps(workdir))
    # Orbax saves the first step of a run that has no checkpoint yet, then every EVERY steps.
    assert steps == sorted(_complete_steps(straight)) == [1, *range(EVERY, STEPS + 1, EVERY)]
    config = tiny_config(**FAULT_RUN)
    for a, b in zip(_restore(straight, config, *steps), _restore(workdir, config, *steps)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    print(f"kills (plan, last logged step, saves in progress): {kills}; {mid_save} inside a save; "
          f"{len(records)} logged losses, all equal to the uninterrupted run's; {time.time() - t0:.0f}s")

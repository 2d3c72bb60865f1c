"""Preemption on a pod: SIGTERM reaches one host only, yet every host saves the same step.

Two processes on localhost (jax.distributed, 4 fake CPU devices each) train with the real entry
point; only process 1 gets SIGTERM, a few steps in. If the hosts decided alone, process 1 would
stop and enter the save's barrier while process 0 waits for it in the next step's all-reduce: both
hang. The collective decision makes both save the same step and exit 0, and the saved run resumes
to the losses of an uninterrupted run, bit for bit.
"""

import re
import signal
import time
from pathlib import Path

import pytest

from test_multihost import finish_two_processes, logged, run_two_processes, start_two_processes

# Constant learning rate after warmup: the schedule does not depend on train.num_steps, so a run
# preempted inside a 100000-step run and resumed to step s + 3 takes the steps of a run of s + 3.
# No interval checkpoints: the last save before the end is the preemption's.
PREEMPTIBLE = {"train.schedule": "constant", "checkpoint.every_steps": 100000, "log.sample_every_steps": 0}
SAVED = re.compile(r"Preempted: checkpoint at step (\d+) saved")


def wait_for_logged_steps(workdir: Path, count: int, procs, timeout: float = 600) -> None:
    """Until process 0 has logged `count` steps (both processes are then training)."""
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= count):
        if time.monotonic() > deadline or any(p.poll() is not None for p, _ in procs):
            finish_two_processes(workdir, procs, timeout=1)  # reports the logs of what went wrong
            pytest.fail(f"the run did not log {count} steps")
        time.sleep(0.2)


def preempt_process_1(work: Path, env=None) -> tuple[int, list[str]]:
    """Starts a long 2-process run, sends SIGTERM to process 1 alone after 3 logged steps, checks
    that both processes exit 0 having saved the same step, and returns that step and their logs."""
    procs = start_two_processes(work, env=env, **{**PREEMPTIBLE, "train.num_steps": 100000})
    wait_for_logged_steps(work, 3, procs)
    procs[1][0].send_signal(signal.SIGTERM)
    # Saving a 32-wide model takes seconds; the old per-host decision hung here until killed.
    logs = finish_two_processes(work, procs, timeout=240)

    stopped = [SAVED.findall(log) for log in logs]
    assert all(len(s) == 1 for s in stopped), stopped
    step = int(stopped[0][0])
    assert int(stopped[1][0]) == step, f"process 0 saved step {stopped[0][0]}, process 1 step {stopped[1][0]}"
    assert step >= 3
    checkpoints = work / "checkpoints"
    # Orbax also saves the first step of a fresh run; nothing after the agreed step.
    assert max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == step
    assert sorted(p.name for p in (checkpoints / str(step) / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert not list(work.glob("samples/samples_step*.png"))  # a preempted run stops before the final samples
    return step, logs


@pytest.mark.slow
def test_sigterm_on_one_host_saves_the_same_step_on_both_and_resumes_exactly(tmp_path):
    """JAX's preemption service (the default) agrees on the step."""
    work = tmp_path / "preempted"
    step, logs = preempt_process_1(work)
    # JAX's C++ handler took the signal: the Python one (which would have replaced it) is not installed.
    assert not any("SIGTERM received" in log or "preemption_service is off" in log for log in logs)

    # Resume to step + 3, and run the same steps uninterrupted: the same losses, bit for bit (the
    # same two processes sum their gradients in the same order).
    total = step + 3
    run_two_processes(work, **{**PREEMPTIBLE, "train.num_steps": total})
    reference = tmp_path / "uninterrupted"
    run_two_processes(reference, **{**PREEMPTIBLE, "train.num_steps": total})
    resumed = {r["step"]: r["loss"] for r in logged(work)}
    straight = {r["step"]: r["loss"] for r in logged(reference)}
    assert sorted(resumed) == sorted(straight) == list(range(1, total + 1))
    print(f"preempted at step {step}; resumed losses {[resumed[s] for s in range(step + 1, total + 1)]}")
    assert [resumed[s] for s in range(1, total + 1)] == [straight[s] for s in range(1, total + 1)]


@pytest.mark.slow
def test_sigterm_on_one_host_without_jax_preemption_service(tmp_path):
    """With JAX's preemption service off, the hosts agree by all-gathering their SIGTERM flags."""
    _, logs = preempt_process_1(tmp_path / "preempted", env={"JAX_ENABLE_PREEMPTION_SERVICE": "false"})
    assert all("preemption_service is off" in log for log in logs)
    assert "SIGTERM received" in logs[1] and "SIGTERM received" not in logs[0]

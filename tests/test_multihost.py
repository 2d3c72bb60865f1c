"""Two processes on localhost (jax.distributed, 4 fake CPU devices each) run the real entry point:
train, save, stop, resume. Their losses equal a one-process run on 8 devices with the same global
batch (config.input_shards=2 fixes how the batch is read, whatever the number of processes), and
their checkpoint resumes in one process with the same losses.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lapflow_jax import train

import demo_run

REPO = demo_run.REPO
DEMO_CONFIG = demo_run.DEMO_CONFIG

# Tiny model, 16x16 images, a global batch of 16 (8 per process; 8 per scale stage, 1 per device).
OVERRIDES = {
    "model.hidden_size": 32, "model.depth": 1, "model.num_heads": 4, "model.patch_sizes": (2, 2),
    "model.attention_backend": "xla", "data.image_size": 16, "data.num_records": 64,
    "train.global_batch_size": 16, "train.warmup_steps": 2, "log.every_steps": 1, "sample.num_images": 2,
    "sample.steps": 2, "sample.previews": False, "checkpoint.every_steps": 3, "input_shards": 2,
    "mesh_shape": (-1, 1),
}
# gloo all-reduces sum in another order than the in-process CPU collectives: equal up to float32
# rounding (measured: relative differences of ~1e-7).
LOSS_RTOL = 1e-5


def cli_args(**overrides):
    return demo_run.cli_args({**OVERRIDES, **overrides})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_processes(workdir, mode="train", env=None, **overrides) -> list[tuple[subprocess.Popen, object]]:
    """Starts process 0 and 1 of a 2-process run of the entry point (with `env` added to their
    environment); each logs to <workdir>.process<i>.log."""
    port = free_port()
    procs = []
    for i in range(2):
        env_i = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
                 **(env or {})}
        cmd = [sys.executable, "-m", "lapflow_jax.main", f"--config={DEMO_CONFIG}", f"--workdir={workdir}",
               f"--mode={mode}", *cli_args(**overrides), f"--coordinator_address=127.0.0.1:{port}",
               "--num_processes=2", f"--process_id={i}"]
        log = open(Path(str(workdir) + f".process{i}.log"), "w")
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env_i, stdout=log, stderr=subprocess.STDOUT), log))
    return procs


def finish_two_processes(workdir, procs, timeout: float = 900) -> list[str]:
    """Waits (at most `timeout` seconds for both together, or until one fails), kills what is left,
    asserts both exited 0, and returns their logs."""
    deadline = time.monotonic() + timeout
    # Stop waiting as soon as one fails: the other would wait for it in a collective until timeout.
    while (time.monotonic() < deadline and any(p.poll() is None for p, _ in procs)
           and not any(p.poll() for p, _ in procs)):
        time.sleep(0.5)
    failed = any(p.poll() for p, _ in procs)
    hung = [] if failed else [i for i, (p, _) in enumerate(procs) if p.poll() is None]
    for proc, log in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    logs = [Path(str(workdir) + f".process{i}.log").read_text() for i in range(2)]
    assert not hung, f"process(es) {hung} still running after {timeout:.0f} s (hung), killed:\n" + "\n".join(
        f"--- process {i}:\n{text[-3000:]}" for i, text in enumerate(logs))
    bad = [i for i, (proc, _) in enumerate(procs) if proc.returncode != 0]  # -9: killed after the other failed
    assert not bad, "\n".join(f"--- process {i} failed (exit {procs[i][0].returncode}):\n{logs[i][-3000:]}"
                               for i in bad)
    return logs


def run_two_processes(workdir, mode="train", **overrides):
    return finish_two_processes(workdir, start_two_processes(workdir, mode, **overrides))


def logged(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def config_with(**overrides):
    return demo_run.demo_config({**OVERRIDES, **overrides})


@pytest.mark.slow
def test_two_processes_train_save_resume_equal_one_process(tmp_path):
    # The two processes split the optimizer state and EMA over their 8 chips (ZeRO-1); the
    # one-process reference keeps them whole, so this also checks that ZeRO-1 across hosts steps
    # like whole state, and that its checkpoint restores into a run without it.
    work = tmp_path / "two"
    logs = run_two_processes(work, **{"train.num_steps": 3, "zero1": True})
    assert all("process %d of 2, 4 local / 8 global devices" % i in logs[i] for i in range(2))
    assert "split over 8 data-parallel chips" in logs[0], logs[0][-3000:]
    # Orbax wrote one checkpoint from both hosts; each host stored its own data iterator state.
    assert sorted(p.name for p in (work / "checkpoints" / "3" / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    shutil.copytree(work, tmp_path / "two_then_one")
    logs = run_two_processes(work, **{"train.num_steps": 6, "zero1": True})
    assert all("Resumed from step 3" in log for log in logs)

    # The reference: one process, the 8 devices of conftest.py, the same global batches.
    assert jax.process_count() == 1 and jax.device_count() == 8
    summary = train.train(config_with(**{"train.num_steps": 6}), str(tmp_path / "one"))
    assert summary["step"] == 6

    two = logged(work)
    # Process 0 alone writes: each step once per run (steps 1-3, then 4-6).
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
    one = {r["step"]: r["loss"] for r in logged(tmp_path / "one")}
    losses_two = [r["loss"] for r in two]
    print("two processes:", losses_two, "\none process:  ", [one[s] for s in range(1, 7)])
    np.testing.assert_allclose(losses_two, [one[s] for s in range(1, 7)], rtol=LOSS_RTOL)

    # The two-process checkpoint of step 3, resumed by one process: it now reads both input shards,
    # whose iterator states the two processes saved in separate files.
    summary = train.train(config_with(**{"train.num_steps": 6}), str(tmp_path / "two_then_one"))
    assert summary["step"] == 6
    switched = [r["loss"] for r in logged(tmp_path / "two_then_one")]
    print("two processes to step 3, then one:", switched)
    np.testing.assert_allclose(switched, [one[s] for s in range(1, 7)], rtol=LOSS_RTOL)
    # Sampling at the end ran on the sharded parameters of both processes; process 0 wrote it.
    assert (work / "samples" / "samples_step0000006.png").exists()
    assert len(list((work / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per run, not per host


@pytest.mark.slow
def test_two_processes_sample_like_one(tmp_path):
    """The sample mode on two processes (batches sharded over both, process 0 writes, the others
    wait at a barrier) gives the images one process makes from the same checkpoint."""
    work = tmp_path / "two"
    run_two_processes(work, **{"train.num_steps": 3})
    shutil.copytree(work, tmp_path / "one")
    sampling = {"sample.num_images": 12, "sample.batch_size": 8}  # 2 batches, the last one partly used
    run_two_processes(work, mode="sample", **sampling)

    from lapflow_jax import sample
    summary = sample.sample_from_checkpoint(config_with(**sampling), str(tmp_path / "one"))
    assert summary["num_images"] == 12 and summary["devices"] == 8

    def images(workdir):
        with np.load(Path(workdir) / "generated" / "step0000003" / "samples.npz") as data:
            return data["images"].astype(np.int32)

    two, one = images(work), images(tmp_path / "one")
    assert two.shape == one.shape == (12, 16, 16, 1)  # the demo's grayscale digits
    assert two.std() > 5  # real images, not a constant
    # The same params and noise; collectives sum in another order, so a pixel may round the other way.
    assert np.abs(two - one).max() <= 1, np.abs(two - one).max()


# ----------------------------------------------------------------------------------------------
# The eval mode on two processes.

EVAL = {"pyramid.sigmas": (0.1, 0.7), "sample.method": "euler", "sample.guidance_scale": 1.0, "sample.batch_size": 8, "eval.num_samples": 24,
        "eval.num_reference": 16, "eval.part_rows": 8, "eval.feature_batch_size": 8,
        "eval.metrics": ("fid", "inception_score", "precision_recall", "swd")}


def _random_inception_weights(path):
    import test_inception
    import torch

    torch.manual_seed(0)
    net = test_inception._TorchFIDInception(test_inception._load_torch_fidelity_blocks())
    test_inception._randomise(net, seed=1)
    torch.save(net.state_dict(), path)
    return str(path)


def _wrote(logs) -> list[tuple[int, str]]:
    """(process, path) of every 'wrote <path>' line: the shared files, each logged by its one writer."""
    import re

    return [(i, m) for i, log in enumerate(logs) for m in re.findall(r"\] wrote (\S+)", log)]


@pytest.mark.slow
def test_two_process_eval_equals_one_process_and_resumes_after_a_kill(tmp_path):
    """Eval on two processes (4 CPU devices each): each host samples, decodes and embeds its own
    rows (the parts carry the host's number), process 0 alone writes the shared files (settings,
    reference statistics, the ADM samples file, metrics.json), and the metrics equal one process's
    on 8 devices, as do the features themselves. Killed midway (process 1 with SIGKILL after the
    first part, then process 0), the same command resumes and gives the same metrics as the
    uninterrupted run."""
    weights = _random_inception_weights(tmp_path / "random_inception.pth")
    overrides = {**EVAL, "eval.inception_weights": weights}
    work = tmp_path / "one"
    for name in ("one", "two", "killed"):
        demo_run.write_checkpoint(tmp_path / name, config_with(**overrides))

    from lapflow_jax import evaluate
    one = evaluate.evaluate_from_checkpoint(config_with(**overrides), str(work))
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

    logs = finish_two_processes(tmp_path / "two", start_two_processes(tmp_path / "two", "eval", env=env, **overrides))
    two = json.loads((tmp_path / "two" / "eval" / "step0000002" / "metrics.json").read_text())
    print("one process:", one["metrics"], "\ntwo processes:", two["metrics"])
    assert two["metrics"].keys() == one["metrics"].keys()
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    from lapflow_jax.evaluation import streaming

    def features(workdir):
        store = streaming.PartStore.open(workdir / "eval" / "step0000002" / "parts", 24)
        (kind,) = {n.split(".")[2] for n in store.names() if n.startswith("p") and "inception" in n}
        return np.concatenate([r["pool"] for _, r in store.rows(kind, ["pool"], limit=24, ordered=True)])

    np.testing.assert_allclose(features(tmp_path / "two"), features(work), rtol=1e-5, atol=1e-6)
    wrote = _wrote(logs)
    paths = [p for _, p in wrote]
    assert {i for i, _ in wrote} == {0} and len(paths) == len(set(paths)), wrote
    assert any(p.endswith("samples_24x16x16x3.npz") for p in paths) and any(p.endswith("metrics.json") for p in paths)
    parts = sorted(p.name for p in (tmp_path / "two" / "eval" / "step0000002" / "parts").glob("*.images.npz"))
    assert parts == [f"p{p:05d}.h{h:04d}.images.npz" for p in range(3) for h in range(2)]

    # Killed midway: process 1 once both hosts wrote part 0, then process 0; the same command again.
    killed = tmp_path / "killed"
    procs = start_two_processes(killed, "eval", env=env, **overrides)
    first = [killed / "eval" / "step0000002" / "parts" / f"p00000.h{h:04d}.images.npz" for h in range(2)]
    deadline = time.monotonic() + 600
    while not all(p.exists() for p in first) and time.monotonic() < deadline and procs[1][0].poll() is None:
        time.sleep(0.05)
    assert all(p.exists() for p in first), "the first part never appeared"
    for proc, log in reversed(procs):
        proc.kill()
        proc.wait()
        log.close()
    assert not (killed / "eval" / "step0000002" / "metrics.json").exists()
    logs = finish_two_processes(killed, start_two_processes(killed, "eval", env=env, **overrides))
    assert "eval: samples: 24 rows in 3 batches of 8 (3 parts); 3 part(s) to do" not in logs[0]
    again = json.loads((killed / "eval" / "step0000002" / "metrics.json").read_text())
    assert again["metrics"] == two["metrics"]

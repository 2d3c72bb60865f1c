"""A spot slice preempted in the middle of training is recreated, set up again and resumed by
launch/train.sh itself, and the loss curve continues exactly.

The slice is tests/fake_pod.py's fake `gcloud`: 2 workers, each a local process of one
jax.distributed job, with the GCS emulator as the bucket of the workdir. The sequence is the
one docs/cloud_tpu.md gives: create_tpu.sh --spot, setup_workers.sh, train.sh. During training
the fake sends SIGTERM to worker 1 alone (a preempted VM) and then reports the slice PREEMPTED;
train.sh must delete and recreate it (bare worker folders), run setup_workers.sh again (without
it the relaunch finds no code and no venv) and relaunch, and the run must resume from the
preemption's checkpoint: every step's loss equal, bit for bit, to an uninterrupted run's.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import demo_run
import fake_pod
from gcs_emulator import running_emulator
import rehearse
from rehearse import make_image_folder
from test_multihost import OVERRIDES

REPO = demo_run.REPO
STEPS = 24
# No interval checkpoints (the only save before the end is the preemption's); a constant schedule.
RUN = {**OVERRIDES, "train.num_steps": STEPS, "train.schedule": "constant", "checkpoint.every_steps": 100000,
       "log.sample_every_steps": 0}


def launch(script: str, env: dict, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(REPO / "launch" / script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stderr[-6000:]}"
    return proc


def pod_env(tmp_path: Path, gcs) -> dict:
    bin_dir, state = tmp_path / "bin", tmp_path / "pod"
    fake_pod.install(bin_dir, state)
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "PYTHONPATH")}
    env.update(gcs.env)
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HOME=str(tmp_path / "home"),
               FAKE_POD_DIR=str(state), PROJECT="my-proj", ZONE="us-east5-a", TPU_NAME="lapflow-v5p",
               ACCELERATOR_TYPE="v5p-16", POLL_SECONDS="0", RECHECK_SECONDS="0", BACKOFF_SECONDS="0",
               TMPDIR=str(tmp_path))
    return env


def losses(gcs, run: str) -> dict[int, float]:
    rows = [json.loads(line) for line in gcs.read(f"{run}/metrics.jsonl").decode().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


@pytest.mark.slow
def test_preempted_slice_is_recreated_set_up_and_resumes_exactly(tmp_path):
    with running_emulator() as gcs:
        env = pod_env(tmp_path, gcs)
        launch("create_tpu.sh", env, "--spot")
        launch("setup_workers.sh", env)
        args = ["CONFIG=configs/demo.py", "MAX_RETRIES=1", "--", "--distributed", *demo_run.cli_args(RUN)]

        start = time.monotonic()
        preempted = launch("train.sh", {**env, "FAKE_POD_PREEMPT_AFTER": "3", "LOG_DIR": str(tmp_path / "logs1")},
                           f"WORKDIR={gcs.gs('preempted')}", *args)
        seconds = time.monotonic() - start
        named = [" ".join(c[2:4]) for c in fake_pod.calls(tmp_path / "pod")]
        # The run: train (preempted), read the states, delete, create, set up again, train.
        first = named.index("tpu-vm ssh", named.index("tpu-vm ssh") + 1)  # the first training ssh
        assert [n for n in named[first:] if n != "tpu-vm scp"] == [
            "tpu-vm ssh", "queued-resources describe", "tpu-vm describe",
            "queued-resources delete", "queued-resources describe", "queued-resources create",
            "queued-resources describe", "tpu-vm ssh", "tpu-vm ssh"], named[first:]
        assert "retry 1 of 1: recreating lapflow-v5p" in preempted.stderr
        logs = tmp_path / "logs1" / "attempt1"
        resumed_logs = [(logs / f"worker{i}.log").read_text() for i in range(2)]
        ssh_logs = sorted((tmp_path / "pod" / "ssh").glob("1-worker*.log"))  # call 0 was the setup
        output = "".join(log.read_text() for log in ssh_logs)
        saved = [line for line in output.splitlines() if "Preempted: checkpoint at step" in line]
        assert len(saved) == 2, output[-6000:]  # both workers saved, the same step
        assert saved[0].split("step ")[1] == saved[1].split("step ")[1], saved
        step = int(saved[0].split("checkpoint at step ")[1].split()[0])
        assert all(f"Resumed from step {step}" in log for log in resumed_logs), resumed_logs[0][-3000:]
        assert 3 <= step < STEPS

        reference = launch("train.sh", {**env, "LOG_DIR": str(tmp_path / "logs2")},
                           f"WORKDIR={gcs.gs('uninterrupted')}", *args)
        assert "Resumed" not in reference.stderr
        resumed, straight = losses(gcs, "preempted"), losses(gcs, "uninterrupted")
        assert sorted(resumed) == sorted(straight) == list(range(1, STEPS + 1))
        print(f"preempted at step {step}; train.sh with the preemption took {seconds:.0f} s; "
              f"losses after it {[resumed[s] for s in range(step + 1, STEPS + 1)][:4]}")
        assert [resumed[s] for s in range(1, STEPS + 1)] == [straight[s] for s in range(1, STEPS + 1)]


def test_cache_latents_refuses_each_workers_own_disk_on_the_pod(tmp_path):
    """launch/cache_latents.sh on the 2-worker slice with LATENTS_DIR on the workers' own disks (the
    rehearsal's --break_step=local-latents): refused before any worker runs, naming the field."""
    with running_emulator() as gcs:
        env = pod_env(tmp_path, gcs)
        launch("create_tpu.sh", env, "--spot")
        proc = subprocess.run(["bash", str(REPO / "launch" / "cache_latents.sh"), f"CONFIG={rehearse.CONFIG}",
                               "LATENTS_DIR=/local-disk/latents/imagenet256"], env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert ("LATENTS_DIR='/local-disk/latents/imagenet256' is a local path: on lapflow-v5p's 2 workers each would"
                " write only its own shards") in proc.stderr
        assert "Set LATENTS_DIR=gs://BUCKET/latents/NAME" in proc.stderr
        assert [c[2:4] for c in fake_pod.calls(tmp_path / "pod") if c[2:4] == ["tpu-vm", "ssh"]] == []
        assert not list((tmp_path / "pod" / "workers").glob("*/local-disk"))


def test_prepare_data_puts_an_image_folder_in_the_bucket(tmp_path):
    """launch/prepare_data.sh SOURCE=image_folder: built locally, copied to the bucket with gcloud
    storage cp, and the printed tfds name reads back from the bucket."""
    make_image_folder(tmp_path / "images", classes=3, per_class=4)
    with running_emulator() as gcs:
        env = pod_env(tmp_path, gcs)
        env["PYTHONPATH"] = str(REPO)
        proc = launch("prepare_data.sh", env, "SOURCE=image_folder", f"FOLDER={tmp_path / 'images'}",
                      f"DATA_DIR={gcs.gs('tfds')}", f"LOCAL_DIR={tmp_path / 'tfds'}", f"PYTHON={sys.executable}",
                      timeout=120)
        local = sorted(p.relative_to(tmp_path / "tfds").as_posix() for p in (tmp_path / "tfds").rglob("*") if p.is_file())
        assert gcs.names("tfds/") == [f"tfds/{name}" for name in local]
        assert any(name.endswith(".array_record-00000-of-00001") for name in local), local
        fields = re.search(r"--config.latent.source.tfds_name=(\S+) --config.latent.source.data_dir=(\S+)", proc.stderr)
        assert fields.group(2) == gcs.gs("tfds")
        config_name = fields.group(1).split("/")[1].split(":")[0]
        assert f"tfds/lapflow_image_folder/{config_name}/1.0.0/dataset_info.json" in gcs.names("tfds/")
        info = json.loads(gcs.read(f"tfds/lapflow_image_folder/{config_name}/1.0.0/dataset_info.json"))
        assert [int(n) for n in info["splits"][0]["shardLengths"]] == [12]


@pytest.mark.slow
def test_rehearsal_of_the_imagenet_latent_sequence(tmp_path):
    """tests/rehearse.py: docs/cloud_tpu.md's ImageNet-latent sequence on the simulated pod (data
    to the bucket, latents cached by both hosts into it, training preempted and resumed by
    train.sh). `python tests/rehearse.py --break_step=local-latents` is the same walk with the
    latent cache written to each worker's disk instead: cache_latents.sh refuses it (the test above)."""
    summary = rehearse.rehearse(tmp_path)
    print(f"rehearsal: {summary['seconds']:.0f} s, preempted at step {summary['preempted_at']}, commands:\n"
          + "\n".join(summary["commands"]))
    assert [c.split()[0] for c in summary["commands"]] == [
        "gcloud", "gcloud", "launch/create_tpu.sh", "launch/setup_workers.sh", "launch/prepare_data.sh",
        "launch/cache_latents.sh", "launch/train.sh", "gcloud", "launch/train.sh", "gcloud", "gcloud",
        "launch/train.sh", "gcloud", "gcloud"]
    assert 1 <= summary["preempted_at"] < rehearse.STEPS


@pytest.mark.slow
def test_rehearsal_fails_when_the_latent_cache_is_on_each_workers_disk(tmp_path):
    """The deliberate break: `python tests/rehearse.py --break_step=local-latents` stops at
    cache_latents.sh (the documented command refuses it), before any worker encodes."""
    with pytest.raises(rehearse.RehearsalFailed, match=r"(?s)step failed: launch/cache_latents\.sh .*"
                       r"LATENTS_DIR='/local-disk/latents/imagenet256' is a local path"):
        rehearse.rehearse(tmp_path, break_step="local-latents")

"""Training end to end: loss goes down, one compile, exact resume across processes, preemption."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lapflow_jax import parallel, train
from lapflow_jax.data import pipeline

import demo_run

REPO = demo_run.REPO
DEMO_CONFIG = demo_run.DEMO_CONFIG

# A tiny run of the demo config: 16x16 crops, a 32-wide 1-block MoT, 8 images per step.
TINY_OVERRIDES = {
    "model.hidden_size": 32, "model.depth": 1, "model.num_heads": 2, "model.patch_sizes": (2, 2),
    "data.image_size": 16, "data.num_records": 64, "train.global_batch_size": 8, "train.warmup_steps": 2,
    "log.every_steps": 1, "sample.num_images": 2, "sample.steps": 4, "sample.previews": False,
    "checkpoint.every_steps": 3, "mesh_shape": (1, 1),
    # Unguided: the demo's guidance would double the few sampling calls, and tiny runs that turn
    # the labels off (model.conditional=False) could not be guided at all.
    "sample.guidance_scale": 1.0,
}


def tiny_config(**overrides):
    return demo_run.demo_config({**TINY_OVERRIDES, **overrides})


def cli_args(**overrides):
    return demo_run.cli_args({**TINY_OVERRIDES, **overrides})


def run_main(workdir, *extra, check=True, **overrides):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "lapflow_jax.main", f"--config={DEMO_CONFIG}", f"--workdir={workdir}",
           *cli_args(**overrides), *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=check, timeout=600)


def logged_losses(workdir) -> dict[int, float]:
    losses = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses[int(record["step"])] = record["loss"]  # a re-logged step keeps its last value
    return losses


def restore_params(workdir, config):
    from lapflow_jax import checkpoint as ckpt_lib
    setup = train.make_setup(config, parallel.make_mesh((1, 1), jax.devices()[:1]))
    shardings, abstract = train.state_shardings(setup)
    ckpt = ckpt_lib.Checkpointer(Path(workdir) / "checkpoints", every_steps=1, keep=3)
    state = ckpt.restore_state(ckpt.latest_step(), ckpt_lib.abstract_with_shardings(abstract, shardings))
    ckpt.close()
    return state


@pytest.mark.parametrize("num_scales", [1, 2, 3])
def test_tiny_model_learns_a_handful_of_images(num_scales):
    """A few hundred steps on 8 photos: the loss falls well below its start (printed)."""
    starts = {1: (0.0,), 2: (0.5, 0.0), 3: (2 / 3, 1 / 3, 0.0)}[num_scales]
    config = tiny_config(**{"num_scales": num_scales, "window_starts": starts, "model.patch_sizes": (2,) * num_scales,
                            "data.name": "demo_photos", "data.channels": 3, "data.num_records": 8, "data.random_flip": False, "model.hidden_size": 64,
                            "model.depth": 2, "model.num_heads": 4, "train.learning_rate": 2e-3,
                            "train.global_batch_size": 12 if num_scales == 3 else 8})
    setup = train.make_setup(config, parallel.make_mesh((1, 1), jax.devices()[:1]))
    state = train.create_state(setup, train.measure_sigmas(config))
    step = train.make_train_step(setup)
    it = pipeline.make_train_iterator(config.data, global_batch_size=config.train.global_batch_size, seed=0,
                                      process_index=0, process_count=1)
    losses = []
    for _ in range(300):
        state, metrics = step(state, parallel.global_batch(next(it), setup.mesh))
        losses.append(float(metrics["loss"]))
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    print(f"{num_scales} scale(s): mean loss of the first 20 steps {first:.3f}, of the last 20 {last:.3f} "
          f"({last / first:.0%})")
    assert last < 0.5 * first
    # Compiled once for all 300 steps.
    assert step._cache_size() == 1


def test_exact_resume_in_a_new_process(tmp_path):
    """6 steps straight vs 3 steps, a new process, 3 more: identical losses and parameters."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_main(straight, **{"train.num_steps": 6})
    run_main(split, **{"train.num_steps": 3})
    run_main(split, **{"train.num_steps": 6})
    a, b = logged_losses(straight), logged_losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]  # bit-identical
    config = tiny_config(**{"train.num_steps": 6})
    pa, pb = restore_params(straight, config), restore_params(split, config)
    assert int(pa.step) == int(pb.step) == 6
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The run left what a user looks for.
    assert list((straight / "samples").glob("samples_step*.png"))
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))


def test_half_written_checkpoint_is_ignored(tmp_path):
    run_main(tmp_path, **{"train.num_steps": 3})
    # A save killed midway leaves Orbax's temporary directory behind.
    junk = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1234567"
    (junk / "state").mkdir(parents=True)
    (junk / "state" / "garbage").write_bytes(b"\x00" * 100)
    result = run_main(tmp_path, **{"train.num_steps": 6})
    assert "Resumed from step 3" in result.stderr
    assert logged_losses(tmp_path)[6]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "lapflow_jax.main", f"--config={DEMO_CONFIG}", f"--workdir={tmp_path}",
           *cli_args(**{"train.num_steps": 100000, "checkpoint.every_steps": 100000})]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 3
    assert "Preempted" in err


def _traced_steps(xplane_path) -> list[int]:
    """Step numbers of the StepTraceAnnotation("train") events in a jax.profiler xplane.pb file."""
    data = jax.profiler.ProfileData.from_file(str(xplane_path))
    steps = set()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name == "train":
                    steps.update(int(v) for k, v in event.stats if k == "step_num")
    return sorted(steps)


@pytest.mark.slow
def test_profiler_traces_the_chosen_steps_next_to_the_tensorboard_events(tmp_path):
    """log.profile_start_step=2, profile_num_steps=2 of a 3-step run: a trace of steps 2 and 3 only."""
    import gzip

    config = tiny_config(**{"train.num_steps": 3, "log.profile_start_step": 2, "log.profile_num_steps": 2,
                            "mesh_shape": (-1, 1), "train.global_batch_size": 16})
    train.train(config, str(tmp_path))
    runs = list((tmp_path / "tensorboard" / "plugins" / "profile").iterdir())
    assert len(runs) == 1, runs
    xplanes = list(runs[0].glob("*.xplane.pb"))
    assert len(xplanes) == 1, list(runs[0].iterdir())  # process 0 only (profile_processes='first')
    assert _traced_steps(xplanes[0]) == [2, 3]
    # The trace-viewer and Perfetto (ui.perfetto.dev) files parse as Chrome trace-event JSON.
    names = sorted(p.name for p in runs[0].glob("*.json.gz"))
    assert names == ["perfetto_trace.json.gz", xplanes[0].name.replace(".xplane.pb", ".trace.json.gz")], names
    for name in names:
        with gzip.open(runs[0] / name, "rt") as f:
            events = json.load(f)["traceEvents"]
        assert any(e.get("name") == "train" for e in events), (name, len(events))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*")), "events beside the trace"


def test_profiler_fields_are_validated():
    with pytest.raises(ValueError, match="config.log.profile_processes='some'"):
        from lapflow_jax import config as config_lib
        config_lib.validate(tiny_config(**{"log.profile_processes": "some"}))

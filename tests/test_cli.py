"""The command lines (lapflow_jax/cli.py): relative and ~ paths work everywhere, the console shows the
run's own lines and warnings (other libraries' INFO only with --verbose), the logged loss is the mean
over the logging interval, and a bad config or path ends in one line, not a traceback."""

import glob
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lapflow_jax import cli, train
from lapflow_jax import config as config_lib

from test_train import DEMO_CONFIG, REPO, cli_args, tiny_config

# An absl log line: "I1129 02:57:37.142285 139995895450496 metrics.py:232] message".
ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ ([^:\]]+):\d+\] ")
OUR_FILES = {p.name for p in Path(cli.PACKAGE_DIR).rglob("*.py")}


def _env(**extra):
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
            **extra}


def _main(cwd, *args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "lapflow_jax.main", f"--config={DEMO_CONFIG}", *args], cwd=cwd,
                          env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _info_files(console: str) -> set[str]:
    """Source files of the absl-format INFO lines in a console text."""
    return {m.group(2) for m in map(ABSL_LINE.match, console.splitlines()) if m and m.group(1) == "I"}


# ----------------------------------------------------------------------------------------------
# Paths.


def test_resolve_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli.resolve_path("runs/demo") == str(tmp_path / "runs" / "demo")
    assert cli.resolve_path("./runs/../x") == str(tmp_path / "x")
    assert cli.resolve_path("~/data") == str(tmp_path / "home" / "data")
    assert cli.resolve_path("/abs/path") == "/abs/path"
    for unchanged in ("", "gs://bucket/runs/demo", "s3://b/x", "file:///tmp/x"):
        assert cli.resolve_path(unchanged) == unchanged


def test_resolve_config_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    c = config_lib.base_config()
    c.data.data_dir, c.data.folder, c.latent.autoencoder = "tfds", "~/pictures", "autoencoders/vae"
    c.latent.source.folder, c.eval.reference_npz, c.eval.samples_npz = "pics", "gs://bucket/ref.npz", ""
    c.eval.inception_weights = "/weights/pt_inception.pth"
    changed = cli.resolve_config_paths(c)
    assert c.data.data_dir == str(tmp_path / "tfds") and c.data.folder == str(tmp_path / "home" / "pictures")
    assert c.latent.autoencoder == str(tmp_path / "autoencoders" / "vae")
    assert c.latent.source.folder == str(tmp_path / "pics")
    assert (c.eval.reference_npz, c.eval.samples_npz) == ("gs://bucket/ref.npz", "")
    assert c.eval.inception_weights == "/weights/pt_inception.pth"
    assert sorted(changed) == ["data.data_dir", "data.folder", "latent.autoencoder", "latent.source.folder"]
    assert changed["data.folder"] == ("~/pictures", str(tmp_path / "home" / "pictures"))
    # A config without some sections (e.g. an older one) is fine.
    del c["latent"]
    cli.resolve_config_paths(c)


# Named like a path but not one.
NOT_PATHS = {"train.scale_weights"}


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def test_every_path_field_of_every_config_is_resolved():
    """A new file or folder field must join CONFIG_PATH_FIELDS, or it stays relative to the cwd."""
    looks_like_path = re.compile(r"(_dir|_npz|_path|_file|folder|_weights|autoencoder|_stats)$")
    configs = [config_lib.base_config()] + [runpy.run_path(f)["get_config"]()
                                            for f in sorted(glob.glob(str(REPO / "configs" / "*.py")))]
    named = {k for c in configs for k in _flat(c.to_dict()) if looks_like_path.search(k)} - NOT_PATHS
    assert "data.data_dir" in named and "eval.samples_npz" in named  # the pattern finds them
    assert named <= set(cli.CONFIG_PATH_FIELDS), sorted(named - set(cli.CONFIG_PATH_FIELDS))


# ----------------------------------------------------------------------------------------------
# Console.


def test_console_filter_keeps_our_info_and_every_warning(monkeypatch):
    import logging

    from absl import flags
    from absl import logging as absl_logging

    def record(path, level):
        return logging.LogRecord("absl", level, path, 1, "message", None, None)

    ours = os.path.join(cli.PACKAGE_DIR, "train.py")
    orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    keep = cli._FILTER.filter  # pylint: disable=protected-access
    assert keep(record(ours, logging.INFO)) and keep(record(orbax, logging.WARNING))
    assert not keep(record(orbax, logging.INFO)) and not keep(record(orbax, logging.DEBUG))
    # Inside an absl app: the filter is on its handler, off with --verbose or an explicit --verbosity.
    handler = absl_logging.get_absl_handler()
    monkeypatch.setattr(logging.root, "handlers", [handler])
    monkeypatch.setattr(logging.root, "level", logging.root.level)
    try:
        monkeypatch.setattr(flags.FLAGS["verbosity"], "present", 0)
        cli.setup_console(verbose=False)
        assert cli._FILTER in handler.filters  # pylint: disable=protected-access
        cli.setup_console(verbose=True)
        assert cli._FILTER not in handler.filters  # pylint: disable=protected-access
        cli.setup_console(verbose=False)
        monkeypatch.setattr(flags.FLAGS["verbosity"], "present", 1)
        cli.setup_console(verbose=False)
        assert cli._FILTER not in handler.filters  # pylint: disable=protected-access
    finally:
        handler.removeFilter(cli._FILTER)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------------
# Train, sample and eval from a relative (and a ~) workdir; the console.

RUN = {"train.num_steps": 4, "log.every_steps": 2, "checkpoint.every_steps": 2, "sample.num_images": 4,
       "sample.batch_size": 2, "sample.gflops": False, "eval.num_samples": 4}


@pytest.mark.slow
def test_train_sample_eval_from_a_relative_workdir(tmp_path):
    """The README's way, `--workdir=workdirs/demo` from wherever the command runs (~4 min here).

    Without resolving paths at the entry point, Orbax refuses the first save ("Checkpoint path
    should be absolute"). The default console has no INFO line from Orbax, absl or JAX, only the
    run's own; the --verbose sample run shows Orbax's (so the filter, not their silence, hides them).
    """
    train_run = _main(tmp_path, "--workdir=workdirs/demo", *cli_args(**RUN))
    assert train_run.returncode == 0, train_run.stderr[-3000:]
    run = tmp_path / "workdirs" / "demo"
    assert (run / "checkpoints" / "4").is_dir() and (run / "samples" / "samples_step0000004.png").is_file()
    assert json.loads((run / "config.json").read_text())["data"]["name"]

    console = train_run.stderr
    print(console)
    assert _info_files(console) <= OUR_FILES, sorted(_info_files(console) - OUR_FILES)
    steps = [line for line in console.splitlines() if "] step " in line and " | loss " in line]
    assert [line.split("] step ")[1].split(" ")[0] for line in steps] == ["2/4", "4/4"]
    assert all("steps/s" in line and "images/s" in line and "ETA " in line for line in steps)
    assert "Traceback" not in console
    assert len(console.splitlines()) <= 10  # sigmas, parameters, 2 step lines, samples

    # Sample mode from a ~ workdir (HOME is the test's folder), with --verbose.
    sample_run = _main(tmp_path, "--workdir=~/workdirs/demo", "--mode=sample", "--verbose", *cli_args(**RUN),
                       env=_env(HOME=str(tmp_path)))
    assert sample_run.returncode == 0, sample_run.stderr[-3000:]
    generated = run / "generated" / "step0000004"
    channels = tiny_config().data.channels
    assert np.load(generated / "samples.npz")["images"].shape == (4, 16, 16, channels)
    assert any(name.startswith("checkpoint") for name in _info_files(sample_run.stderr) - OUR_FILES), \
        sorted(_info_files(sample_run.stderr))
    batches = [line for line in sample_run.stderr.splitlines() if "sampling: batch " in line]
    assert len(batches) == 2 and "with compilation" in batches[0] and "ETA " in batches[1], batches

    # Eval mode, the reference images from a relative .npz.
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "reference.npz", images=rng.integers(0, 256, (8, 16, 16, channels), dtype=np.uint8))
    eval_run = _main(tmp_path, "--workdir=workdirs/demo", "--mode=eval", *cli_args(**RUN),
                     "--config.eval.metrics=('swd',)", "--config.eval.reference_npz=reference.npz")
    assert eval_run.returncode == 0, eval_run.stderr[-3000:]
    metrics = json.loads((run / "eval" / "step0000004" / "metrics.json").read_text())
    assert metrics["num_samples"] == 4 and metrics["metrics"]["swd_avg"] > 0
    assert _info_files(eval_run.stderr) <= OUR_FILES, sorted(_info_files(eval_run.stderr) - OUR_FILES)


def test_a_bad_config_or_path_ends_in_one_line(tmp_path):
    """Exit status 1, the message on one line, no traceback and nothing written; --verbose: traceback."""
    bad = _main(tmp_path, "--workdir=run", "--config.window_starts=(0.5,0.2)", timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [
        "ValueError: config.window_starts=(0.5, 0.2): the coarsest scale (last entry, scales are listed finest "
        "first) must start at 0.0, got 0.2. (rerun with --verbose for the traceback)"], bad.stderr
    assert not (tmp_path / "run").exists() and not bad.stdout

    verbose = _main(tmp_path, "--workdir=run", "--config.window_starts=(0.5,0.2)", "--verbose", timeout=300)
    assert verbose.returncode != 0
    assert "Traceback (most recent call last)" in verbose.stderr
    assert "ValueError: config.window_starts=(0.5, 0.2)" in verbose.stderr

    # A path: sampling a workdir that holds no checkpoint (named absolute).
    missing = _main(tmp_path, "--workdir=empty", "--mode=sample", timeout=300)
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [
        f"FileNotFoundError: no checkpoint in {tmp_path / 'empty' / 'checkpoints'}: train first (--mode=train). "
        "(rerun with --verbose for the traceback)"], missing.stderr


def test_image_folder_command_resolves_paths_and_fails_in_one_line(tmp_path):
    for i, cls in enumerate("ab" * 2):
        (tmp_path / "pictures" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "pictures" / cls / f"{i}.png")
    cmd = [sys.executable, "-m", "lapflow_jax.data.image_folder"]
    built = subprocess.run(cmd + ["--folder=pictures", "--data_dir=tfds"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert f"data.folder={tmp_path / 'pictures'} data.data_dir={tmp_path / 'tfds'}" in built.stdout
    assert (tmp_path / "tfds" / "lapflow_image_folder").is_dir()
    bad = subprocess.run(cmd + ["--folder=nowhere"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [f"FileNotFoundError: image folder {tmp_path / 'nowhere'} (config data.folder) "
                                       "does not exist or is not a directory (rerun with --verbose for the traceback)"]


# ----------------------------------------------------------------------------------------------
# The logged loss.


def _logged(workdir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_logged_loss_is_the_mean_over_the_logging_interval(tmp_path):
    """Two identical 7-step runs, logging every step and every 3rd: the second's losses (total,
    per scale) and gradient norm are the means of the first's per-step values over steps 1-3, 4-6
    and 7 (the last, partial interval); the learning rate is the step's own."""
    run = {"train.num_steps": 7, "checkpoint.every_steps": 100, "train.learning_rate": 3e-3,
           "mesh_shape": (-1, 1), "train.global_batch_size": 16,  # the 8 test devices, 8 images a stage
           "sample.method": "euler", "sample.steps": 2}
    every = train.train(tiny_config(**run, **{"log.every_steps": 1}), str(tmp_path / "every_step"))
    third = train.train(tiny_config(**run, **{"log.every_steps": 3}), str(tmp_path / "every_third"))
    per_step, means = _logged(tmp_path / "every_step"), _logged(tmp_path / "every_third")
    assert sorted(per_step) == list(range(1, 8)) and sorted(means) == [3, 6, 7]
    assert [per_step[s]["loss"] for s in range(1, 8)] == [every["losses"][s] for s in range(1, 8)]
    assert every["losses"] == third["losses"]  # the same run: only the logging differs
    for last, steps in ((3, (1, 2, 3)), (6, (4, 5, 6)), (7, (7,))):
        for key in ("loss", "loss_scale0", "loss_scale1", "grad_norm"):
            expected = np.mean([per_step[s][key] for s in steps])
            np.testing.assert_allclose(means[last][key], expected, rtol=1e-6, err_msg=f"{key} at step {last}")
        assert means[last]["learning_rate"] == per_step[last]["learning_rate"]
    # The interval's steps differ (by far more than rtol), so one step's value would not pass for the mean.
    assert abs(means[3]["loss"] - per_step[3]["loss"]) > 1e-4 * per_step[3]["loss"]

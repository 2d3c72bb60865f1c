"""Bad configs fail before anything compiles, each error naming the field, its value and what is
allowed; a typo in a --config override is caught; resuming a workdir with a config that changes
what its checkpoint means is refused with the changes listed, harmless changes are accepted."""

import logging
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lapflow_jax import checkpoint as ckpt_lib
from lapflow_jax import config as config_lib
from lapflow_jax import parallel, train
from lapflow_jax.data import pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import DEMO_CONFIG, REPO, tiny_config  # noqa: E402


def one_device_mesh():
    return parallel.make_mesh((1, 1), jax.devices()[:1])


# (overrides, fragments the message must contain: field, value, what is allowed).
BAD_CONFIGS = {
    "image size vs scales and patch": (
        {"data.image_size": 20, "model.patch_sizes": (2, 4)},
        ["config.data.image_size=20x20", "halved 1 times is 10x10", "config.model.patch_sizes[1]=4"]),
    "image size vs scales": (
        {"data.image_size": 18, "num_scales": 3, "window_starts": (0.6, 0.3, 0.0), "model.patch_sizes": (1, 1, 1)},
        ["config.data.image_size=18x18", "divisible by 2**(num_scales-1) = 4"]),
    "coarsest window not at 0": (
        {"window_starts": (0.5, 0.1)}, ["config.window_starts=(0.5, 0.1)", "must start at 0.0"]),
    "windows not increasing": (
        {"num_scales": 3, "window_starts": (0.3, 0.5, 0.0), "model.patch_sizes": (2, 2, 2)},
        ["config.window_starts=(0.3, 0.5, 0.0)", "strictly increase", "entry 0 (0.3) is not greater than entry 1"]),
    "window at 1": ({"window_starts": (1.0, 0.0)}, ["config.window_starts=(1.0, 0.0)", "must be < 1"]),
    "windows vs num_scales": (
        {"num_scales": 3, "model.patch_sizes": (2, 2, 2)},
        ["config.window_starts=(0.5, 0.0) has 2 entries, but config.num_scales=3", "one per scale"]),
    "patch sizes vs num_scales": (
        {"model.patch_sizes": (2,)}, ["config.model.patch_sizes=(2,) has 1 entries, but config.num_scales=2"]),
    "loss weights vs num_scales": (
        {"train.scale_weights": (1.0, 1.0, 1.0)},
        ["config.train.scale_weights=(1.0, 1.0, 1.0) has 3 entries, but config.num_scales=2"]),
    "sigmas vs num_scales": (
        {"pyramid.sigmas": (0.1,)}, ["config.pyramid.sigmas=(0.1,) has 1 entries, but config.num_scales=2"]),
    "negative sigma": ({"pyramid.sigmas": (0.1, -1.0)}, ["config.pyramid.sigmas=(0.1, -1.0) must all be > 0"]),
    "unknown preset": ({"model.preset": "huge"}, ["config.model.preset='huge' is not one of", "'tiny'"]),
    "unknown dataset": ({"data.name": "imagenet"}, ["config.data.name='imagenet' is not one of", "'tfds'"]),
    "unknown sampler": ({"sample.method": "rk4"}, ["config.sample.method='rk4' is not one of", "'heun'"]),
    "unknown path kind": ({"path_kind": "linear"}, ["config.path_kind='linear' is not one of", "'global'"]),
    "unknown filter": ({"pyramid.down": "gauss"}, ["config.pyramid.down='gauss' is not one of", "'area'"]),
    "unknown crop": ({"data.crop": "zoom"}, ["data.crop must be one of", "'center'", "'zoom'"]),
    "batch too small for the stages": (
        {"train.global_batch_size": 1}, ["config.train.global_batch_size=1", "too small to give each of the 2"]),
    "zero steps": ({"train.num_steps": 0}, ["config.train.num_steps=0 must be >= 1"]),
    "nan learning rate": ({"train.learning_rate": float("nan")}, ["config.train.learning_rate=nan must be a finite"]),
    "no non-finite patience": (
        {"train.max_consecutive_nonfinite": 0}, ["config.train.max_consecutive_nonfinite=0 must be >= 1"]),
    "zero checkpoint interval": ({"checkpoint.every_steps": 0}, ["config.checkpoint.every_steps=0 must be >= 1"]),
    "all-zero scale weights": (
        {"train.scale_weights": (0.0, 0.0)}, ["config.train.scale_weights=(0.0, 0.0) must be finite, >= 0"]),
    "skip fraction out of range": (
        {"data.max_skipped_fraction": 1.5}, ["data.max_skipped_fraction must be in [0, 1], got 1.5"]),
    "guidance without labels": (
        {"model.conditional": True, "data.use_labels": False, "sample.guidance_scale": 2.0},
        ["config.sample.guidance_scale=2.0 needs a class-conditional model", "has no labels"]),
    "guidance on an unconditional model": (
        {"model.conditional": False, "sample.guidance_scale": 2.0},
        ["config.sample.guidance_scale=2.0 needs a class-conditional model", "config.model.conditional=False"]),
    "guidance without a trained null class": (
        {"model.conditional": True, "model.class_dropout": 0.0, "sample.guidance_scale": 2.0},
        ["config.sample.guidance_scale=2.0 needs a trained null class", "config.model.class_dropout=0.0"]),
    "fewer sampling steps than segments": (
        {"sample.steps": 1}, ["config.sample.steps=1 must be >= config.num_scales=2"]),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_is_refused_naming_field_value_and_allowed(name):
    overrides, fragments = BAD_CONFIGS[name]
    with pytest.raises(ValueError) as e:
        train.make_setup(tiny_config(**overrides), one_device_mesh())
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))


def test_guidance_with_a_trained_null_class_is_accepted():
    """The other side of "guidance without a trained null class": with label dropout the model
    gets its null-class row (num_classes + 1 embeddings), and guidance validates (nothing compiles)."""
    setup = train.make_setup(tiny_config(**{"model.conditional": True, "model.class_dropout": 0.1,
                                            "sample.guidance_scale": 2.0}), one_device_mesh())
    _, abstract = train.state_shardings(setup)
    assert setup.num_classes > 0
    assert abstract.params["class_embed"].shape[0] == setup.num_classes + 1


SHIPPED_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.py"))


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_shipped_configs_validate(name):
    """Every config in configs/ validates as shipped, and with each guidance scale its docstring
    suggests (--config.sample.guidance_scale=X): a suggested guided run has a trained null class."""
    config = config_lib.config_from_file(REPO / "configs" / name)
    config_lib.validate(config)
    doc = runpy.run_path(str(REPO / "configs" / name))["__doc__"] or ""
    for scale in re.findall(r"--config\.sample\.guidance_scale=([0-9.]+)", doc):
        config.sample.guidance_scale = float(scale)
        config_lib.validate(config)


def test_benchmark_configs_validate():
    """The benchmark scripts' configs (benchmarks/), guided ones included."""
    sys.path.insert(0, str(REPO))
    from benchmarks import common, quality, tpu_capacity  # pylint: disable=import-outside-toplevel

    for starts in common.SETTINGS.values():
        for method, guidance in (("euler", 1.0), ("heun", 1.5)):
            config_lib.validate(common.make_config(common.ModelSpec(), starts, method=method, guidance=guidance))
    for preset in tpu_capacity.PRESETS:
        for scales in tpu_capacity.SCALES:
            unit = 64 * scales
            config_lib.validate(tpu_capacity.make_config(preset, scales, batch=tpu_capacity.first_batch(unit)))
    args = quality.parse_args([])  # its defaults, guidance included
    for scales in quality.WINDOWS:
        config_lib.validate(quality.make_config(args, scales, seed=0, steps=args.steps))


@pytest.mark.parametrize("mesh_shape,batch,fragments", [
    ((3, 1), 24, ["config.mesh_shape=(3, 1) needs 3 devices, but 8 are available"]),
    ((-1, 3), 24, ["config.mesh_shape=(-1, 3): 8 devices are not divisible by 3"]),
    ((-1, 1), 12, ["config.train.global_batch_size=12 is not divisible by the mesh's data axis (8 devices)"]),
    ((-1, 1), 24, ["per-stage sub-batches (12, 12)", "config.train.global_batch_size=24",
                   "must each be divisible by the data axis size 8", "a multiple of 16"]),
])
def test_batch_and_mesh_must_fit_the_devices(mesh_shape, batch, fragments):
    assert jax.device_count() == 8  # tests/conftest.py
    with pytest.raises(ValueError) as e:
        train.make_setup(tiny_config(**{"mesh_shape": mesh_shape, "train.global_batch_size": batch}))
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))


def test_train_fails_before_touching_the_workdir(tmp_path):
    """The config is validated first: nothing is written, built or compiled for a bad one."""
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="config.window_starts"):
        train.train(tiny_config(**{"window_starts": (0.5, 0.2)}), str(workdir))
    assert not workdir.exists()


def _main(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "lapflow_jax.main", f"--config={DEMO_CONFIG}", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_config_override_typos_are_caught_by_ml_collections(tmp_path):
    typo = _main(f"--workdir={tmp_path}", "--config.model.hiden_size=64")
    assert typo.returncode != 0
    assert 'Did you mean "hidden_size" instead of "hiden_size"?' in typo.stderr
    assert not list(tmp_path.iterdir())  # refused while parsing flags, before any work


# ----------------------------------------------------------------------------------------------
# Resume guard.

RUN = {"mesh_shape": (-1, 1), "train.global_batch_size": 16, "pyramid.sigmas": (0.13, 0.44)}


def run_config(**overrides):
    """The tiny config on all 8 test devices, with fixed sigmas (nothing measured)."""
    return tiny_config(**{**RUN, **overrides})


def write_checkpoint(workdir, config, step=3):
    """A real checkpoint of `config`'s train state (zeros: its contents do not matter here) with its
    data-iterator state and config, as train() writes it, without compiling the model."""
    setup = train.make_setup(config, one_device_mesh())
    _, abstract = train.state_shardings(setup)
    state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    data = pipeline.make_train_iterator(config.data, global_batch_size=config.train.global_batch_size, seed=0,
                                        process_index=0, process_count=1)
    ckpt = ckpt_lib.Checkpointer(Path(workdir) / "checkpoints", every_steps=1, keep=3)
    ckpt.save(step, state, data, config, force=True)
    ckpt.wait()
    return ckpt


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    write_checkpoint(workdir, run_config()).close()
    return workdir


@pytest.mark.parametrize("change,listed", [
    ({"model.hidden_size": 64}, ["model.hidden_size: checkpoint has 32, config has 64"]),
    ({"num_scales": 3, "window_starts": (2 / 3, 1 / 3, 0.0), "model.patch_sizes": (2, 2, 2),
      "pyramid.sigmas": (0.1, 0.2, 0.4), "train.global_batch_size": 48},  # 3 stages of 16 on 8 devices
     ["num_scales: checkpoint has 2, config has 3", "window_starts: checkpoint has [0.5, 0.0]",
      "model.patch_sizes: checkpoint has [2, 2], config has [2, 2, 2]",
      "train.global_batch_size: checkpoint has 16, config has 48"]),
    ({"window_starts": (0.25, 0.0)}, ["window_starts: checkpoint has [0.5, 0.0], config has [0.25, 0.0]"]),
    ({"train.global_batch_size": 32}, ["train.global_batch_size: checkpoint has 16, config has 32"]),
])
def test_resume_refuses_a_changed_model_scales_windows_or_batch(saved_run, change, listed):
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as e:
        train.train(run_config(**change), str(saved_run))
    msg = str(e.value)
    assert "holds a checkpoint (step 3) made with a different config" in msg
    for line in listed:
        assert line in msg, (line, msg)
    assert "new --workdir" in msg and "--config.checkpoint.force_resume=True" in msg
    assert not (saved_run / "config.json").exists()  # a refused config is not written over the run's


def test_harmless_changes_resume_and_force_resume_is_logged(saved_run, caplog):
    ckpt = ckpt_lib.Checkpointer(saved_run / "checkpoints", every_steps=1, keep=3)
    harmless = run_config(**{"train.num_steps": 10_000, "log.every_steps": 7, "checkpoint.every_steps": 11,
                             "checkpoint.keep": 9, "sample.steps": 9, "model.attention_backend": "xla",
                             "data.num_workers": 2, "train.learning_rate": 3e-4})
    assert ckpt.check_resume(3, harmless) == []
    caplog.set_level(logging.WARNING)
    forced = run_config(**{"train.global_batch_size": 32, "checkpoint.force_resume": True})
    assert ckpt.check_resume(3, forced) == ["train.global_batch_size: checkpoint has 16, config has 32"]
    assert "despite config changes (checkpoint.force_resume=True)" in caplog.text
    # Forcing does not bypass the shape check: the same model restores, another is refused.
    setup = train.make_setup(forced, one_device_mesh())
    shardings, abstract = train.state_shardings(setup)
    state = ckpt.restore_state(3, ckpt_lib.abstract_with_shardings(abstract, shardings))
    assert int(state.step) == 0
    ckpt.close()


@pytest.mark.parametrize("overrides", [
    {"model.architecture": "separate"},
    # A coarse scale may take a smaller patch than the finest: 4 scales of 32 px (4 px coarsest).
    {"num_scales": 4, "window_starts": (0.75, 0.5, 0.25, 0.0), "model.patch_sizes": (8, 8, 8, 4),
     "data.image_size": 32},
], ids=["separate models", "4 scales, patches 8,8,8,4"])
def test_ablation_settings_make_a_training_setup(overrides):
    """What benchmarks/ablations.py trains must get through train.make_setup (validation and the
    sharding check), before anything compiles."""
    setup = train.make_setup(tiny_config(**overrides), one_device_mesh())
    assert setup.config.num_scales == overrides.get("num_scales", 2)

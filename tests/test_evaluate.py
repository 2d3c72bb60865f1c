"""The eval mode: Fréchet distances and SWD against a reference, reference statistics, end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lapflow_jax import config as config_lib
from lapflow_jax import evaluate
from lapflow_jax.evaluation import frechet

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def crops():
    """8 real 32x32 RGB crops in [-1, 1] from scikit-image's bundled photos."""
    from skimage import data, transform

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = transform.resize(getattr(data, name)(), (64, 64), anti_aliasing=True)
        out += [img[:32, :32], img[32:, 32:]]
    return np.stack(out).astype(np.float32) * 2.0 - 1.0


def _noisy(images, level, seed=0):
    noise = np.random.default_rng(seed).normal(size=images.shape).astype(np.float32)
    return np.clip(images + level * noise, -1.0, 1.0)


def _random_features(images):
    """A fixed random projection of the pixels: a cheap stand-in for a feature network."""
    project = np.random.default_rng(0).normal(size=(int(np.prod(images.shape[1:])), 16)).astype(np.float32)
    return images.reshape(len(images), -1) @ project


def test_eval_metrics_of_real_images_are_zero_against_themselves_and_grow_with_noise(crops, tmp_path):
    """The eval-mode route (Reference, cache, compute_metrics) with SWD and a Fréchet distance on
    cheap features; the same with EfficientNet-Lite0 features is the slow test below."""
    features = {"fid": _random_features}
    reference = evaluate.Reference(lambda: crops, cache_dir=tmp_path, tag="crops")
    results = [evaluate.compute_metrics(_noisy(crops, s), ("fid", "swd"), reference, features=features)
               for s in (0.0, 0.05, 0.15, 0.4)]
    fd = [r["fid"] for r in results]
    swd = [r["swd_avg"] for r in results]
    assert fd[0] < 1e-6 * fd[1] and swd[0] < 1e-9, (fd, swd)
    assert all(a < b for a, b in zip(fd, fd[1:])), fd
    assert all(a < b for a, b in zip(swd, swd[1:])), swd
    assert reference.num_loaded == len(crops)
    assert (tmp_path / "crops_fid.npz").exists()


@pytest.mark.slow  # EfficientNet-Lite0 at 224x224 compiles in ~30-60 s on 2 CPU cores
def test_efficientnet_frechet_of_real_images_is_zero_against_itself_and_grows_with_noise(crops, tmp_path):
    """EfficientNet-Lite0 Fréchet distance and SWD through the eval-mode code path."""
    ev = config_lib.base_config().eval
    ev.feature_batch_size = len(crops)  # one compiled shape for every call
    features = {"fd_efficientnet": evaluate.feature_fn("fd_efficientnet", ev)}
    reads = []
    reference = evaluate.Reference(lambda: reads.append(1) or crops, cache_dir=tmp_path, tag="crops")
    results = [evaluate.compute_metrics(_noisy(crops, s), ("fd_efficientnet", "swd"), reference, features=features)
               for s in (0.0, 0.05, 0.15, 0.4)]
    assert reads == [1]  # the reference images are read once
    fd = [r["fd_efficientnet"] for r in results]
    swd = [r["swd_avg"] for r in results]
    assert fd[0] < 1e-6 * fd[1] and swd[0] < 1e-9, (fd, swd)
    assert all(a < b for a, b in zip(fd, fd[1:])), fd
    assert all(a < b for a, b in zip(swd, swd[1:])), swd
    # The statistics were cached; a new Reference reuses them without reading any image.
    assert (tmp_path / "crops_fd_efficientnet.npz").exists()
    cached = evaluate.Reference(lambda: pytest.fail("cache not used"), cache_dir=tmp_path, tag="crops")
    again = evaluate.compute_metrics(_noisy(crops, 0.15), ("fd_efficientnet",), cached, features=features)
    assert again["fd_efficientnet"] == pytest.approx(fd[2], rel=1e-9)


def test_fid_uses_given_statistics_and_needs_its_weights(tmp_path, crops):
    ev = config_lib.base_config().eval
    with pytest.raises(ValueError, match="config.eval.inception_weights"):
        evaluate.feature_fn("fid", ev)
    ev.inception_weights = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        evaluate.feature_fn("fid", ev)
    # FID against an .npz of statistics (pytorch-fid's layout); a stand-in feature map keeps the
    # test cheap: the InceptionV3 port itself is tested in test_inception.py.
    fake = _random_features
    reference_set = _noisy(crops, 0.3, seed=1)
    mu, sigma = frechet.feature_stats(fake(reference_set))
    frechet.save_stats(tmp_path / "ref.npz", mu, sigma)
    reference = evaluate.Reference(lambda: pytest.fail("images not needed"), stats_files={"fid": tmp_path / "ref.npz"})
    got = evaluate.compute_metrics(crops, ("fid",), reference, features={"fid": fake})["fid"]
    assert got == pytest.approx(frechet.fid_from_features(fake(crops), fake(reference_set)), rel=1e-9)
    assert reference.num_loaded is None
    with pytest.raises(ValueError, match="config.eval.metrics"):
        bad = config_lib.base_config()
        bad.eval.metrics = ("fid", "is")
        config_lib.validate(bad)


def test_images_npz_loading(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "u8.npz", images=images)
    loaded = evaluate.load_images_npz(tmp_path / "u8.npz", field="config.eval.samples_npz")
    np.testing.assert_allclose(loaded, images / 127.5 - 1.0, atol=1e-6)
    np.savez(tmp_path / "bad.npz", images=np.full((2, 4, 4, 3), 3.0, np.float32))
    with pytest.raises(ValueError, match=r"config.eval.reference_npz=.*\[-1, 1\]"):
        evaluate.load_images_npz(tmp_path / "bad.npz", field="config.eval.reference_npz")
    np.savez(tmp_path / "other.npz", arr_0=images)
    with pytest.raises(ValueError, match="no `images`"):
        evaluate.load_images_npz(tmp_path / "other.npz", field="config.eval.samples_npz")


@pytest.mark.skipif(not FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_held_out_reference_from_the_dataset(tmp_path):
    config = config_lib.base_config()
    config.data.name = "fashion_mnist"
    config.data.channels = 1
    config.eval.num_reference = 12
    reference = evaluate.reference_from_config(config, 1000, tmp_path)
    assert reference.tag == "reference_fashion_mnist_test_12_32x1"
    images = reference.images()
    assert images.shape == (12, 32, 32, 1) and images.min() == -1.0 and images.max() <= 1.0
    from lapflow_jax.data import sources

    raw = sources.FashionMnistSource("test", pad_to=32)
    np.testing.assert_array_equal(np.rint((images[3] + 1) * 127.5), raw[3]["image"])


@pytest.mark.slow
def test_train_sample_eval_end_to_end(tmp_path):
    """main --mode=train, then --mode=sample and --mode=eval (SWD) on the saved checkpoint (~2 min)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    common = [sys.executable, "-m", "lapflow_jax.main", f"--config={REPO / 'configs' / 'demo.py'}",
              f"--workdir={tmp_path}", "--config.model.hidden_size=32", "--config.model.depth=1",
              "--config.model.num_heads=2", "--config.model.patch_sizes=(2,2)", "--config.data.image_size=16",
              "--config.data.num_records=32", "--config.data.num_eval_records=16", "--config.train.num_steps=2",
              "--config.train.global_batch_size=4", "--config.train.warmup_steps=1", "--config.mesh_shape=(1,1)",
              "--config.sample.num_images=6", "--config.sample.batch_size=4", "--config.sample.steps=2",
              "--config.sample.method=euler", "--config.eval.metrics=('swd',)", "--config.eval.num_samples=16"]
    for mode in ("train", "sample", "eval"):
        result = subprocess.run(common + [f"--mode={mode}"], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "generated" / "step0000002" / "summary.json").read_text())
    assert summary["num_images"] == 6 and summary["nfe_per_segment"] == [1.0, 1.0]
    assert summary["gflops"]["baseline_over_lapflow"] > 1.2
    assert (tmp_path / "generated" / "step0000002" / "coarse_to_fine.png").exists()
    metrics = json.loads((tmp_path / "eval" / "step0000002" / "metrics.json").read_text())
    assert metrics["num_samples"] == 16 and metrics["num_reference"] == 16
    assert metrics["metrics"]["swd_avg"] > 0

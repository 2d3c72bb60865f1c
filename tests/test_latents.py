"""Latent mode: caching a folder (interrupted, resumed, two hosts), the latent source, training on
cached latents end to end, and the paper's latent configs.

A tiny random AutoencoderKL (f = 2) stands in for SD-VAE / EQ-VAE: 16x16 images -> 8x8x4 latents.
"""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lapflow_jax import autoencoder as ae
from lapflow_jax import config as config_lib
from lapflow_jax import latents
from lapflow_jax.data import latents as latents_data
from lapflow_jax.data import pipeline, sources

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 10
TINY_AE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
               sample_size=16)

# The experiment config of these tests, as a config file so that the command lines can load it.
CONFIG_FILE = '''
from lapflow_jax.config import base_config


def get_config():
    c = base_config()
    c.num_scales = 2
    c.window_starts = (0.5, 0.0)
    c.model.hidden_size, c.model.depth, c.model.num_heads = 32, 1, 2
    c.model.patch_sizes = (2, 2)
    c.latent.enabled = True
    c.latent.autoencoder = {autoencoder!r}
    c.latent.shape = (8, 8, 4)
    c.latent.source.name = "image_folder"
    c.latent.source.folder = {folder!r}
    c.latent.source.data_dir = {tfds_dir!r}
    c.latent.source.image_size = 16
    c.latent.images_per_shard = 3      # 4 shards: 3, 3, 3, 1 images
    c.latent.encode_batch_size = 2     # the last batch of a shard is padded
    c.latent.decode_batch_size = 4
    c.data.name = "latents"
    c.data.latents_dir = {latents_dir!r}
    c.train.global_batch_size = 8
    c.train.num_steps = 3
    c.train.warmup_steps = 1
    c.checkpoint.every_steps = 3
    c.log.every_steps = 1
    c.sample.num_images = 4
    c.sample.batch_size = 4
    c.sample.steps = 4
    c.sample.gflops = False
    c.mesh_shape = (1, 1)
    return c
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An image folder (2 classes, odd sizes), a converted tiny autoencoder and a config file."""
    root = tmp_path_factory.mktemp("latents")
    photos = ("astronaut", "chelsea", "coffee", "rocket")
    sizes = ((20, 24), (24, 20), (16, 16), (30, 18), (18, 22))
    for i in range(NUM_IMAGES):
        img = Image.fromarray(sources.load_demo_photo(photos[i % 4])).resize(sizes[i % 5])
        (root / "images" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        img.save(root / "images" / "ab"[i % 2] / f"{i:02d}.png")
    ae_config = ae.AutoencoderKLConfig(**TINY_AE)
    ae.save_converted(ae.AutoencoderKL(ae_config, seed=0), ae_config, root / "ae")
    return root


def write_config(world, name: str, latents_dir: str, autoencoder: str | None = None) -> str:
    path = world / f"{name}.py"
    path.write_text(CONFIG_FILE.format(autoencoder=str(autoencoder or world / "ae"),
                                       folder=str(world / "images"), tfds_dir=str(world / "tfds"),
                                       latents_dir=str(latents_dir)))
    return str(path)


def load_config(path: str):
    return runpy.run_path(path)["get_config"]()


@pytest.fixture(scope="module")
def straight(world):
    """An uninterrupted single-host caching run: (config, its summary)."""
    config = load_config(write_config(world, "straight", world / "straight"))
    return config, latents.cache_latents(config)


def shard_bytes(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob("*.array_record"))}


def test_interrupted_resumed_two_hosts_equal_uninterrupted(world, straight):
    """Host 1 of 2 stops after one shard, leaving a half-written shard behind; host 0 runs; host 1
    resumes: the records equal the uninterrupted single-host run's, byte for byte."""
    config_a, summary_a = straight
    assert summary_a["written"] == [latents_data.shard_name(j, 4) for j in range(4)]
    assert not summary_a["missing"]

    split_dir = world / "split"
    config_b = load_config(write_config(world, "split", split_dir))
    first = latents.cache_latents(config_b, process_index=1, process_count=2, max_shards=1)
    assert first["written"] == [latents_data.shard_name(1, 4)]
    assert first["remaining"] == [latents_data.shard_name(3, 4)] and len(first["missing"]) == 3
    # A run killed while writing shard 3 leaves its temporary file: it must not count, and is redone.
    (split_dir / (latents_data.shard_name(3, 4) + ".tmp-1-12345")).write_bytes(b"\x00" * 100)
    with pytest.raises(FileNotFoundError, match="3 of 4 shards missing"):
        latents_data.LatentSource(split_dir)

    host0 = latents.cache_latents(config_b, process_index=0, process_count=2)
    assert host0["written"] == [latents_data.shard_name(j, 4) for j in (0, 2)]
    host1 = latents.cache_latents(config_b, process_index=1, process_count=2)
    assert host1["skipped"] == [latents_data.shard_name(1, 4)]
    assert host1["written"] == [latents_data.shard_name(3, 4)] and not host1["missing"]

    assert sorted(os.listdir(split_dir)) == sorted(os.listdir(config_a.data.latents_dir))  # no temp files
    a, b = shard_bytes(config_a.data.latents_dir), shard_bytes(split_dir)
    assert len(a) == 4 and a == b
    info_a, info_b = (latents_data.read_info(d) for d in (config_a.data.latents_dir, split_dir))
    assert info_a == info_b


def test_records_hold_the_encoded_center_crop_and_its_mirror(world, straight):
    config, summary = straight
    info = summary["info"]
    assert info["latent_shape"] == [8, 8, 4] and info["variants"] == ["center", "center_flipped"]
    assert info["num_images"] == NUM_IMAGES and info["num_classes"] == 2
    source = latents_data.LatentSource(config.data.latents_dir)
    images = pipeline.make_source(config.latent.source, "train")
    pre = pipeline.Preprocess(num_records=len(images), image_size=16, channels=3, crop="center",
                              random_flip=False, use_labels=True, seed=0)
    model, _ = latents.load_autoencoder(config.latent.autoencoder)
    encode = nnx.jit(lambda model, x: model.encode(x))
    for i in (0, NUM_IMAGES - 1):  # the first record and the one alone in a padded batch
        rec, img = source[i], pre.map_with_index(i, images[i])
        assert rec["index"] == i and rec["label"] == img["label"]
        x = img["image"][None].astype(np.float32) / 127.5 - 1.0
        mean, logvar = encode(model, np.concatenate([x, x[:, :, ::-1]]))  # center crop, mirror
        for v in range(2):
            np.testing.assert_allclose(rec["mean"][v], mean[v], atol=1e-5)
            np.testing.assert_allclose(rec["std"][v], np.exp(0.5 * logvar[v]), rtol=1e-5)


def test_latent_source_samples_per_epoch(straight):
    config, summary = straight
    info = summary["info"]
    source = latents_data.LatentSource(config.data.latents_dir)
    sample = latents_data.SampleLatent(num_records=len(source), info=info, random_flip=True,
                                       use_labels=True, seed=0)
    rec = source[4]
    draws = [sample.map_with_index(epoch * len(source) + 4, rec)["image"] for epoch in range(12)]
    assert all(d.shape == (8, 8, 4) and d.dtype == np.float32 for d in draws)
    np.testing.assert_array_equal(draws[0], sample.map_with_index(4, rec)["image"])  # deterministic
    # Every epoch draws new noise, around the center crop's or the mirror's mean.
    scale = info["scaling_factor"]
    picked = []
    for d in draws:
        dist = [np.max(np.abs(d / scale - rec["mean"][v]) / rec["std"][v]) for v in range(2)]
        assert min(dist) < 6.0
        picked.append(int(np.argmin(dist)))
    assert set(picked) == {0, 1}
    assert len({d.tobytes() for d in draws}) == len(draws)
    no_flip = dict(info, variants=["center"])
    with pytest.raises(ValueError, match="random_flip"):
        latents_data.SampleLatent(num_records=10, info=no_flip, random_flip=True, use_labels=True, seed=0)
    # The pipeline's batches.
    it = pipeline.make_train_iterator(config.data, global_batch_size=4, seed=0, process_index=0,
                                      process_count=1)
    batch = next(it)
    assert batch["image"].shape == (4, 8, 8, 4) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    assert pipeline.image_shape(config.data) == (8, 8, 4) and pipeline.num_classes(config.data) == 2


def test_config_and_resume_errors(world, straight):
    config, _ = straight
    bad = load_config(write_config(world, "bad", config.data.latents_dir))
    bad.latent.shape = (16, 16, 4)
    with pytest.raises(ValueError, match="config.latent.shape"):
        config_lib.validate(bad)
    bad = load_config(write_config(world, "bad", config.data.latents_dir))
    bad.data.name = "demo_photos"
    with pytest.raises(ValueError, match="config.latent.enabled"):
        config_lib.validate(bad)
    # Another autoencoder into the same folder is refused, naming what differs.
    other = ae.AutoencoderKLConfig(**TINY_AE)
    ae.save_converted(ae.AutoencoderKL(other, seed=1), other, world / "ae_other")
    bad = load_config(write_config(world, "bad", config.data.latents_dir, autoencoder=world / "ae_other"))
    with pytest.raises(ValueError, match="params_sha256"):
        latents.cache_latents(bad)
    with pytest.raises(FileNotFoundError, match="config.latent.autoencoder"):
        latents.load_autoencoder(str(world / "images"))


@pytest.mark.slow
def test_commands_end_to_end(world, straight, tmp_path):
    """The real commands in fresh processes: caching stopped by --max_shards and resumed (same bytes
    as the in-process run), then `python -m lapflow_jax.main` training 3 steps in latent mode,
    writing samples decoded to 16x16 images, and upsampling 8x8 images from the checkpoint."""
    config, _ = straight
    cache_dir = tmp_path / "latents"
    cfg_file = write_config(world, "cli", cache_dir)
    cache = [sys.executable, "-m", "lapflow_jax.latents", f"--config={cfg_file}"]
    result = subprocess.run(cache + ["--max_shards=3"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 3 shard(s)" in result.stdout and "1 of 4 shards missing" in result.stdout
    result = subprocess.run(cache, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 1 shard(s), 3 already there" in result.stdout and "0 of 4 shards missing" in result.stdout
    assert shard_bytes(cache_dir) == shard_bytes(config.data.latents_dir)

    workdir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "lapflow_jax.main", f"--config={cfg_file}", f"--workdir={workdir}",
           "--config.sample.method=euler", "--config.sample.previews=False"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3] and all(np.isfinite(s["loss"]) for s in steps)
    assert (workdir / "checkpoints" / "3").is_dir()
    grid = np.asarray(Image.open(workdir / "samples" / "samples_step0000003.png"))
    # 4 decoded 16x16 images in a 2x2 grid with 1 px gaps (8x8 latents would give 17x17).
    assert grid.shape == (33, 33, 3)
    assert grid.std() > 1.0  # decoded, not blank

    # The upsample mode on that checkpoint: 8x8 RGB inputs -> 16x16, conditioned on their latents.
    np.savez(tmp_path / "low.npz", images=np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), np.uint8))
    result = subprocess.run(cmd + ["--mode=upsample", f"--config.upsample.input={tmp_path / 'low.npz'}",
                                   "--config.upsample.samples_per_image=2", "--config.upsample.batch_size=2"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "upsampled" / "step0000003" / "summary.json").read_text())
    assert summary["latent"] and summary["factor"] == 2 and summary["max_latent_consistency_error"] <= 1e-5
    assert summary["max_consistency_error_uint8_levels"] == 0.0 and summary["mean_decoded_consistency_error"] > 0
    with np.load(workdir / "upsampled" / "step0000003" / "upsampled.npz") as f:
        assert f["samples"].shape == (2, 2, 16, 16, 3)


@pytest.mark.slow
def test_caching_command_with_relative_paths(world):
    """`python -m lapflow_jax.latents` with the config's folders relative to where it runs: the cache
    records absolute paths, so the same cache resumes from anywhere with the absolute config (a
    relative source folder recorded as given would be refused there as another source)."""
    (world / "rel").mkdir()
    relative = world / "rel" / "relative.py"
    relative.write_text(CONFIG_FILE.format(autoencoder="../ae", folder="../images", tfds_dir="../tfds_rel",
                                           latents_dir="latents"))
    first = subprocess.run([sys.executable, "-m", "lapflow_jax.latents", f"--config={relative.name}", "--max_shards=1"],
                           cwd=world / "rel", capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"-> {world / 'rel' / 'latents'}" in first.stdout
    info = latents_data.read_info(world / "rel" / "latents")
    assert info["source"]["folder"] == str(world / "images")
    assert info["autoencoder"]["path"] == str(world / "ae")
    assert (world / "tfds_rel" / "lapflow_image_folder").is_dir()

    absolute = write_config(world, "absolute", world / "rel" / "latents")
    rest = subprocess.run([sys.executable, "-m", "lapflow_jax.latents", f"--config={absolute}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "wrote 3 shard(s), 1 already there" in rest.stdout


CONFIGS = ("celebahq256", "celebahq512", "celebahq1024", "imagenet256_b2", "imagenet256_xl2")


@pytest.mark.parametrize("name", CONFIGS)
def test_paper_configs(name):
    lap = runpy.run_path(str(REPO / "configs" / f"{name}_lapflow.py"))
    base = runpy.run_path(str(REPO / "configs" / f"{name}_baseline.py"))
    a, b = lap["get_config"](), base["get_config"]()
    config_lib.validate(a)
    config_lib.validate(b)
    assert a.latent.enabled and a.data.name == "latents" and a.num_scales == 2
    assert b.num_scales == 1 and b.window_starts == (0.0,)
    # The baseline is the same experiment with one scale.
    differ = {k for k in ("num_scales", "window_starts") if a[k] != b[k]}
    assert differ == {"num_scales", "window_starts"}
    for section in ("latent", "data", "train", "sample"):
        assert a[section].to_dict() == b[section].to_dict(), section
    assert a.model.preset == b.model.preset and a.model.patch_sizes[0] == b.model.patch_sizes[0]
    size = a.latent.source.image_size
    assert tuple(a.latent.shape) == (size // 8, size // 8, 4)
    for module in (lap, base):  # each docstring quotes the paper and the exact commands
        assert "python -m lapflow_jax.latents --config=configs/" in module["__doc__"]
        assert "python -m lapflow_jax.main --config=configs/" in module["__doc__"]
        assert "FID" in module["__doc__"]


def test_decode_on_the_mesh_and_in_the_eval_program_equal_one_device(world, straight):
    """Latent mode's decode on 8 devices (each its own rows, the autoencoder replicated, in chunks
    of decode_batch_size) equals one device decoding the whole batch; the eval pass's device
    program decodes the same way and rounds to the uint8 pixels a PNG would hold."""
    import jax

    from lapflow_jax import parallel
    from lapflow_jax.evaluation import streaming

    config, _ = straight
    mesh = parallel.make_mesh((8, 1))
    z = np.random.default_rng(0).normal(size=(16, 8, 8, 4)).astype(np.float32)
    decode, state = latents.decoder(config)
    want = np.asarray(jax.jit(decode)(state, z))
    assert want.shape == (16, 16, 16, 3)
    sharded = parallel.put_host_rows(z, mesh, 16)
    got = latents.decode_latents(config, sharded, mesh)
    assert got.sharding.is_equivalent_to(parallel.batch_sharding(mesh), got.ndim)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    pixels, features = streaming.FeatureProgram(mesh, {}, (decode, state))(sharded)
    assert features == {}
    want_pixels = np.clip(np.rint((want + 1) * 127.5), 0, 255)
    assert np.abs(np.asarray(pixels).astype(int) - want_pixels).max() <= 1  # a rounding tie at most


def test_missing_tfds_source_names_the_latent_source_field(world, tmp_path):
    """Caching reads config.latent.source: a missing tfds folder is reported under that name."""
    config = load_config(write_config(world, "tfds_missing", tmp_path / "latents"))
    config.latent.source.name = "tfds"
    config.latent.source.tfds_name = "imagenet2012"
    config.latent.source.data_dir = str(tmp_path / "no_tfds_here")
    with pytest.raises(FileNotFoundError, match=r"does not exist \(config\.latent\.source\.data_dir\)"):
        latents.cache_latents(config)

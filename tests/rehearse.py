"""The rehearsal: docs/cloud_tpu.md's ImageNet-latent sequence on a simulated pod, with the same
scripts and commands the docs give, on this machine.

    python tests/rehearse.py [--workdir=DIR] [--break_step=local-latents]

The pod: tests/fake_pod.py's fake `gcloud` (2 workers, each a local process of one
jax.distributed job), the GCS emulator (tests/gcs_emulator.py) as the bucket. The data: a small
ImageNet-shaped image folder made on the spot (class folders n0000000k of JPEGs of varied sizes)
and a tiny random-weight autoencoder; the model: configs/imagenet256_b2_lapflow.py shrunk with
--config overrides to the smallest that exercises every step. The steps, each one a documented
command, each failing the rehearsal when it fails:

    gcloud storage cp -r <autoencoder> gs://BUCKET/autoencoders/      (the weights in the bucket)
    gcloud storage cp pt_inception-2015-12-05-6726825d.pth gs://BUCKET/weights/   (FID's InceptionV3)
    launch/create_tpu.sh --spot
    launch/setup_workers.sh
    launch/prepare_data.sh SOURCE=image_folder FOLDER=... DATA_DIR=gs://BUCKET/tfds
    launch/cache_latents.sh CONFIG=configs/imagenet256_b2_lapflow.py LATENTS_DIR=gs://BUCKET/latents/imagenet256 -- ...
    launch/train.sh CONFIG=configs/imagenet256_b2_lapflow.py WORKDIR=gs://BUCKET/imagenet256 -- --distributed ...
        (worker 1 gets SIGTERM after 2 logged steps; train.sh recreates the slice, sets it up and
        resumes from the preemption's checkpoint)
    gcloud storage cat gs://BUCKET/imagenet256/metrics.jsonl
    launch/train.sh ... MAX_RETRIES=0 RUN_NAME=imagenet256-sample -- --distributed --mode=sample ...
    gcloud storage ls gs://BUCKET/imagenet256/generated/
    gcloud storage cp -r gs://BUCKET/imagenet256/generated/step0000008 ./samples
    launch/train.sh ... MAX_RETRIES=0 RUN_NAME=imagenet256-eval -- --distributed --mode=eval ...
        (FID against the prepared data in the bucket, config.eval.inception_weights=gs://BUCKET/weights/...)
    gcloud storage cat gs://BUCKET/imagenet256/eval/step0000008/metrics.json
    gcloud storage cp gs://BUCKET/imagenet256/eval/step0000008/samples_8x16x16x3.npz ./adm.npz

--break_step=local-latents writes the latent cache to a folder on each worker's own disk instead of
the bucket (LATENTS_DIR=/local-disk/..., which the fake gcloud maps to each worker's folder): the
deliberate break that must make the rehearsal fail. It fails at cache_latents.sh, which refuses a
local LATENTS_DIR on a slice of several workers (tests/test_pod.py checks both).

The Inception file is random weights in pytorch-fid's exact format (names, shapes, torch's zip
layout: tests/test_inception.py's write_random_fid_weights, which needs torch and torch-fidelity as
the test suite installs them), under the real file's name, so that every command is the one a user
runs; its FID is a number without meaning, checked only to be finite.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only builds the tiny autoencoder
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path[:0] = [str(TESTS), str(REPO)]

import fake_pod  # noqa: E402
from gcs_emulator import running_emulator  # noqa: E402

CONFIG = "configs/imagenet256_b2_lapflow.py"
INCEPTION = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's FID weights (random ones here)
STEPS = 8
# configs/imagenet256_b2_lapflow.py at the smallest size that runs every step: 16x16 images, 8x8x4
# latents of a 2-block autoencoder, a 32-wide 1-block model, 8 steps, 2-step Euler samples.
TINY = {
    "model.preset": "tiny", "model.hidden_size": 32, "model.depth": 1, "model.num_heads": 2,
    "model.dtype": "float32", "model.attention_backend": "xla",
    "latent.shape": "(8,8,4)", "latent.source.image_size": 16, "latent.source.num_workers": 0,
    "latent.encode_batch_size": 4, "latent.decode_batch_size": 4, "latent.images_per_shard": 4,
    "train.global_batch_size": 16, "train.num_steps": STEPS, "train.warmup_steps": 1,
    "checkpoint.every_steps": 100000, "log.every_steps": 1, "log.sample_every_steps": 0,
    "sample.method": "euler", "sample.steps": 2, "sample.num_images": 2, "sample.batch_size": 2,
    "mesh_shape": "(-1,1)", "input_shards": 2,
}
TINY_AE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
               sample_size=16)


def overrides(**extra) -> list[str]:
    return [f"--config.{k}={v}" for k, v in {**TINY, **extra}.items()]


def make_image_folder(folder: Path, classes: int, per_class: int, size=(40, 32), seed: int = 0) -> None:
    """An ImageNet-shaped folder: one sub-folder per class (n0000000k), JPEGs of varied shapes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (folder / f"n{c:08d}").mkdir(parents=True)
        for i in range(per_class):
            w, h = size[0] + 8 * (i % 3), size[1] + 4 * (i % 2)
            base = rng.random((4, 4, 3)) * 255
            pixels = np.asarray(Image.fromarray(base.astype(np.uint8)).resize((w, h), Image.BICUBIC))
            Image.fromarray(pixels).save(folder / f"n{c:08d}" / f"n{c:08d}_{i}.JPEG", quality=90)


class Pod:
    """The simulated pod's environment, and the documented commands run in it, each recorded."""

    def __init__(self, root: Path, gcs):
        self.root, self.gcs, self.commands = root, gcs, []
        bin_dir, self.state = root / "bin", root / "pod"
        fake_pod.install(bin_dir, self.state)
        (root / "home").mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "PYTHONPATH")}
        env.update(gcs.env)
        env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HOME=str(root / "home"), TMPDIR=str(root),
                   FAKE_POD_DIR=str(self.state), PROJECT="my-proj", ZONE="us-east5-a", TPU_NAME="lapflow-v5p",
                   ACCELERATOR_TYPE="v5p-16", POLL_SECONDS="0", RECHECK_SECONDS="0", BACKOFF_SECONDS="0")
        self.env = env

    def run(self, *argv: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
        """Runs one documented command from the repository root; exits the rehearsal when it fails."""
        line = shlex.join(argv)
        self.commands.append(line)
        start = time.monotonic()
        print(f"$ {line}", flush=True)
        proc = subprocess.run(list(argv), cwd=REPO, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)
        print(f"  exit {proc.returncode} in {time.monotonic() - start:.0f} s", flush=True)
        if proc.returncode != 0:
            raise RehearsalFailed(f"step failed: {line}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n"
                                  f"{proc.stderr[-4000:]}")
        return proc


class RehearsalFailed(RuntimeError):
    pass


def write_inception_weights(path: Path) -> None:
    """A random-weight FID InceptionV3 in pytorch-fid's file format (see the module docstring)."""
    import importlib.util

    # In a test session test_inception may already have put a torch_fidelity stub (no __spec__,
    # which find_spec refuses) into sys.modules: a module that is loaded is not missing.
    missing = [m for m in ("torch", "torch_fidelity") if m not in sys.modules and importlib.util.find_spec(m) is None]
    if missing:
        raise RehearsalFailed(f"the FID step builds its Inception file with {missing} (not installed): "
                              "install them as tests/install_and_test.sh does")
    import test_inception

    test_inception.write_random_fid_weights(path)


def rehearse(root: Path, break_step: str = "") -> dict:
    """Runs the sequence in `root`; returns {"commands": [...], "seconds": ..., "preempted_at": ...}."""
    from lapflow_jax import autoencoder as ae

    start = time.monotonic()
    make_image_folder(root / "imagenet" / "train", classes=2, per_class=8)
    ae_config = ae.AutoencoderKLConfig(**TINY_AE)
    ae.save_converted(ae.AutoencoderKL(ae_config, seed=0), ae_config, root / "tiny-vae")
    write_inception_weights(root / INCEPTION)
    with running_emulator() as gcs:
        pod = Pod(root, gcs)
        bucket = f"gs://{gcs.bucket}"
        pod.run("gcloud", "storage", "cp", "-r", str(root / "tiny-vae"), f"{bucket}/autoencoders/")
        pod.run("gcloud", "storage", "cp", str(root / INCEPTION), f"{bucket}/weights/")
        pod.run("launch/create_tpu.sh", "--spot")
        pod.run("launch/setup_workers.sh")
        prepared = pod.run("launch/prepare_data.sh", "SOURCE=image_folder", f"FOLDER={root / 'imagenet' / 'train'}",
                           f"DATA_DIR={bucket}/tfds", f"LOCAL_DIR={root / 'tfds'}", f"PYTHON={sys.executable}",
                           env={"PYTHONPATH": str(REPO)})
        tfds_name = re.search(r"--config.latent.source.tfds_name=(\S+)", prepared.stderr).group(1)
        latents_dir = f"{bucket}/latents/imagenet256" if break_step != "local-latents" else "/local-disk/latents/imagenet256"
        source = {"latent.autoencoder": f"{bucket}/autoencoders/tiny-vae", "latent.source.data_dir": f"{bucket}/tfds",
                  "latent.source.tfds_name": tfds_name}
        pod.run("launch/cache_latents.sh", f"CONFIG={CONFIG}", f"LATENTS_DIR={latents_dir}", "BACKOFF_SECONDS=0",
                "MAX_RETRIES=0", "--", *overrides(**source))
        if not break_step:
            shards = [n for n in gcs.names("latents/imagenet256/") if n.endswith(".array_record")]
            if len(shards) != 4:  # 2 classes x 8 images, 4 per shard (both flips in each record)
                raise RehearsalFailed(f"expected 4 latent shards in the bucket, found {shards}")
        workdir = f"{bucket}/imagenet256"
        trained = pod.run("launch/train.sh", f"CONFIG={CONFIG}", f"WORKDIR={workdir}", "MAX_RETRIES=1",
                          f"LOG_DIR={root / 'tpu-logs'}", "--", "--distributed", "--verbose",
                          *overrides(**source, **{"data.latents_dir": latents_dir}),
                          env={"FAKE_POD_PREEMPT_AFTER": "2"})
        if "retry 1 of 1: recreating lapflow-v5p" not in trained.stderr:
            raise RehearsalFailed("train.sh did not recreate the preempted slice:\n" + trained.stderr[-3000:])
        resumed = (root / "tpu-logs" / "attempt1" / "worker0.log").read_text()
        found = re.search(r"Resumed from step (\d+)", resumed)
        if not found:
            raise RehearsalFailed("the relaunched run did not resume from a checkpoint:\n" + resumed[-3000:])
        metrics = pod.run("gcloud", "storage", "cat", f"{workdir}/metrics.jsonl")
        steps = [json.loads(line)["step"] for line in metrics.stdout.splitlines()]
        if steps != list(range(1, STEPS + 1)):
            raise RehearsalFailed(f"metrics.jsonl logged steps {steps}, expected 1..{STEPS}")
        # Sample on both hosts from the last checkpoint, and fetch the samples (docs' step 4).
        pod.run("launch/train.sh", f"CONFIG={CONFIG}", f"WORKDIR={workdir}", "MAX_RETRIES=0",
                "RUN_NAME=imagenet256-sample", f"LOG_DIR={root / 'tpu-logs-sample'}", "--", "--distributed",
                "--verbose", "--mode=sample", *overrides(**source, **{"data.latents_dir": latents_dir,
                                                                       "sample.num_images": 8,
                                                                       "sample.batch_size": 8}))
        listed = pod.run("gcloud", "storage", "ls", f"{workdir}/generated/").stdout.split()
        if listed != [f"{workdir}/generated/step{STEPS:07d}/"]:
            raise RehearsalFailed(f"generated/ holds {listed}, expected the step {STEPS} folder")
        pod.run("gcloud", "storage", "cp", "-r", listed[0].rstrip("/"), str(root / "samples"))
        with np.load(root / "samples" / "samples.npz") as samples:
            if samples["images"].shape != (8, 16, 16, 3) or samples["images"].dtype != np.uint8:
                raise RehearsalFailed(f"samples.npz images {samples['images'].shape} {samples['images'].dtype}")
        # Evaluate on both hosts (docs' step 5): FID, each host reading the Inception weights from
        # the bucket, against the prepared dataset in the bucket; fetch the metrics and the samples
        # in ADM's layout.
        pod.run("launch/train.sh", f"CONFIG={CONFIG}", f"WORKDIR={workdir}", "MAX_RETRIES=0",
                "RUN_NAME=imagenet256-eval", f"LOG_DIR={root / 'tpu-logs-eval'}", "--", "--distributed",
                "--verbose", "--mode=eval", *overrides(**source, **{
                    "data.latents_dir": latents_dir, "sample.batch_size": 8, "eval.num_samples": 8,
                    "eval.metrics": "('fid',)", "eval.inception_weights": f"{bucket}/weights/{INCEPTION}",
                    "eval.reference_split": "train",
                    "eval.num_reference": 8, "eval.feature_batch_size": 8}))
        for i in range(2):  # both hosts read the weights from the bucket and embedded their share
            log = (root / "tpu-logs-eval" / "attempt0" / f"worker{i}.log").read_text()
            copies = list((pod.state / "workers" / str(i) / ".cache" / "lapflow" / "remote").glob(f"*/{INCEPTION}"))
            if "inception features: batch" not in log or '{"fid": ' not in log or len(copies) != 1:
                raise RehearsalFailed(f"worker {i} did not compute FID with the bucket's Inception weights "
                                      f"(cached copies {copies}):\n{log[-3000:]}")
        evaluated = f"{workdir}/eval/step{STEPS:07d}"
        metrics = json.loads(pod.run("gcloud", "storage", "cat", f"{evaluated}/metrics.json").stdout)
        if not np.isfinite(metrics.get("metrics", {}).get("fid", np.nan)):
            raise RehearsalFailed(f"eval metrics.json has no finite fid: {metrics}")
        pod.run("gcloud", "storage", "cp", f"{evaluated}/samples_8x16x16x3.npz", str(root / "adm.npz"))
        with np.load(root / "adm.npz") as adm:
            if adm["arr_0"].shape != (8, 16, 16, 3) or adm["arr_0"].dtype != np.uint8 or adm["arr_1"].shape != (8,):
                raise RehearsalFailed(f"ADM samples file: arr_0 {adm['arr_0'].shape} {adm['arr_0'].dtype}")
    return {"commands": pod.commands, "seconds": time.monotonic() - start, "preempted_at": int(found.group(1))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="", help="folder for the rehearsal's files (default: a new temporary one)")
    parser.add_argument("--break_step", default="", choices=["", "local-latents"],
                        help="break one documented step on purpose (the rehearsal must then fail)")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="lapflow-rehearsal-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        summary = rehearse(root, args.break_step)
    except RehearsalFailed as error:
        print(f"REHEARSAL FAILED: {error}", file=sys.stderr)
        return 1
    print(f"REHEARSAL PASSED in {summary['seconds']:.0f} s (preempted at step {summary['preempted_at']}); "
          f"{len(summary['commands'])} documented commands:")
    print("\n".join(f"  {c}" for c in summary["commands"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

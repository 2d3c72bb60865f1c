"""A fake `gcloud` whose TPU slice is a set of local processes: each "worker" is a folder (its
$HOME) on this machine, and `gcloud compute tpus tpu-vm ssh --worker=all --command=...` runs the
command in every worker's folder at once, as one jax.distributed job (SLURM's variables tell
`jax.distributed.initialize()` the process count and id, JAX_COORDINATOR_ADDRESS the coordinator).

Used by the pod tests (tests/test_pod.py) and the rehearsal (launch/rehearse.py) to run the real
launch scripts (create_tpu.sh, setup_workers.sh, cache_latents.sh, train.sh) end to end.

What it simulates, and how:
- queued-resources create / delete / describe, tpu-vm describe: a state folder (FAKE_POD_DIR)
  holds whether the slice exists and its states; creating it makes FAKE_POD_WORKERS (default 2)
  empty worker folders (bare VMs), deleting it removes them.
- tpu-vm scp: copies between this machine and the worker folders.
- storage cp [-r] / cat / ls: against the GCS emulator (STORAGE_EMULATOR_HOST).
- tpu-vm ssh: runs `bash -c COMMAND` in each worker folder with HOME set to it (its output also
  kept in FAKE_POD_DIR/ssh/<call>-worker<i>.log). A path under /local-disk/ in the command is
  the worker's own disk (FAKE_POD_DIR/workers/<i>/local-disk/), gone when the slice is deleted.
  The one thing not run as written is `bash launch/remote_setup.sh` (pip needs the network): it
  runs with --dry-run (so its checks of the unpacked code still apply), and the worker's venv
  python becomes a wrapper of this interpreter, which has the dependencies.
- A spot preemption: with FAKE_POD_PREEMPT_AFTER=N, the first training command (one that runs
  lapflow_jax.main) is watched until worker 0 has logged N steps; then worker FAKE_POD_PREEMPT_WORKER (default 1) alone gets
  SIGTERM, as a preempted TPU VM does. When the workers have exited, the slice reports
  PREEMPTED and the ssh call fails with status 255 (the connection to a VM that went away).

Every call is appended to FAKE_POD_DIR/calls.log (shell-quoted, one line).
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

STATE = Path(os.environ.get("FAKE_POD_DIR", "."))
WORKERS = int(os.environ.get("FAKE_POD_WORKERS", "2"))


def install(bin_dir: Path, state_dir: Path) -> Path:
    """Puts this fake first as `gcloud` in bin_dir (to prepend to PATH); returns its path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(__file__)} "$@"\n')
    gcloud.chmod(0o755)
    return gcloud


def calls(state_dir: Path) -> list[list[str]]:
    path = state_dir / "calls.log"
    return [shlex.split(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- the fake itself -----------------------------------------------------------------------


def _read(name: str, default: str) -> str:
    path = STATE / name
    return path.read_text().strip() if path.exists() else default


def _write(name: str, value: str) -> None:
    (STATE / name).write_text(value + "\n")


def _exists() -> bool:
    return _read("exists", "0") == "1"


def _worker_home(i: int) -> Path:
    return STATE / "workers" / str(i)


def _flag(args: list[str], name: str) -> str | None:
    for arg in args:
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _not_found(what: str) -> int:
    print(f"ERROR: (gcloud.{what}) NOT_FOUND: Resource was not found", file=sys.stderr)
    return 1


def _workers(args: list[str]) -> list[int]:
    worker = _flag(args, "--worker") or "0"
    return list(range(WORKERS)) if worker == "all" else [int(worker)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_setup(command: str) -> str:
    """remote_setup.sh cannot pip install here: it runs as a dry run, then the venv's python is a
    wrapper of this interpreter (which has every dependency)."""
    def replace(match: re.Match) -> str:
        venv = match.group(2)
        venv_path = venv if venv.startswith("/") else f"$HOME/{venv}"
        return (f"{match.group(1)}bash launch/remote_setup.sh --dry-run >&2 && mkdir -p {venv_path}/bin && "
                f"printf '%s\\n' '#!/bin/sh' 'exec {sys.executable} \"$@\"' > {venv_path}/bin/python && "
                f"chmod +x {venv_path}/bin/python")

    return re.sub(r"(VENV_DIR=(\S+) PIP_EXTRAS=\S+ )bash launch/remote_setup\.sh", replace, command)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _training_pids(pid: int) -> list[int]:
    pids = []
    for child in _descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lapflow_jax.main" in cmdline and b"-m" in cmdline:
            pids.append(child)
    return pids


def _logged_steps(output: Path) -> int:
    """Training steps worker 0 has logged so far ("step 3/8 | loss ..." lines of its output)."""
    return len(re.findall(r"\bstep \d+/\d+ \| loss", output.read_text(errors="replace")))


def _ssh(args: list[str]) -> int:
    if not _exists() or _read("node_state", "READY") != "READY":
        print("ssh: connect to host 10.0.0.2 port 22: Connection timed out", file=sys.stderr)
        return 255
    command = _fake_setup(_flag(args, "--command") or "")
    workers = _workers(args)
    port = _free_port()
    procs = []
    # Each worker's output is kept in FAKE_POD_DIR/ssh/<call>-worker<i>.log (also for a preempted
    # call, whose remote logs train.sh cannot fetch) and printed when the call ends.
    (STATE / "ssh").mkdir(exist_ok=True)
    call = len(list((STATE / "ssh").glob("*-worker0.log")))
    outputs = [STATE / "ssh" / f"{call}-worker{i}.log" for i in workers]
    for i, output in zip(workers, outputs):
        home = _worker_home(i)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_POD_", "PYTEST_"))}
        env.pop("PYTHONPATH", None)  # each worker imports the code in its own folder
        env.update(HOME=str(home), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", SLURM_JOB_ID="1", SLURM_STEP_NODELIST="127.0.0.1",
                   SLURM_NTASKS=str(WORKERS), SLURM_PROCID=str(i), SLURM_LOCALID="0",
                   JAX_LOCAL_DEVICE_IDS="0,1,2,3")
        # Each VM has its own disk: /local-disk/ in a command is this worker's folder (this machine's
        # /tmp would be one disk shared by every worker, hiding what a pod does to local paths).
        own = command.replace("/local-disk/", f"{home}/local-disk/")
        with open(output, "wb") as out:
            procs.append(subprocess.Popen(["bash", "-c", own], cwd=home, env=env, start_new_session=True,
                                          stdout=out, stderr=subprocess.STDOUT))

    preempt_after = os.environ.get("FAKE_POD_PREEMPT_AFTER")
    training = "lapflow_jax.main" in command
    preempted = False
    if preempt_after and training and not (STATE / "preempted_once").exists():
        victim = int(os.environ.get("FAKE_POD_PREEMPT_WORKER", "1"))
        while all(p.poll() is None for p in procs):
            if _logged_steps(outputs[0]) >= int(preempt_after):
                pids = _training_pids(procs[workers.index(victim)].pid)
                for pid in pids:
                    os.kill(pid, signal.SIGTERM)
                print(f"[fake gcloud] preempting worker {victim}: SIGTERM to {pids}", file=sys.stderr)
                _write("preempted_once", "1")
                preempted = True
                break
            time.sleep(0.2)
    codes = [p.wait() for p in procs]
    for i, output in zip(workers, outputs):
        sys.stdout.write(f"--- worker {i}\n{output.read_text(errors='replace')}")
    sys.stdout.flush()
    if preempted:
        _write("node_state", "PREEMPTED")
        print(f"[fake gcloud] workers exited {codes}; the slice is PREEMPTED", file=sys.stderr)
        print("Connection to 10.0.0.3 closed by remote host.", file=sys.stderr)
        return 255
    bad = [c for c in codes if c != 0]
    return bad[0] if bad else 0


def _scp(args: list[str]) -> int:
    if not _exists() or _read("node_state", "READY") != "READY":
        print("scp: ssh: connect to host 10.0.0.2 port 22: Connection timed out", file=sys.stderr)
        return 1
    source, dest = [a for a in args if not a.startswith("--")][:2]
    for i in _workers(args):
        if ":" in source.split("/", 1)[0]:  # from the worker
            src = _worker_home(i) / source.split(":", 1)[1]
            if not src.exists():
                print(f"scp: {src.name}: No such file or directory", file=sys.stderr)
                return 1
            shutil.copy(src, dest)
        else:
            shutil.copy(source, _worker_home(i) / dest.split(":", 1)[1])
    return 0


# --- gcloud storage, against the GCS emulator (STORAGE_EMULATOR_HOST) -----------------------


def _bucket_and_name(url: str) -> tuple[str, str]:
    bucket, _, name = url.removeprefix("gs://").partition("/")
    return bucket, name


def _object_names(bucket: str, prefix: str) -> list[str]:
    names, token = [], None
    while True:
        query = {"prefix": prefix, **({"pageToken": token} if token else {})}
        url = f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as r:
            page = json.load(r)
        names += [item["name"] for item in page.get("items", [])]
        token = page.get("nextPageToken")
        if not token:
            return sorted(names)


def _download(bucket: str, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b/{bucket}/o/{quoted}?alt=media",
                                timeout=60) as r:
        return r.read()


def _upload(bucket: str, name: str, data: bytes) -> None:
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    request = urllib.request.Request(f"{os.environ['STORAGE_EMULATOR_HOST']}/upload/storage/v1/b/{bucket}/o?{query}",
                                     data=data, method="POST", headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(request, timeout=60).close()


def _storage(args: list[str]) -> int:
    """gcloud storage cp [-r] SRC DST (one side gs://), cat URL, ls URL."""
    verb, operands = args[0], [a for a in args[1:] if not a.startswith("-")]
    if verb == "cat":
        bucket, name = _bucket_and_name(operands[0])
        try:
            sys.stdout.buffer.write(_download(bucket, name))
        except urllib.error.HTTPError:
            print(f"ERROR: (gcloud.storage.cat) The following URLs matched no objects: {operands[0]}", file=sys.stderr)
            return 1
        return 0
    if verb == "ls":
        bucket, prefix = _bucket_and_name(operands[0].rstrip("/") + "/")
        children = sorted({name[len(prefix):].split("/")[0] + ("/" if "/" in name[len(prefix):] else "")
                           for name in _object_names(bucket, prefix)})
        print("\n".join(f"gs://{bucket}/{prefix}{child}" for child in children))
        return 0 if children else 1
    if verb == "cp":
        source, dest = operands[:2]
        if not source.startswith("gs://"):  # upload a file, or a folder with -r
            bucket, prefix = _bucket_and_name(dest)
            source_path = Path(source)
            files = [source_path] if source_path.is_file() else sorted(p for p in source_path.rglob("*") if p.is_file())
            for path in files:
                relative = source_path.name if path == source_path else f"{source_path.name}/{path.relative_to(source_path)}"
                name = prefix + relative if (prefix.endswith("/") or not prefix) else prefix if path == source_path else f"{prefix}/{relative}"
                _upload(bucket, name, path.read_bytes())
            return 0
        bucket, prefix = _bucket_and_name(source.rstrip("/"))
        names = _object_names(bucket, prefix + "/") or _object_names(bucket, prefix)
        if not names:
            print(f"ERROR: (gcloud.storage.cp) The following URLs matched no objects: {source}", file=sys.stderr)
            return 1
        target = Path(dest)
        for name in names:
            relative = name[len(prefix):].lstrip("/")
            out = target / relative if relative else target
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(_download(bucket, name))
        return 0
    print(f"fake gcloud: unsupported storage call: {shlex.join(args)}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "calls.log", "a") as log:
        log.write(shlex.join(argv) + "\n")
    verb, rest = " ".join(argv[:4]), argv[4:]
    if verb == "compute tpus queued-resources create":
        if _exists():
            print("ERROR: ALREADY_EXISTS", file=sys.stderr)
            return 1
        for i in range(WORKERS):
            _worker_home(i).mkdir(parents=True)
        _write("exists", "1")
        _write("node_state", "READY")
        return 0
    if verb == "compute tpus queued-resources delete":
        if not _exists():
            return _not_found("delete")
        shutil.rmtree(STATE / "workers", ignore_errors=True)
        _write("exists", "0")
        return 0
    if verb == "compute tpus queued-resources describe":
        if not _exists():
            return _not_found("describe")
        print("ACTIVE")
        return 0
    if verb == "compute tpus tpu-vm describe":
        if not _exists():
            return _not_found("describe")
        print(_read("node_state", "READY"))
        return 0
    if verb == "compute tpus tpu-vm ssh":
        return _ssh(rest)
    if verb == "compute tpus tpu-vm scp":
        return _scp(rest)
    if argv[:1] == ["storage"]:
        return _storage(argv[1:])
    print(f"fake gcloud: unsupported call: {shlex.join(argv)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

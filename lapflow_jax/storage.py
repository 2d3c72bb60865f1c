"""Local paths and object-store URLs (gs://) through one small layer on etils.epath.

Why a layer: array_record writes local files only, Orbax/safetensors readers of our weight
formats take local folders, and `os.path.abspath` turns gs://bucket into a local folder. These
helpers keep a URL a URL, write objects whole (an object store has no rename, but an upload is
atomic: the object appears complete or not at all), and bring a remote folder of weights to a
local cache once per process.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile

from etils import epath

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (gs://bucket/x, any scheme://), not a local path."""
    return bool(_URL.match(os.fspath(path)))


def resolve(path: str | os.PathLike) -> str:
    """A URL unchanged; a local path with ~ expanded, made absolute."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(folder: str | os.PathLike, name: str) -> str:
    return str(epath.Path(os.fspath(folder)) / name)


def names(folder: str | os.PathLike) -> set[str]:
    """The entries of `folder` (one listing: cheap on an object store); empty if it does not exist."""
    path = epath.Path(os.fspath(folder))
    return {p.name for p in path.iterdir()} if path.exists() else set()


def publish(local_file: str, final: str) -> None:
    """Moves a finished local file to `final`: a rename on a local disk, one upload to a URL."""
    if is_remote(final):
        epath.Path(local_file).copy(epath.Path(final), overwrite=True)
        os.remove(local_file)
    else:
        os.replace(local_file, final)


def _cache_path(path: str, cache_root: str | None) -> str:
    """Where a remote object's local copy lives: $LAPFLOW_CACHE (or ~/.cache/lapflow)/remote/<hash>/<name>."""
    root = cache_root or os.environ.get("LAPFLOW_CACHE") or os.path.expanduser("~/.cache/lapflow")
    return os.path.join(root, "remote", hashlib.sha256(path.encode()).hexdigest()[:16], path.rsplit("/", 1)[-1])


def local_copy(path: str | os.PathLike, *, cache_root: str | None = None) -> str:
    """A local folder with the contents of `path`: `path` itself when local, else a cached copy.

    A remote folder (weights on gs://) is copied once to `cache_root` (default
    $LAPFLOW_CACHE or ~/.cache/lapflow) under a name derived from the URL; the copy is made in a
    temporary folder and renamed, so a killed copy is never taken for a complete one.
    """
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.abspath(os.path.expanduser(path))
    target = _cache_path(path.rstrip("/"), cache_root)
    if os.path.isdir(target):
        return target
    source = epath.Path(path)
    if not source.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".copy-", dir=os.path.dirname(target))
    pending = [(source, staging)]
    while pending:  # one listing per folder (epath refuses ** on object stores)
        folder, local = pending.pop()
        os.makedirs(local, exist_ok=True)
        for item in folder.iterdir():
            if item.is_dir():
                pending.append((item, os.path.join(local, item.name)))
            else:
                with open(os.path.join(local, item.name), "wb") as f:
                    f.write(item.read_bytes())
    try:
        os.replace(staging, target)
    except OSError:  # another process finished the same copy first
        import shutil  # pylint: disable=import-outside-toplevel
        shutil.rmtree(staging, ignore_errors=True)
    return target


def local_file(path: str | os.PathLike, *, cache_root: str | None = None) -> str:
    """A local file with the bytes of `path`: `path` itself when local, else a cached copy (as local_copy)."""
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.abspath(os.path.expanduser(path))
    target = _cache_path(path, cache_root)
    if os.path.isfile(target):
        return target
    source = epath.Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=".copy-", dir=os.path.dirname(target))
    with os.fdopen(fd, "wb") as f:
        f.write(source.read_bytes())
    os.replace(staging, target)  # whole or absent, also against a concurrent copy
    return target

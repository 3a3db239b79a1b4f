"""Read a PyTorch checkpoint (`torch.save` of a state dict) into numpy arrays without torch.

Two layouts exist, and `read_state_dict` accepts both:

* zip (torch >= 1.6): `<root>/data.pkl` contains the pickled state dict, and
  `<root>/data/<key>` contains the raw bytes of each storage.
* legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): five pickles
  in a row (magic number, protocol version, system info, the state dict, the
  list of storage keys), then each storage as an int64 element count followed
  by its raw bytes, in the order of that key list.

Tensors in both layouts are pickled as calls to `torch._utils._rebuild_tensor_v2`
(storage, offset, size, stride) whose storage is a persistent id. The unpickler
below accepts only those rebuild functions, the typed storage classes and
`collections.OrderedDict`, so loading a file never runs other code from it.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from crackjax.weights.entry import WeightsError

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

# Typed storage class name in the pickle -> numpy element type.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "DoubleStorage": np.dtype(np.float64),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    """A storage named by a persistent id. `offset` (in elements) is nonzero only for legacy views."""

    key: str
    dtype: np.dtype
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """A tensor whose storage bytes are read after unpickling."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    if not isinstance(storage, _StorageRef):
        raise WeightsError(f"tensor storage is {type(storage).__name__}, expected a storage persistent id")
    return _TensorRef(storage, int(storage_offset), tuple(int(n) for n in size), tuple(int(n) for n in stride))


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickler that maps torch tensors to `_TensorRef` and rejects every other global."""

    def __init__(self, file: BinaryIO, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise WeightsError(
            f"{self.path}: the pickle references {module}.{name}, which is not allowed, so the file was not loaded. "
            "Only torch tensor rebuild functions, typed storages and OrderedDict are allowed in a state dict."
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise WeightsError(f"{self.path}: unsupported persistent id {pid!r}; expected ('storage', type, key, ...)")

        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise WeightsError(f"{self.path}: storage {key} has unsupported type {storage_type!r}")

        view_metadata = pid[5] if len(pid) > 5 else None
        if view_metadata is not None:
            # A legacy view (view_key, offset, size) reads from the root storage `key`.
            return _StorageRef(key, storage_type.dtype, int(view_metadata[1]))

        return _StorageRef(key, storage_type.dtype)


def _materialize(tensor: _TensorRef, storage: np.ndarray, name: str, path: Path) -> np.ndarray:
    """Copy the strided view that `tensor` describes out of the 1-D `storage` array."""
    offset = tensor.storage.offset + tensor.offset
    if len(tensor.shape) != len(tensor.strides):
        raise WeightsError(f"{path}: tensor {name} has shape {tensor.shape} but strides {tensor.strides}")

    if 0 in tensor.shape:
        return np.zeros(tensor.shape, storage.dtype)

    last = offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.strides))
    first = offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.strides) if s < 0)
    if first < 0 or last >= storage.size:
        raise WeightsError(
            f"{path}: tensor {name} (shape {tensor.shape}, stride {tensor.strides}, offset {offset}) "
            f"reaches outside its storage of {storage.size} elements; the file is truncated or corrupt"
        )

    view = np.lib.stride_tricks.as_strided(
        storage[offset:],
        shape=tensor.shape,
        strides=tuple(s * storage.itemsize for s in tensor.strides),
        writeable=False,
    )
    return np.array(view, copy=True, order="C")


def _collect(obj: Any, path: Path) -> dict[str, _TensorRef]:
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: the checkpoint contains a {type(obj).__name__}, expected a state dict (name -> tensor)")

    tensors = {}
    for name, value in obj.items():
        if not isinstance(value, _TensorRef):
            raise WeightsError(f"{path}: entry {name!r} is a {type(value).__name__}, expected a tensor")
        tensors[str(name)] = value
    return tensors


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise WeightsError(f"{path}: expected one <root>/data.pkl in the zip checkpoint, found {pickles}")
        root = pickles[0][: -len("data.pkl")]

        byteorder = "little"
        if f"{root}byteorder" in archive.namelist():
            byteorder = archive.read(f"{root}byteorder").decode().strip()

        with archive.open(pickles[0]) as file:
            tensors = _collect(_StateDictUnpickler(file, path).load(), path)

        storages: dict[str, np.ndarray] = {}
        arrays = {}
        for name, tensor in tensors.items():
            key = tensor.storage.key
            if key not in storages:
                member = f"{root}data/{key}"
                try:
                    raw = archive.read(member)
                except KeyError as error:
                    raise WeightsError(f"{path}: storage {member} of tensor {name} is missing from the zip") from error
                dtype = tensor.storage.dtype.newbyteorder("<" if byteorder == "little" else ">")
                if len(raw) % dtype.itemsize:
                    raise WeightsError(f"{path}: storage {member} has {len(raw)} bytes, not a multiple of {dtype.itemsize}")
                storages[key] = np.frombuffer(raw, dtype).astype(tensor.storage.dtype, copy=False)
            arrays[name] = _materialize(tensor, storages[key], name, path)
    return arrays


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as file:
        magic = _StateDictUnpickler(file, path).load()
        if magic != _LEGACY_MAGIC_NUMBER:
            raise WeightsError(f"{path}: not a PyTorch checkpoint (no zip archive and no legacy magic number)")

        protocol = _StateDictUnpickler(file, path).load()
        if protocol != _LEGACY_PROTOCOL_VERSION:
            raise WeightsError(f"{path}: legacy protocol version {protocol} is unsupported (expected {_LEGACY_PROTOCOL_VERSION})")

        sys_info = _StateDictUnpickler(file, path).load()
        little_endian = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True

        tensors = _collect(_StateDictUnpickler(file, path).load(), path)
        storage_keys = _StateDictUnpickler(file, path).load()

        dtypes = {tensor.storage.key: tensor.storage.dtype for tensor in tensors.values()}
        storages = {}
        for key in storage_keys:
            key = str(key)
            if key not in dtypes:
                raise WeightsError(f"{path}: storage {key} is listed but no tensor uses it, so its element type is unknown")
            dtype = dtypes[key].newbyteorder("<" if little_endian else ">")

            count_bytes = file.read(8)
            if len(count_bytes) != 8:
                raise WeightsError(f"{path}: file ends before storage {key}; the file is truncated")
            count = struct.unpack("<q" if little_endian else ">q", count_bytes)[0]
            raw = file.read(count * dtype.itemsize)
            if len(raw) != count * dtype.itemsize:
                raise WeightsError(f"{path}: storage {key} is truncated ({len(raw)} of {count * dtype.itemsize} bytes)")
            storages[key] = np.frombuffer(raw, dtype).astype(dtypes[key], copy=False)

    arrays = {}
    for name, tensor in tensors.items():
        if tensor.storage.key not in storages:
            raise WeightsError(f"{path}: storage {tensor.storage.key} of tensor {name} is missing from the file")
        arrays[name] = _materialize(tensor, storages[tensor.storage.key], name, path)
    return arrays


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read the state dict saved by `torch.save` at `path` as `{name: np.ndarray}`, in file order.

    Each array is a C-contiguous copy with the tensor's shape and dtype. Raises
    WeightsError when the file is not a PyTorch state dict, is truncated, or
    its pickle references anything other than tensors and OrderedDict.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path)
        return _read_legacy(path)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, struct.error, zipfile.BadZipFile) as error:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from error

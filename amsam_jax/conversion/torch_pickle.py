"""Reads `torch.save` checkpoints into NumPy arrays without torch and without running their code.

A `.pth` file is a pickle, and unpickling runs whatever callable the pickle names: `os.system`,
`builtins.exec`, any class and its `__reduce__`. This reader unpickles with an explicit allow-list
instead: the tensor and parameter rebuild functions of `torch._utils`, `collections.OrderedDict`,
and the storage-type and `torch.<dtype>` names that torch 2.x writes, each mapped to a local,
torch-free stand-in. Every other global is refused before anything is called, so a checkpoint that
carries code fails with one line naming the global and none of it runs. Storages are read as raw
bytes (the zip records of PyTorch >= 1.6, or the stream of the legacy format) and each tensor is
rebuilt from its offset, size and stride, then copied, so views and shared storages come out as
torch holds them and every returned array owns its memory.

`dry_run` checks a checkpoint that another loader will unpickle in full (Ultralytics'
`torch.load(weights_only=False)`): the pickle is run against stand-ins for the globals a caller's
allow-list accepts, so nothing it names is imported from the file or called, and the first global
outside the list is reported.
"""

import dataclasses
import io
import os
import pickle
import re
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import ml_dtypes  # a dependency of jax: bfloat16 and float8 arrays bit for bit as torch holds them
import numpy as np

from amsam_jax.utils.errors import AmsamError, first_line

STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "module")

# The typed-storage names `_rebuild_tensor_v2` tensors carry (numel counts elements).
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
# `torch.<dtype>` objects; torch writes them as the last argument of `_rebuild_tensor_v3`, whose
# storage is a `torch.storage.UntypedStorage` (numel counts bytes): the dtypes added after the
# typed storages were frozen (uint16/32/64, float8).
TORCH_DTYPES = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}
# A `torch.<name>` global that looks like a dtype we do not read is reported as such, not as code.
_DTYPE_LIKE = re.compile(r"\w*Storage|(q?u?int|float|bfloat|complex|bits)\d\w*")
# The legacy format opens with pickle.dumps(MAGIC_NUMBER, protocol=2).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"  # torch.load reads a file with these first bytes as a zip, else legacy
# Module names of protocol 0-2 pickles (Python 2's), as `pickle`'s fix_imports maps them.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
# What a malformed pickle raises from inside the unpickler or from a rebuild called with bad args.
_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    OverflowError,
    RecursionError,
    struct.error,
)


class CheckpointReadError(AmsamError):
    """A file that cannot be read as a `torch.save` checkpoint; `str()` is `<path>: <problem>`."""


class UnpicklingRefused(CheckpointReadError):
    """The pickle names a global outside the allow-list; nothing of it was called.

    Attributes:
        global_name: the refused global, `module.name` (e.g. `posix.system`).
    """

    def __init__(self, path: object, global_name: str):
        super().__init__(
            path,
            f"refuses to load {global_name!r} from the pickle "
            "(a checkpoint carrying code is never executed)",
        )
        self.global_name = global_name


@dataclasses.dataclass(frozen=True)
class _Marker:
    """What `find_class` gives for a storage type, a dtype or `torch.Tensor`: data, not callable."""

    name: str
    dtype: np.dtype | None = None  # None: untyped storage (bytes), or torch.Tensor


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype | None  # None: untyped, numel counts bytes
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * (1 if self.dtype is None else self.dtype.itemsize)


class _TensorRef:
    """A tensor as the pickle describes it; becomes an array once the storages are read."""

    __slots__ = ("storage", "dtype", "offset", "size", "stride", "array")

    def __init__(self, storage, dtype, offset, size, stride):
        self.storage, self.dtype, self.offset = storage, dtype, offset
        self.size, self.stride = size, stride
        self.array = None


_TENSOR_TYPE = _Marker("torch.Tensor")


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _Unpickler(pickle.Unpickler):
    """What both unpicklers share: errors naming the checkpoint, one line per malformed pickle."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def error(self, problem: str) -> CheckpointReadError:
        return CheckpointReadError(self.path, problem)

    def load_object(self, what: str):
        """Unpickles; a malformed pickle becomes one `CheckpointReadError` line."""
        try:
            return self.load()
        except _PICKLE_ERRORS as e:
            raise self.error(f"{what} is not a valid pickle ({first_line(e)})") from None


class _RestrictedUnpickler(_Unpickler):
    """Unpickles a `data.pkl` with the allow-list; tensors come out as `_TensorRef`s.

    Args:
        file: the pickle stream.
        path: the checkpoint, for error messages.
        legacy: persistent ids of the legacy format (with a sixth field, the view metadata).
    """

    def __init__(self, file, path: Path, *, legacy: bool = False):
        super().__init__(file, path)
        self.legacy = legacy
        self.storages: dict[str, _Storage] = {}
        self._uses: dict[str, int] = {}  # tensors per storage key, to drop a storage once read
        self._rebuilders = (self._rebuild_tensor_v2, self._rebuild_tensor_v3)
        self._allowed = {
            ("collections", "OrderedDict"): OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
            ("torch._tensor", "_rebuild_from_type_v2"): self._rebuild_from_type_v2,
            ("torch", "Tensor"): _TENSOR_TYPE,
            ("torch", "UntypedStorage"): _Marker("UntypedStorage"),
            ("torch.storage", "UntypedStorage"): _Marker("UntypedStorage"),
        }
        for name, dtype in STORAGE_DTYPES.items():
            self._allowed["torch", name] = _Marker(name, dtype)
        for name, dtype in TORCH_DTYPES.items():
            self._allowed["torch", name] = _Marker(name, dtype)

    def find_class(self, module: str, name: str):
        found = self._allowed.get((module, name))
        if found is not None:
            return found
        if module == "torch" and _DTYPE_LIKE.fullmatch(name):
            raise self.error(f"unsupported dtype 'torch.{name}'")
        if module == "torch._utils" and name.startswith("_rebuild"):
            raise self.error(f"unsupported tensor kind '{module}.{name}' (only dense tensors)")
        raise UnpicklingRefused(self.path, f"{module}.{name}")

    def persistent_load(self, pid):
        size = 6 if self.legacy else 5
        if not (isinstance(pid, tuple) and len(pid) == size and pid[0] == "storage"):
            raise self.error(f"unknown persistent id in the pickle: {str(pid)[:60]}")
        _, storage_type, key, _location, numel = pid[:5]
        if self.legacy and pid[5] is not None:
            raise self.error("a storage view of the pre-1.0 format; re-save with a recent torch")
        if not (isinstance(storage_type, _Marker) and storage_type.name.endswith("Storage")):
            raise self.error(f"persistent id names {storage_type!r}, not a storage type")
        if not (isinstance(key, str) and _is_index(numel)):
            raise self.error(f"malformed storage id {str(pid)[:60]}")
        storage = self.storages.setdefault(key, _Storage(key, storage_type.dtype, numel))
        if storage != _Storage(key, storage_type.dtype, numel):
            raise self.error(f"storage {key!r} is declared twice with different types or sizes")
        return storage

    def _rebuild_tensor_v2(
        self, storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
    ):
        if not isinstance(storage, _Storage) or storage.dtype is None:
            raise self.error("_rebuild_tensor_v2 without a typed storage")
        return self._tensor(storage, storage.dtype, storage_offset, size, stride, metadata)

    def _rebuild_tensor_v3(
        self,
        storage,
        storage_offset,
        size,
        stride,
        requires_grad,
        backward_hooks,
        dtype,
        metadata=None,
    ):
        if not (isinstance(dtype, _Marker) and dtype.dtype is not None):
            raise self.error(f"_rebuild_tensor_v3 with {dtype!r}, not a dtype")
        return self._tensor(storage, dtype.dtype, storage_offset, size, stride, metadata)

    def _rebuild_parameter(self, data, requires_grad, backward_hooks, state=None):
        if not isinstance(data, _TensorRef):
            raise self.error("_rebuild_parameter without a tensor")
        return data  # an nn.Parameter is its tensor; requires_grad and Python state are dropped

    def _rebuild_from_type_v2(self, func, new_type, args, state):
        # torch writes this for a plain tensor that carries Python attributes (dropped here).
        if new_type is not _TENSOR_TYPE or func not in self._rebuilders:
            raise self.error(f"_rebuild_from_type_v2 of {new_type!r} is not a plain tensor")
        return func(*args)

    def _tensor(self, storage, dtype, offset, size, stride, metadata) -> _TensorRef:
        if not isinstance(storage, _Storage):
            raise self.error(f"a tensor on {type(storage).__name__}, not a storage")
        if metadata:
            raise self.error(f"unsupported tensor metadata {sorted(metadata)} (e.g. a neg view)")
        if not (
            _is_index(offset)
            and isinstance(size, tuple | list)
            and isinstance(stride, tuple | list)
            and len(size) == len(stride)
            and all(map(_is_index, [*size, *stride]))
        ):
            raise self.error(f"malformed tensor size {size!r} / stride {stride!r}")
        if storage.nbytes % dtype.itemsize:
            raise self.error(f"storage {storage.key!r} is not a whole number of {dtype} items")
        count = storage.nbytes // dtype.itemsize
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if all(size) and last >= count:
            raise self.error(
                f"a tensor of size {tuple(size)}, stride {tuple(stride)} at offset {offset} "
                f"does not fit storage {storage.key!r} of {count} {dtype} items"
            )
        self._uses[storage.key] = self._uses.get(storage.key, 0) + 1
        return _TensorRef(storage, dtype, offset, tuple(size), tuple(stride))

    def materialize(self, obj, read_storage: Callable[[str], bytes], swap: bool):
        """Replaces every `_TensorRef` in `obj` by its array, reading each storage once.

        Args:
            obj: the unpickled object.
            read_storage: the raw bytes of a storage key.
            swap: the storages are in the other byte order than this machine's.

        Returns:
            `obj` with arrays in place of the tensors (dicts and lists are updated in place).
        """
        cache: dict[str, np.ndarray] = {}
        done: dict[int, object] = {}

        def array(ref: _TensorRef) -> np.ndarray:
            if ref.array is None:
                key = ref.storage.key
                if key not in cache:
                    raw = read_storage(key)
                    if len(raw) != ref.storage.nbytes:
                        raise self.error(
                            f"storage {key!r} holds {len(raw)} bytes, "
                            f"the pickle declares {ref.storage.nbytes}"
                        )
                    cache[key] = np.frombuffer(raw, dtype=np.uint8)
                ref.array = _strided_copy(cache[key], ref, swap)
                self._uses[key] -= 1
                if not self._uses[key]:
                    del cache[key]
            return ref.array

        def convert(value):
            if isinstance(value, _TensorRef):
                return array(value)
            if id(value) in done:
                return done[id(value)]
            done[id(value)] = value
            if isinstance(value, dict):
                for key, item in value.items():
                    value[key] = convert(item)
                if getattr(value, "__dict__", None):  # OrderedDict state, e.g. `_metadata`
                    convert(value.__dict__)
            elif isinstance(value, list):
                value[:] = [convert(item) for item in value]
            elif isinstance(value, tuple):
                done[id(value)] = tuple(convert(item) for item in value)
            return done[id(value)]

        try:
            return convert(obj)
        except RecursionError:
            raise self.error("the pickle is nested too deeply") from None


def _strided_copy(raw: np.ndarray, ref: _TensorRef, swap: bool) -> np.ndarray:
    """The tensor `ref` of the storage bytes `raw`, as a C-contiguous array of its own."""
    if not all(ref.size):
        return np.empty(ref.size, dtype=ref.dtype)
    itemsize = ref.dtype.itemsize
    # Strided through unsigned ints of the same size: as_strided's array interface does not carry
    # ml_dtypes' float8 types. Whole items: checked against the dtype when the tensor was read.
    flat = raw.view(f"u{itemsize}")
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :],
        shape=ref.size,
        strides=tuple(s * itemsize for s in ref.stride),
        writeable=False,
    )
    out = np.empty(ref.size, dtype=ref.dtype)
    bits = out.view(flat.dtype)
    bits[...] = view
    if swap:
        bits.byteswap(inplace=True)
    return out


def _read_head(path: Path) -> bytes:
    if not path.exists():
        raise CheckpointReadError(path, "no such file")
    if not path.is_file():
        raise CheckpointReadError(path, "is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            return f.read(512)
    except OSError as e:
        raise CheckpointReadError(path, f"cannot be read ({first_line(e)})") from None


def _read_record(archive: zipfile.ZipFile, path: Path, name: str, nbytes: int | None = None):
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise CheckpointReadError(path, f"the zip archive has no record {name!r}") from None
    if nbytes is not None and info.file_size != nbytes:
        raise CheckpointReadError(
            path, f"record {name!r} holds {info.file_size} bytes, the pickle declares {nbytes}"
        )
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
        raise CheckpointReadError(path, f"corrupt zip record {name!r} ({first_line(e)})") from None


def _load_zip(path: Path):
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointReadError(
            path, f"truncated or corrupt zip archive ({first_line(e)})"
        ) from None
    with archive:
        names = archive.namelist()
        # torch writes `<folder>/data.pkl`; the folder is the file's stem at save time, or anything
        found = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(found) != 1:
            problem = "several data.pkl records" if found else "no data.pkl record"
            raise CheckpointReadError(path, f"a zip archive with {problem}, not a torch.save file")
        prefix = found[0].removesuffix("data.pkl")
        if prefix + "constants.pkl" in names:
            raise CheckpointReadError(
                path, "a TorchScript archive (torch.jit.save); save a state dict with torch.save"
            )
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = _read_record(archive, path, prefix + "byteorder").decode("latin1").strip()
        if byteorder not in ("little", "big"):
            raise CheckpointReadError(path, f"unknown byte order {byteorder[:20]!r}")
        data = _read_record(archive, path, found[0])
        unpickler = _RestrictedUnpickler(io.BytesIO(data), path)
        obj = unpickler.load_object(found[0])

        def read_storage(key: str) -> bytes:
            name = f"{prefix}data/{key}"
            return _read_record(archive, path, name, unpickler.storages[key].nbytes)

        return unpickler.materialize(obj, read_storage, swap=byteorder != sys.byteorder)


def _load_legacy(path: Path):
    """The pre-1.6 stream: magic, protocol, sys info, the object, storage keys, then storages."""
    with open(path, "rb") as f:
        header = [_RestrictedUnpickler(f, path).load_object("the header") for _ in range(3)]
        _, protocol, sys_info = header
        if protocol != _LEGACY_PROTOCOL:
            raise CheckpointReadError(path, f"legacy torch.save protocol {protocol!r}, not 1001")
        if not (isinstance(sys_info, dict) and sys_info.get("little_endian") is True):
            raise CheckpointReadError(
                path, "a big-endian legacy checkpoint; re-save it with a recent torch"
            )
        unpickler = _RestrictedUnpickler(f, path, legacy=True)
        obj = unpickler.load_object("the pickle")
        keys = _RestrictedUnpickler(f, path).load_object("the storage key list")
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise CheckpointReadError(path, "the storage key list is not a list of strings")
        if set(keys) != set(unpickler.storages):
            raise CheckpointReadError(path, "the storage key list does not match the pickle")
        offsets, position, end = {}, f.tell(), os.fstat(f.fileno()).st_size
        for key in keys:
            storage = unpickler.storages[key]
            f.seek(position)
            head = f.read(8)
            itemsize = 1 if storage.dtype is None else storage.dtype.itemsize
            if len(head) < 8 or position + 8 + storage.nbytes > end:
                raise CheckpointReadError(path, f"truncated: storage {key!r} is cut off")
            if struct.unpack("<q", head)[0] * itemsize != storage.nbytes:
                raise CheckpointReadError(path, f"storage {key!r} has the wrong size")
            offsets[key] = position + 8
            position += 8 + storage.nbytes

        def read_storage(key: str) -> bytes:
            f.seek(offsets[key])
            return f.read(unpickler.storages[key].nbytes)

        return unpickler.materialize(obj, read_storage, swap=False)


def load_checkpoint(path: str | os.PathLike):
    """Reads a `torch.save` file (zip or legacy format) without torch and without running code.

    Args:
        path: the checkpoint file.

    Returns:
        the saved object with every tensor (and `nn.Parameter`) as a NumPy array that owns its
        memory: bfloat16 and float8 as `ml_dtypes` arrays, the rest as the NumPy dtype of the
        same name. Dicts (`OrderedDict` included), lists, tuples, numbers, strings and None are
        kept as they are.

    Raises:
        UnpicklingRefused: the pickle names a global outside the allow-list (nothing was called).
        CheckpointReadError: missing or unreadable file, not a `torch.save` file, truncated or
            corrupt archive, a missing or short storage, a tensor that does not fit its storage,
            an unsupported dtype.
    """
    path = Path(path)
    head = _read_head(path)
    if head.startswith(_ZIP_MAGIC):
        return _load_zip(path)
    if head.startswith(_LEGACY_MAGIC):
        return _load_legacy(path)
    raise CheckpointReadError(path, _format_problem(head))


def _format_problem(head: bytes) -> str:
    """Why a file that is neither a zip nor a legacy `torch.save` stream is not a checkpoint."""
    if head[257:262] == b"ustar":
        return "a tar checkpoint of torch < 0.4; re-save it with a recent torch"
    if head.startswith(b"\x80"):
        return "a plain pickle, not a torch.save file (zip or legacy format)"
    if not head:
        return "an empty file, not a torch.save file"
    return "not a torch.save file (neither a zip archive nor the legacy format)"


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads the state dict of a `torch.save` checkpoint, without torch.

    The state dict is the saved object itself when it is a dict of tensors, else the first of
    `STATE_DICT_KEYS` ("model", "state_dict", "model_state_dict", "module") holding a dict.

    Args:
        path: the checkpoint file.

    Returns:
        parameter name -> array, in the saved order (dtypes as `load_checkpoint`).

    Raises:
        CheckpointReadError: as `load_checkpoint`; also no state dict, or entries of the chosen
            state dict that are not tensors (named).
    """
    obj = load_checkpoint(path)
    if not isinstance(obj, dict):
        raise CheckpointReadError(path, f"holds a {type(obj).__name__}, not a state dict")
    if not obj or not all(isinstance(v, np.ndarray) for v in obj.values()):
        nested = [k for k in STATE_DICT_KEYS if isinstance(obj.get(k), dict)]
        obj = obj[nested[0]] if nested else obj
    if not obj:
        raise CheckpointReadError(path, "holds an empty state dict")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointReadError(
            path, f"state dict entries that are not tensors: {', '.join(bad[:5])}{more}"
        )
    return dict(obj)


# ----------------------------------------------------------------------------------------------
# Dry run: checking a pickle that another loader will unpickle in full


class StandIn:
    """A dry run's stand-in for an allowed global: takes any arguments and state, runs nothing.

    Each allowed global gets a subclass of its own (`global_name`); what the pickle builds from
    it is an instance, so a caller can check what the saved object is made of.
    """

    global_name = ""
    rebuilt_only = False  # an nn.Module class: torch.save writes NEWOBJ + BUILD, never a call

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


# What an allow-list says of a global: "call" (a function or data class the pickle may call),
# "class" (a class the pickle may only rebuild without calling it, as torch.save writes
# nn.Modules), "getattr" (`builtins.getattr` of a public attribute of such a class) or None.
Allow = Callable[[str, str], str | None]


class _DryRunUnpickler(_Unpickler):
    """Unpickles with `StandIn`s for the globals `allow` accepts; refuses the first other one."""

    def __init__(self, file, path: Path, allow: Allow):
        super().__init__(file, path)
        self.allow = allow
        self.storages: dict[str, int] = {}  # storage key -> bytes
        self._stand_ins: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        module = _PY2_MODULES.get(module, module)
        kind = self.allow(module, name)
        if kind == "getattr":
            return self._getattr
        if kind not in ("call", "class"):
            raise UnpicklingRefused(self.path, f"{module}.{name}")
        return self._stand_in(f"{module}.{name}", rebuilt_only=kind == "class")

    def _stand_in(self, global_name: str, rebuilt_only: bool = False) -> type:
        if global_name not in self._stand_ins:
            path = self.path

            def init(obj, *args, **kwargs):
                if type(obj).rebuilt_only:  # a call would run the class's __init__
                    raise UnpicklingRefused(path, f"{global_name}(...)")

            namespace = {"global_name": global_name, "rebuilt_only": rebuilt_only, "__init__": init}
            name = global_name.rpartition(".")[2]
            self._stand_ins[global_name] = type(name, (StandIn,), namespace)
        return self._stand_ins[global_name]

    def _getattr(self, obj, name):
        # Ultralytics pickles a head's `forward` function this way (e.g. `Detect.forward`).
        public = isinstance(name, str) and name.isidentifier() and not name.startswith("_")
        if public and isinstance(obj, type) and issubclass(obj, StandIn) and obj.rebuilt_only:
            return self._stand_in(f"{obj.global_name}.{name}")
        if name in ("forward", "forward_fuse") and isinstance(obj, StandIn) and obj.rebuilt_only:
            return self._stand_in(f"{obj.global_name}.{name}")
        owner = getattr(obj, "global_name", type(obj).__name__)
        raise UnpicklingRefused(self.path, f"builtins.getattr({owner}, {str(name)[:40]!r})")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise self.error(f"unknown persistent id in the pickle: {str(pid)[:60]}")
        _, storage_type, key, _location, numel = pid
        name = getattr(storage_type, "global_name", "").removeprefix("torch.")
        if name in ("UntypedStorage", "storage.UntypedStorage"):
            itemsize = 1
        elif name in STORAGE_DTYPES:
            itemsize = STORAGE_DTYPES[name].itemsize
        else:
            raise self.error(f"persistent id names {str(storage_type)[:60]}, not a storage type")
        if not (isinstance(key, str) and _is_index(numel)):
            raise self.error(f"malformed storage id {str(pid)[:60]}")
        if self.storages.setdefault(key, numel * itemsize) != numel * itemsize:
            raise self.error(f"storage {key!r} is declared twice with different sizes")
        return self._stand_in("torch.storage")()


def dry_run(path: str | os.PathLike, allow: Allow):
    """Checks a zip `torch.save` file before a full unpickler reads it, running nothing of it.

    The `data.pkl` record that `torch.load` will read (the archive folder is its first record's,
    names match without case, as torch's zip reader does) is unpickled with a `StandIn` for every
    global `allow` accepts; every storage record must exist with the declared size and every
    record must pass its CRC.

    Args:
        path: the checkpoint file.
        allow: the allow-list (`Allow`).

    Returns:
        the saved object built of stand-ins (dicts, lists, strings and numbers as saved).

    Raises:
        UnpicklingRefused: the first global outside the allow-list (or a call of a class that
            may only be rebuilt, or a `getattr` of a private name); nothing was called.
        CheckpointReadError: missing or unreadable file, not a zip `torch.save` file (the legacy
            format cannot be checked this way), a TorchScript archive, duplicate record names,
            corrupt records, a malformed pickle, a missing or short storage record.
    """
    path = Path(path)
    head = _read_head(path)
    if head.startswith(_LEGACY_MAGIC):
        raise CheckpointReadError(
            path, "the legacy torch.save format (torch < 1.6) cannot be checked; re-save it"
        )
    if not head.startswith(_ZIP_MAGIC):
        raise CheckpointReadError(path, _format_problem(head))
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointReadError(
            path, f"truncated or corrupt zip archive ({first_line(e)})"
        ) from None
    with archive:
        names = archive.namelist()
        records = {n.lower(): n for n in names}
        if len(records) != len(names):
            raise CheckpointReadError(path, "a zip archive with duplicate record names")
        folder = names[0].partition("/")[0] if names and "/" in names[0] else None
        data_name = records.get(f"{folder}/data.pkl".lower()) if folder else None
        if data_name is None:
            raise CheckpointReadError(path, "a zip archive without data.pkl, not a torch.save file")
        if f"{folder}/constants.pkl".lower() in records:
            raise CheckpointReadError(
                path, "a TorchScript archive (torch.jit.save), not a torch.save checkpoint"
            )
        try:
            bad = archive.testzip()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
            raise CheckpointReadError(path, f"corrupt zip archive ({first_line(e)})") from None
        if bad is not None:
            raise CheckpointReadError(path, f"corrupt zip record {bad!r} (CRC mismatch)")
        unpickler = _DryRunUnpickler(io.BytesIO(archive.read(data_name)), path, allow)
        obj = unpickler.load_object(data_name)
        for key, nbytes in unpickler.storages.items():
            name = records.get(f"{folder}/data/{key}".lower())
            if name is None:
                raise CheckpointReadError(
                    path, f"the zip archive has no record '{folder}/data/{key}'"
                )
            size = archive.getinfo(name).file_size
            if size != nbytes:
                raise CheckpointReadError(
                    path, f"record {name!r} holds {size} bytes, the pickle declares {nbytes}"
                )
    return obj


# ----------------------------------------------------------------------------------------------
# Writing: a state dict as `torch.save` writes it, without torch

# The typed-storage name of each NumPy dtype the writer accepts (the inverse of STORAGE_DTYPES).
_STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
_ARCHIVE = "archive"  # the record folder torch.save uses for a file object
_ALIGNMENT = 64  # torch.save starts every storage record at a multiple of 64 bytes (mmap loads)


def _pickle_str(text: str) -> bytes:
    data = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _pickle_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])  # BININT1
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)  # BININT2
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)  # BININT
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def _pickle_ints(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_pickle_int(v) for v in values) + b"t"  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode("ascii")  # GLOBAL


def _state_dict_pickle(tensors: dict[str, np.ndarray]) -> bytes:
    """`data.pkl` of a state dict: protocol 2, as torch.save writes it (no memo, no metadata).

    OrderedDict(key -> torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False,
    OrderedDict())), storage = persistent id ("storage", torch.<Type>Storage, "<n>", "cpu", numel).
    """
    ordered_dict = _global("collections", "OrderedDict") + b")R"  # OrderedDict()
    out = [b"\x80\x02", ordered_dict]
    for n, (key, array) in enumerate(tensors.items()):
        strides = tuple(int(np.prod(array.shape[i + 1 :])) for i in range(array.ndim))  # C order
        storage = (
            b"(" + _pickle_str("storage") + _global("torch", _STORAGE_NAMES[array.dtype])
            + _pickle_str(str(n)) + _pickle_str("cpu") + _pickle_int(array.size) + b"tQ"
        )  # fmt: skip
        tensor = (
            _global("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + _pickle_int(0)
            + _pickle_ints(array.shape) + _pickle_ints(strides) + b"\x89" + ordered_dict + b"tR"
        )  # fmt: skip
        out += [b"(", _pickle_str(key), tensor, b"u"]  # MARK key value SETITEMS
    out.append(b".")
    return b"".join(out)


def _aligned_record(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    """Stores `data` uncompressed with its bytes starting at a multiple of `_ALIGNMENT`."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    start = archive.fp.tell() + 30 + len(name.encode("utf-8")) + 4  # local header + extra head
    pad = -start % _ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad  # torch.save's padding field
    archive.writestr(info, data)


def write_state_dict(tensors: dict[str, np.ndarray], file) -> None:
    """Writes a state dict in `torch.save`'s zip format, without torch.

    `torch.load(file, weights_only=True)` returns an `OrderedDict` of CPU tensors (an
    `nn.Module.load_state_dict` input) and `load_state_dict` above reads it back bit for bit.

    Args:
        tensors: name -> array; dtypes of `STORAGE_DTYPES` (float32, int64, ...), any shape
            (0-d included). Non-contiguous arrays are written as C-contiguous copies.
        file: a path or a binary file object open for writing (seekable).

    Raises:
        TypeError: a key that is not a string, or a dtype torch has no storage type for.
    """
    arrays = {}
    for key, value in tensors.items():
        array = np.asarray(value)
        array = array if array.flags.c_contiguous else array.copy(order="C")  # 0-d stays 0-d
        if not isinstance(key, str):
            raise TypeError(f"state dict keys are strings, got {key!r}")
        if array.dtype not in _STORAGE_NAMES:
            raise TypeError(f"{key}: no torch storage type for dtype {array.dtype}")
        arrays[key] = array.astype(array.dtype.newbyteorder("<"), copy=False)
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        _aligned_record(archive, f"{_ARCHIVE}/data.pkl", _state_dict_pickle(arrays))
        _aligned_record(archive, f"{_ARCHIVE}/.format_version", b"1")
        _aligned_record(archive, f"{_ARCHIVE}/.storage_alignment", str(_ALIGNMENT).encode())
        _aligned_record(archive, f"{_ARCHIVE}/byteorder", b"little")
        for n, array in enumerate(arrays.values()):
            _aligned_record(archive, f"{_ARCHIVE}/data/{n}", array.tobytes())
        _aligned_record(archive, f"{_ARCHIVE}/version", b"3\n")

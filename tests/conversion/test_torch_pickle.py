"""The torch-free checkpoint reader: bit-exact against torch.load, refuses code, one-line errors.

Every file is written by `torch.save` (or by hand, opcode by opcode, where torch would not write
it) and read back both by `amsam_jax.conversion.torch_pickle` and by
`torch.load(weights_only=True)`.
"""

import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from amsam_jax.conversion.torch_pickle import (
    CheckpointReadError,
    UnpicklingRefused,
    load_checkpoint,
    load_state_dict,
)

ROOT = Path(__file__).resolve().parents[2]
NUMPY_DTYPES = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
    torch.int64: np.dtype(np.int64),
    torch.int32: np.dtype(np.int32),
    torch.int16: np.dtype(np.int16),
    torch.int8: np.dtype(np.int8),
    torch.uint8: np.dtype(np.uint8),
    torch.bool: np.dtype(np.bool_),
    # written through `_rebuild_tensor_v3` on an untyped storage
    torch.uint16: np.dtype(np.uint16),
    torch.uint32: np.dtype(np.uint32),
    torch.uint64: np.dtype(np.uint64),
    torch.float8_e4m3fn: np.dtype(ml_dtypes.float8_e4m3fn),
    torch.float8_e5m2: np.dtype(ml_dtypes.float8_e5m2),
}
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _sample(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    """Random bit patterns of `dtype` (floats get NaN, infinities and -0.0 too)."""
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point and dtype.itemsize >= 2:
        t = torch.randn(shape, generator=gen).to(dtype)
        t.view(-1)[:3] = torch.tensor([float("nan"), float("-inf"), -0.0]).to(dtype)
        return t
    bits = _SAME_SIZE_INT[dtype.itemsize]
    info = torch.iinfo(bits)
    raw = torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(bits)
    return raw.view(dtype)  # every bit pattern, float8 NaNs included


def _save(tmp_path: Path, obj, name: str = "ckpt.pth", **kwargs) -> Path:
    path = tmp_path / name
    torch.save(obj, path, **kwargs)
    return path


def assert_bitwise(ours, ref: torch.Tensor) -> None:
    """Same dtype, shape and bytes as the tensor torch loaded; an array of its own."""
    assert isinstance(ours, np.ndarray)
    assert ours.dtype == NUMPY_DTYPES[ref.dtype]
    assert ours.shape == tuple(ref.shape)
    ref_bytes = ref.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert ours.tobytes() == ref_bytes
    assert ours.base is None and ours.flags.writeable and ours.flags.c_contiguous


def assert_same_tree(ours, ref) -> None:
    if isinstance(ref, torch.Tensor):
        assert_bitwise(ours, ref)
    elif isinstance(ref, dict):
        assert type(ours) is type(ref) and list(ours) == list(ref)
        for key in ref:
            assert_same_tree(ours[key], ref[key])
    elif isinstance(ref, list | tuple):
        assert type(ours) is type(ref) and len(ours) == len(ref)
        for a, b in zip(ours, ref, strict=True):
            assert_same_tree(a, b)
    else:
        assert type(ours) is type(ref) and ours == ref


def assert_reads_like_torch(path: Path):
    ours = load_checkpoint(path)
    assert_same_tree(ours, torch.load(path, weights_only=True))
    return ours


# --- hand-written pickles: the opcodes torch.save writes (pickletools.dis of a data.pkl) ---


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()  # the protocol 0-2 GLOBAL opcode


def _str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _call(func: bytes, *args: bytes) -> bytes:
    return func + _tuple(*args) + b"R"


def _tensor(key: str, numel: int, offset: int, size, stride, storage="FloatStorage") -> bytes:
    pid = _tuple(_str("storage"), _global("torch", storage), _str(key), _str("cpu"), _int(numel))
    return _call(
        _global("torch._utils", "_rebuild_tensor_v2"),
        pid + b"Q",  # BINPERSID
        _int(offset),
        _tuple(*map(_int, size)),
        _tuple(*map(_int, stride)),
        b"\x89",  # False: requires_grad
        _call(_global("collections", "OrderedDict")),
    )


def _dict_pickle(**items: bytes) -> bytes:
    return b"\x80\x02}(" + b"".join(_str(k) + v for k, v in items.items()) + b"u."


def _archive(path: Path, data_pkl: bytes, records: dict, folder: str = "archive") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{folder}/data.pkl", data_pkl)
        z.writestr(f"{folder}/byteorder", "little")
        for key, data in records.items():
            z.writestr(f"{folder}/data/{key}", data)
        z.writestr(f"{folder}/version", "3\n")
    return path


def _replace_records(src: Path, dst: Path, change) -> Path:
    """A copy of the zip `src` whose records are `change(name, data)` (None drops one)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info, data)
    return dst


def assert_one_line_error(excinfo, path: Path, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    for needle in needles:
        assert needle in message
    return message


# --- what torch writes, read back bit for bit ---


def test_hand_written_archive_reads_the_same_in_torch_and_here(tmp_path):
    data = np.arange(6, dtype=np.float32).tobytes()
    pkl = _dict_pickle(w=_tensor("0", 6, 1, (2, 2), (1, 2)))
    assert_reads_like_torch(_archive(tmp_path / "hand.pth", pkl, {"0": data}))


@pytest.mark.parametrize("dtype", list(NUMPY_DTYPES), ids=str)
def test_each_dtype_is_bitwise_what_torch_loads(tmp_path, dtype):
    ours = assert_reads_like_torch(_save(tmp_path, {"t": _sample(dtype)}))
    assert ours["t"].dtype == NUMPY_DTYPES[dtype]


def test_non_contiguous_views_keep_their_strides_and_offsets(tmp_path):
    x = torch.arange(60.0).reshape(3, 4, 5)
    views = {
        "transpose": x[0].t(),
        "permute": x.permute(2, 0, 1),
        "step_slice": x[:, 1::2, ::3],
        "offset_row": x[2, 1],
        "broadcast": torch.arange(4.0).reshape(1, 4).expand(3, 4),  # stride 0
    }
    assert not any(v.is_contiguous() for k, v in views.items() if k != "offset_row")
    assert_reads_like_torch(_save(tmp_path, views))


def test_tensors_sharing_one_storage_come_out_as_separate_copies(tmp_path):
    base = torch.arange(20, dtype=torch.int32)
    path = _save(tmp_path, {"head": base[2:7], "tail": base[10:].view(2, 5), "all": base})
    with zipfile.ZipFile(path) as z:
        assert sum("/data/" in n for n in z.namelist()) == 1  # one storage record for all three
    ours = assert_reads_like_torch(path)
    ours["head"][0] = -1
    assert ours["all"][2] == 2  # no aliasing between the returned arrays


def test_zero_d_and_empty_tensors(tmp_path):
    obj = {
        "scalar": torch.tensor(3.5),
        "int_scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0),
        "empty_2d": torch.zeros(3, 0, dtype=torch.bfloat16),
        "empty_view": torch.arange(10.0)[5:5],
    }
    assert_reads_like_torch(_save(tmp_path, obj))


def test_a_million_floats(tmp_path):
    t = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(1))
    assert_reads_like_torch(_save(tmp_path, {"big": t}))


def test_state_dict_nested_under_model_with_metadata(tmp_path):
    sd = OrderedDict(w=torch.randn(4, 3), b=torch.zeros(4, dtype=torch.float16))
    obj = {"model": sd, "epoch": 3, "lr": 0.5, "name": "sam", "none": None, "hist": [1, (2, 3.0)]}
    path = _save(tmp_path, obj)
    ours = assert_reads_like_torch(path)
    assert isinstance(ours["model"], OrderedDict)
    state = load_state_dict(path)
    assert type(state) is dict and list(state) == ["w", "b"]
    for key, tensor in sd.items():
        assert_bitwise(state[key], tensor)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "module"])
def test_state_dict_is_found_under_each_common_key(tmp_path, key):
    path = _save(tmp_path, {"step": 10, key: {"w": torch.ones(2)}})
    assert list(load_state_dict(path)) == ["w"]


def test_module_state_dict_with_batchnorm_counter(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    net(torch.randn(2, 3, 8, 8))  # training mode: running stats and num_batches_tracked move
    sd = net.state_dict()
    path = _save(tmp_path, sd)
    assert_reads_like_torch(path)
    state = load_state_dict(path)
    assert list(state) == list(sd)
    for key, tensor in sd.items():
        assert_bitwise(state[key], tensor)
    assert state["1.num_batches_tracked"].dtype == np.int64 and state["1.num_batches_tracked"] == 1


def test_parameters_and_tensors_with_python_state(tmp_path):
    plain = torch.nn.Parameter(torch.randn(3))
    frozen = torch.nn.Parameter(torch.randn(2, 2), requires_grad=False)
    with_state = torch.nn.Parameter(torch.randn(2))
    with_state.note = "extra"  # saved through _rebuild_parameter_with_state
    tagged = torch.randn(4)
    tagged.note = "extra"  # saved through torch._tensor._rebuild_from_type_v2
    path = _save(tmp_path, {"p": plain, "f": frozen, "s": with_state, "t": tagged})
    with zipfile.ZipFile(path) as z:
        pkl = z.read("ckpt/data.pkl")
    assert b"_rebuild_parameter_with_state" in pkl and b"_rebuild_from_type_v2" in pkl
    state = load_state_dict(path)
    for key, tensor in {"p": plain, "f": frozen, "s": with_state, "t": tagged}.items():
        assert_bitwise(state[key], tensor.detach())


def test_archive_folder_name_is_found_from_data_pkl(tmp_path):
    path = _save(tmp_path, {"w": torch.randn(3)})
    renamed = tmp_path / "renamed.pth"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(renamed, "w") as zout:
        for info in zin.infolist():
            zout.writestr("anything_else/" + info.filename.split("/", 1)[1], zin.read(info))
    assert_reads_like_torch(renamed)


def test_big_endian_archive_is_byteswapped_as_torch_does(tmp_path):
    obj = {"f": _sample(torch.float32), "i": _sample(torch.int16), "b": _sample(torch.bfloat16)}
    path = _save(tmp_path, obj)
    itemsize = {"0": 4, "1": 2, "2": 2}  # storage keys in the order torch met them

    def to_big_endian(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        key = name.rsplit("/", 1)[1]
        if "/data/" in name:
            return np.frombuffer(data, f"<u{itemsize[key]}").astype(f">u{itemsize[key]}").tobytes()
        return data

    big = _replace_records(path, tmp_path / "big.pth", to_big_endian)
    ours = assert_reads_like_torch(big)
    for key, tensor in obj.items():
        assert_bitwise(ours[key], tensor)


# --- the legacy (pre-1.6) format is read too ---


def test_legacy_format_matches_torch(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    obj = {
        "model": OrderedDict(w=base.t(), row=base[1], bf=_sample(torch.bfloat16)),
        "i8": _sample(torch.int8),
        "flag": _sample(torch.bool),
        "p": torch.nn.Parameter(torch.randn(2)),
        "epoch": 2,
    }
    path = _save(tmp_path, obj, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    assert_reads_like_torch(path)
    assert list(load_state_dict(path)) == ["w", "row", "bf"]


def test_legacy_truncated_file_is_an_error(tmp_path):
    path = _save(tmp_path, {"w": torch.randn(100)}, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointReadError) as excinfo:
        load_checkpoint(path)
    assert_one_line_error(excinfo, path, "truncated")


def test_legacy_big_endian_header_is_refused(tmp_path):
    path = tmp_path / "big_legacy.pth"
    header = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": False}]
    path.write_bytes(b"".join(pickle.dumps(x, protocol=2) for x in header))
    with pytest.raises(CheckpointReadError) as excinfo:
        load_checkpoint(path)
    assert_one_line_error(excinfo, path, "big-endian", "re-save")


# --- code in the pickle is refused, never run ---


class _RunsShell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _evil_archive(tmp_path: Path, data_pkl: bytes) -> Path:
    """A valid torch.save zip whose data.pkl is replaced by `data_pkl`."""
    path = _save(tmp_path, {"w": torch.ones(2)}, name="evil.pth")
    return _replace_records(
        path,
        tmp_path / "evil_zip.pth",
        lambda name, data: data_pkl if name.endswith("/data.pkl") else data,
    )


def _payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """Pickles that would create `marker`, by name, with the global each one must be refused at."""
    touch = _str(f"touch {marker}")
    write = _str(f"open({str(marker)!r}, 'w').close()")
    payloads = {
        f"reduce_protocol_{p}": (
            pickle.dumps({"w": _RunsShell(f"touch {marker}")}, protocol=p),
            "posix.system",
        )
        for p in (0, 2, 4)
    }
    # hand-written GLOBAL + REDUCE opcodes, as protocol 2 writes them
    for name, module, func, arg in [
        ("hand_os_system", "os", "system", touch),
        ("hand_builtins_exec", "builtins", "exec", write),
        ("hand_py2_builtin_eval", "__builtin__", "eval", write),
    ]:
        payloads[name] = (_dict_pickle(w=_call(_global(module, func), arg)), f"{module}.{func}")
    rebuild = _global("torch._utils", "_rebuild_tensor_v2")  # allowed, but its argument is not
    payloads["inside_tensor_args"] = (
        _dict_pickle(w=_call(rebuild, _call(_global("posix", "system"), touch))),
        "posix.system",
    )
    return payloads


@pytest.mark.parametrize("payload", list(_payloads(Path("m"))))
def test_code_in_the_pickle_is_refused_and_not_run(tmp_path, payload):
    marker = tmp_path / "MARKER"
    data_pkl, refused = _payloads(marker)[payload]
    path = _evil_archive(tmp_path, data_pkl)
    with pytest.raises(UnpicklingRefused) as excinfo:
        load_checkpoint(path)
    message = assert_one_line_error(excinfo, path)
    assert message == (
        f"{path}: refuses to load {refused!r} from the pickle "
        "(a checkpoint carrying code is never executed)"
    )
    assert excinfo.value.global_name == refused
    assert not marker.exists()


def test_the_payload_is_live_under_plain_pickle(tmp_path):
    marker = tmp_path / "CONTROL"
    pickle.loads(
        _payloads(marker)["hand_os_system"][0]
    )  # what torch.load(weights_only=False) would do
    assert marker.exists()


def test_numpy_arrays_and_whole_modules_are_refused(tmp_path):
    np_pickle = pickle.dumps({"w": np.zeros(2)}, protocol=2)
    with pytest.raises(UnpicklingRefused, match=r"'numpy\.(_)?core\.multiarray\._reconstruct'"):
        load_checkpoint(_evil_archive(tmp_path, np_pickle))
    for zip_format in (True, False):
        module = _save(
            tmp_path, torch.nn.Linear(2, 2), "module.pth", _use_new_zipfile_serialization=zip_format
        )
        with pytest.raises(UnpicklingRefused, match=r"'torch\.nn\.modules\.linear\.Linear'"):
            load_checkpoint(module)


def test_plain_pickle_file_is_not_a_checkpoint_and_is_not_run(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(_RunsShell(f"touch {marker}"), protocol=2))
    with pytest.raises(CheckpointReadError) as excinfo:
        load_checkpoint(path)
    assert_one_line_error(excinfo, path, "a plain pickle")
    assert not marker.exists()


# --- every other bad file: one line naming it ---


def test_truncated_zip(tmp_path):
    path = _save(tmp_path, {"w": torch.randn(1000)})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointReadError) as excinfo:
        load_checkpoint(path)
    assert_one_line_error(excinfo, path, "truncated or corrupt zip archive")


def test_corrupt_storage_record_fails_its_crc(tmp_path):
    path = _save(tmp_path, {"w": torch.full((64,), 1.2345)})
    data = bytearray(path.read_bytes())
    at = data.find(np.float32(1.2345).tobytes() * 4)
    data[at + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointReadError) as excinfo:
        load_checkpoint(path)
    assert_one_line_error(excinfo, path, "corrupt zip record 'ckpt/data/0'")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (np.random.default_rng(0).integers(1, 127, 4096, dtype=np.uint8).tobytes(), "not a torch"),
        (b"", "an empty file"),
        (b"PK\x03\x04" + bytes(100), "truncated or corrupt zip archive"),
    ],
    ids=["random_bytes", "empty", "zip_magic_only"],
)
def test_files_that_are_not_checkpoints(tmp_path, content, needle):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointReadError) as excinfo:
        load_checkpoint(path)
    assert_one_line_error(excinfo, path, needle)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointReadError) as excinfo:
        load_state_dict(tmp_path / "absent.pth")
    assert_one_line_error(excinfo, tmp_path / "absent.pth", "no such file")
    with pytest.raises(CheckpointReadError) as excinfo:
        load_state_dict(tmp_path)
    assert_one_line_error(excinfo, tmp_path, "is a directory")


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointReadError) as excinfo:
        load_checkpoint(path)
    assert_one_line_error(excinfo, path, "no data.pkl")


def test_torchscript_archive_is_named(tmp_path):
    # torch.jit.save's layout (deprecated API, so written by hand): data.pkl beside constants.pkl
    module = _call(_global("__torch__.torch.nn.modules.linear", "Linear"))
    path = _archive(tmp_path / "scripted.pt", b"\x80\x02" + module + b".", {})
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("archive/code/__torch__/torch/nn/modules/linear.py", "")
    with pytest.raises(CheckpointReadError) as excinfo:
        load_checkpoint(path)
    assert_one_line_error(excinfo, path, "TorchScript")


def test_missing_and_short_storage_records(tmp_path):
    pkl = _dict_pickle(w=_tensor("0", 4, 0, (4,), (1,)))
    missing = _archive(tmp_path / "missing.pth", pkl, {})
    with pytest.raises(CheckpointReadError) as excinfo:
        load_checkpoint(missing)
    assert_one_line_error(excinfo, missing, "no record 'archive/data/0'")
    short = _archive(tmp_path / "short.pth", pkl, {"0": bytes(12)})
    with pytest.raises(CheckpointReadError) as excinfo:
        load_checkpoint(short)
    assert_one_line_error(excinfo, short, "holds 12 bytes, the pickle declares 16")


@pytest.mark.parametrize(
    ("offset", "size", "stride"),
    [(0, (5,), (1,)), (3, (2,), (1,)), (0, (2, 2), (3, 1)), (4, (), ())],
    ids=["too_long", "offset_past_end", "stride_past_end", "scalar_past_end"],
)
def test_sizes_that_do_not_fit_the_storage(tmp_path, offset, size, stride):
    pkl = _dict_pickle(w=_tensor("0", 4, offset, size, stride))
    path = _archive(tmp_path / "overrun.pth", pkl, {"0": bytes(16)})
    with pytest.raises(CheckpointReadError) as excinfo:
        load_checkpoint(path)
    assert_one_line_error(excinfo, path, "does not fit storage '0' of 4 float32 items")


@pytest.mark.parametrize(
    ("dtype", "name"),
    [
        (torch.complex64, "torch.ComplexFloatStorage"),
        (torch.float8_e4m3fnuz, "torch.float8_e4m3fnuz"),
    ],
)
def test_unsupported_dtypes(tmp_path, dtype, name):
    path = _save(tmp_path, {"w": torch.zeros(3, dtype=dtype)})
    with pytest.raises(CheckpointReadError) as excinfo:
        load_checkpoint(path)
    assert not isinstance(excinfo.value, UnpicklingRefused)
    assert_one_line_error(excinfo, path, f"unsupported dtype '{name}'")


def test_negative_bit_view_is_refused(tmp_path):
    path = _save(tmp_path, {"w": torch.arange(3.0)._neg_view()})
    with pytest.raises(CheckpointReadError) as excinfo:
        load_checkpoint(path)
    assert_one_line_error(excinfo, path, "unsupported tensor metadata ['neg']")


def test_state_dict_with_non_tensor_entries_names_them(tmp_path):
    path = _save(tmp_path, {"w": torch.ones(2), "step": 3, "name": "x"})
    with pytest.raises(CheckpointReadError) as excinfo:
        load_state_dict(path)
    assert_one_line_error(excinfo, path, "not tensors: step, name")
    assert load_checkpoint(path)["step"] == 3  # the whole object is still readable


@pytest.mark.parametrize(
    ("obj", "needle"),
    [([torch.ones(2)], "holds a list"), ({}, "empty state dict"), ({"model": {}}, "empty")],
)
def test_objects_without_a_state_dict(tmp_path, obj, needle):
    path = _save(tmp_path, obj)
    with pytest.raises(CheckpointReadError) as excinfo:
        load_state_dict(path)
    assert_one_line_error(excinfo, path, needle)


def test_import_does_not_import_torch():
    code = "import sys; import amsam_jax.conversion.torch_pickle; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)


def test_reads_from_bytes_written_in_memory_too(tmp_path):
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buffer)
    path = tmp_path / "from_buffer.pth"
    path.write_bytes(buffer.getvalue())  # the folder inside the zip is then "archive"
    assert_reads_like_torch(path)

"""Hostile inputs to `python -m weights_conversion`: each fails with one line and leaves nothing.

Every case runs `weights_conversion.__main__.main` in this process and asserts exit 2 (130 for
Ctrl-C), one `error:` line naming the file or setting at fault, no traceback, and no output or
temporary file. The SAM checkpoints are written by hand in the `torch.save` zip format (no torch):
a TinyViT SAM of 165k parameters and a one-block ViT-B; code-carrying files would create a marker
file if anything ran them.
"""

import errno
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from hostile import fails_cleanly

from amsam_jax.build_sam import SamConfig
from amsam_jax.checkpoint import CONFIG_FILE, abstract_state, load_sam, read_sam_config
from amsam_jax.conversion import convert_sam
from amsam_jax.conversion.mapping import Transform, target_of
from weights_conversion.__main__ import main

# A LiteMedSAM-shaped TinyViT (1x1 patch embedding, 512 px) small enough to convert in a second,
# and a one-block ViT-B at 256 px (the ViT path: patch size 16).
TINY = SamConfig.litemedsam(
    image_size=512,
    tiny_vit_embed_dims=(16, 32, 48, 64),
    tiny_vit_depths=(1, 1, 1, 1),
    tiny_vit_num_heads=(2, 2, 3, 4),
    tiny_vit_window_sizes=(7, 7, 7, 7),
    tiny_vit_merge_strides=(2, 2, 2),
    prompt_embed_dim=32,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
)
VIT = SamConfig.vit_b(encoder_depth=1, encoder_global_attn_indexes=(), image_size=256)
# Torch nn.Sequential indices of the NNX lists that skip the parameter-free entries.
SEQUENTIAL_INDEX = {
    "mask_downscaling": {0: 0, 1: 1, 2: 3, 3: 4, 4: 6},
    "output_upscaling": {0: 0, 1: 1, 2: 3},
    "seq": {0: 0, 1: 2},
}


def torch_shapes(cfg: SamConfig) -> dict[str, tuple[int, ...]]:
    """The official state dict's keys and shapes for `cfg`: mapping.py read backwards."""
    shapes = {}
    for path, var in nnx.to_flat_state(abstract_state(cfg)):
        dotted = ".".join(map(str, path))
        if dotted in ("pixel_mean", "pixel_std") or dotted.startswith("prompt_encoder.task_"):
            continue  # non-persistent torch buffers; the SUM task table is not in SAM files
        parts = [str(p) for p in path]
        for i in range(1, len(parts)):
            table = SEQUENTIAL_INDEX.get(parts[i - 1])
            if table and parts[i].isdigit():
                parts[i] = str(table[int(parts[i])])
        parts[-1] = {"kernel": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
        key = ".".join(parts)
        nnx_path, transform = target_of(key)
        assert nnx_path == dotted, (key, nnx_path, dotted)
        shape = tuple(var.shape)
        if transform is Transform.LINEAR:
            shape = shape[::-1]
        elif transform is Transform.CONV:
            shape = (shape[3], shape[2], shape[0], shape[1])
        shapes[key] = shape
    return shapes


# --- torch.save's zip format, opcode by opcode (pickle protocol 2, as torch writes it) ---


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _call(func: bytes, *args: bytes) -> bytes:
    return func + _tuple(*args) + b"R"


def _tensor(key: str, shape: tuple[int, ...]) -> bytes:
    numel = int(np.prod(shape))
    stride = [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
    pid = _tuple(_str("storage"), _global("torch", "FloatStorage"), _str(key), _str("cpu"))
    return _call(
        _global("torch._utils", "_rebuild_tensor_v2"),
        pid[:-1] + _int(numel) + b"tQ",  # the persistent id, BINPERSID
        _int(0),
        _tuple(*map(_int, shape)),
        _tuple(*map(_int, stride)),
        b"\x89",  # requires_grad False
        _call(_global("collections", "OrderedDict")),
    )


def write_torch_zip(path: Path, data_pkl: bytes, records: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


def write_state_dict(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> Path:
    """A `torch.save({key: float32 tensor})` file of random values, written without torch."""
    rng = np.random.default_rng(seed)
    items, records = [], {}
    for i, (key, shape) in enumerate(shapes.items()):
        items.append(_str(key) + _tensor(str(i), shape))
        records[str(i)] = (0.02 * rng.standard_normal(shape)).astype("<f4").tobytes()
    return write_torch_zip(path, b"\x80\x02}(" + b"".join(items) + b"u.", records)


class _RunsShell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def evil_zip(path: Path, marker: Path, entry: str = "model") -> Path:
    """A zip torch.save file whose pickle runs `touch marker` (pickle.dumps, protocol 2)."""
    data_pkl = pickle.dumps({entry: _RunsShell(f"touch {marker}")}, protocol=2)
    return write_torch_zip(path, data_pkl, {})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every input file of the cases, written once (the cases never change them)."""
    root = tmp_path_factory.mktemp("inputs")
    marker = root / "MARKER"
    tiny, vit = torch_shapes(TINY), torch_shapes(VIT)
    out = {
        "marker": marker,
        "tiny": write_state_dict(root / "tiny.pth", tiny),
        "vit": write_state_dict(root / "vit.pth", vit),
        "extra_key": write_state_dict(
            root / "extra.pth", {**tiny, "image_encoder.lora_A": (4, 16)}
        ),
        "missing_key": write_state_dict(
            root / "missing.pth", {k: v for k, v in tiny.items() if not k.endswith("norm3.bias")}
        ),
        "wrong_shape": write_state_dict(
            root / "shape.pth", {**tiny, "mask_decoder.iou_token.weight": (1, 31)}
        ),
        "not_sam": write_state_dict(root / "not_sam.pth", {"w": (2, 3)}),
        "evil": evil_zip(root / "evil.pth", marker, entry="w"),
        "empty": root / "empty.pth",
        "garbage": root / "garbage.pth",
        "plain_pickle": root / "plain.pth",
        "other_zip": root / "other.pth",
        "truncated": root / "truncated.pth",
        "folder": root / "folder.pth",
        "a_file": root / "a_file",
    }
    out["empty"].write_bytes(b"")
    out["garbage"].write_bytes(np.random.default_rng(1).integers(1, 127, 4096, np.uint8).tobytes())
    out["plain_pickle"].write_bytes(pickle.dumps(_RunsShell(f"touch {marker}"), protocol=2))
    with zipfile.ZipFile(out["other_zip"], "w") as z:
        z.writestr("docs/readme.txt", "not a checkpoint")
    data = out["tiny"].read_bytes()
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["folder"].mkdir()
    out["a_file"].write_text("a regular file")
    return out


def test_the_hand_written_checkpoints_convert_and_load_as_their_configs(files, tmp_path, capsys):
    for name, cfg in (("tiny", TINY), ("vit", VIT)):
        out = tmp_path / name
        assert main(["sam", str(files[name]), str(out)]) == 0, capsys.readouterr().err
        sam = load_sam(out)
        assert sam is not None and (out / CONFIG_FILE).is_file()
        assert read_sam_config(out)[0] == cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "vit"]


# (argv after `sam`, with {tiny}, {vit}, ... for files and {out} for the output; the strings
# the error must name, with the same placeholders)
SAM_CASES = {
    "image_size_zero": (["{tiny}", "{out}", "--image-size", "0"], ["--image-size", "0"]),
    "image_size_negative": (["{vit}", "{out}", "--image-size", "-16"], ["--image-size", "-16"]),
    "image_size_not_a_multiple_of_16": (
        ["{vit}", "{out}", "--image-size", "250"],
        ["--image-size 250", "multiple of 16"],
    ),
    "image_size_above_the_checkpoint": (
        ["{vit}", "{out}", "--image-size", "512"],
        ["--image-size 512", "at most 256"],
    ),
    "image_size_of_a_tiny_vit": (["{tiny}", "{out}", "--image-size", "256"], ["512 px only"]),
    "image_size_not_a_number": (["{tiny}", "{out}", "--image-size", "big"], ["--image-size"]),
    "num_mask_tokens_zero": (["{tiny}", "{out}", "--num-mask-tokens", "0"], ["--num-mask-tokens"]),
    "num_mask_tokens_negative": (
        ["{vit}", "{out}", "--num-mask-tokens", "-2"],
        ["--num-mask-tokens", "-2"],
    ),
    "unknown_model_type": (["{tiny}", "{out}", "--model-type", "vit_x"], ["--model-type"]),
    "other_model_type": (["{tiny}", "{out}", "--model-type", "vit_b"], ["{tiny}", "vit_b"]),
    "unknown_pretrained_name": (["sam_vit_x", "{out}"], ["sam_vit_x", "pretrained name"]),
    "missing_file": (["{dir}/absent.pth", "{out}"], ["{dir}/absent.pth", "no such file"]),
    "directory_as_checkpoint": (["{folder}", "{out}"], ["{folder}", "is a directory"]),
    "empty_file": (["{empty}", "{out}"], ["{empty}", "an empty file"]),
    "random_bytes": (["{garbage}", "{out}"], ["{garbage}", "not a torch.save file"]),
    "plain_pickle": (["{plain_pickle}", "{out}"], ["{plain_pickle}", "a plain pickle"]),
    "zip_that_is_not_a_checkpoint": (["{other_zip}", "{out}"], ["{other_zip}", "data.pkl"]),
    "truncated_checkpoint": (["{truncated}", "{out}"], ["{truncated}", "truncated or corrupt"]),
    "code_in_the_pickle": (["{evil}", "{out}"], ["{evil}", "posix.system"]),
    "unexpected_key": (["{extra_key}", "{out}"], ["{extra_key}", "unmapped source key"]),
    "missing_key": (["{missing_key}", "{out}"], ["{missing_key}", "norm3.bias", "no source key"]),
    "shape_mismatch": (["{wrong_shape}", "{out}"], ["{wrong_shape}", "iou_token.weight"]),
    "not_a_sam_checkpoint": (["{not_sam}", "{out}"], ["{not_sam}", "not a SAM checkpoint"]),
    "output_exists": (["{tiny}", "{existing}"], ["{existing}", "--overwrite"]),
    "output_is_a_file": (["{tiny}", "{a_file}", "--overwrite"], ["{a_file}", "not a folder"]),
    "output_under_a_file": (["{tiny}", "{a_file}/sub/out"], ["{a_file}", "not a folder"]),
    "no_arguments": ([], ["required"]),
}


@pytest.mark.parametrize("case", list(SAM_CASES))
def test_sam_conversion_fails_cleanly(case, files, tmp_path, capsys):
    argv, names = SAM_CASES[case]
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("mine")
    places = {k: str(v) for k, v in files.items()}
    places |= {"out": str(tmp_path / "new" / "out"), "existing": str(tmp_path / "existing")}
    places["dir"] = str(tmp_path)
    fill = [a.format(**places) for a in argv]
    fails_cleanly(
        main,
        ["sam", *fill],
        capsys,
        names=[n.format(**places) for n in names],
        watch=[tmp_path, files["tiny"].parent],
    )
    assert not files["marker"].exists()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or ".old-" in p.name)


def _raise_after_params(error: BaseException):
    """A config.json writer that fails once the params are written (a mid-conversion fault)."""

    def write_json(path, data, indent=2):
        assert (Path(path).parent / "params").is_dir()
        raise error

    return write_json


def _partial_params(error: BaseException):
    """A params writer that writes part of its output, then fails."""

    def save_params(path, nested):
        Path(path).mkdir()
        (Path(path) / "half.bin").write_bytes(b"\0" * 1000)
        raise error

    return save_params


WRITE_FAULTS = {
    "disk_full_writing_params": ("save_params", _partial_params, errno.ENOSPC, 2),
    "disk_full_writing_config": ("write_json", _raise_after_params, errno.ENOSPC, 2),
    "read_only_folder": ("save_params", _partial_params, errno.EROFS, 2),
    "interrupted_writing_params": ("save_params", _partial_params, None, 130),
    "interrupted_writing_config": ("write_json", _raise_after_params, None, 130),
}


@pytest.mark.parametrize("case", list(WRITE_FAULTS))
@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_a_failed_write_leaves_no_output_and_no_temporary(
    case, overwrite, files, tmp_path, capsys, monkeypatch
):
    writer, fault, code, exit_code = WRITE_FAULTS[case]
    error = KeyboardInterrupt() if code is None else OSError(code, os.strerror(code))
    monkeypatch.setattr(convert_sam, writer, fault(error))
    out = tmp_path / "deep" / "out"
    if overwrite:
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("the previous conversion")
    names = ["interrupted"] if code is None else [str(out), os.strerror(code)]
    argv = ["sam", str(files["tiny"]), str(out), *(["--overwrite"] if overwrite else [])]
    fails_cleanly(main, argv, capsys, names=names, watch=[tmp_path], code=exit_code)
    assert not (tmp_path / "deep").exists() or _leftovers(tmp_path / "deep") == []
    if overwrite:
        assert (out / "keep.txt").read_text() == "the previous conversion"


def test_a_read_only_output_folder_is_named(files, tmp_path, capsys):
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes anyway: stand a file where the folder should be
        folder.rmdir()
        folder.write_text("not a folder")
        needle = "not a folder"
    else:
        folder.chmod(0o555)
        needle = "not writable"
    try:
        argv = ["sam", str(files["tiny"]), str(folder / "out")]
        fails_cleanly(main, argv, capsys, names=[str(folder), needle], watch=[tmp_path])
    finally:
        if folder.is_dir():
            folder.chmod(0o755)


def test_a_later_run_removes_stale_temporaries_of_a_killed_one(files, tmp_path, capsys):
    stale = tmp_path / ".out.tmp-killed"
    (stale / "params").mkdir(parents=True)
    (stale / "params" / "half.bin").write_bytes(b"\0" * 10)
    assert main(["sam", str(files["tiny"]), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- the dispatcher ---


@pytest.mark.parametrize("argv", [["convert"], ["--sam"], []], ids=["unknown", "option", "none"])
def test_an_unknown_command_prints_usage_to_stderr(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    commands = ("sam", "yolo", "blo-sam-lora", "export-sam", "export-onnx")
    assert lines[0].startswith(f"usage: python -m weights_conversion {{{','.join(commands)}}}")
    assert lines[-1].startswith("error: ") and f"(one of {', '.join(commands)})" in lines[-1]
    assert (repr(argv[0]) if argv else "no command") in lines[-1]


def test_help_prints_usage_to_stdout(capsys):
    assert main(["--help"]) == 0
    captured = capsys.readouterr()
    assert "usage: python -m weights_conversion" in captured.out and captured.err == ""


# --- YOLO export: code in a .pt or a yaml never runs ---


def _yolo_global_pickle(*opcodes: bytes) -> bytes:
    return b"\x80\x02}(" + _str("model") + b"".join(opcodes) + b"u."


YOLO_CASES = [
    "os_system",
    "builtins_exec",
    "py2_builtin_eval",
    "getattr_of_a_module",
    "getattr_of_a_private_name",
    "ultralytics_function",
    "ultralytics_loader_class",
    "model_class_called_with_arguments",
    "torch_loader",
    "inside_a_tensor",
    "a_state_dict",
    "a_torch_module",
    "empty",
    "not_a_zip",
    "plain",
    "zip_that_is_not_a_checkpoint",
    "case_folded_duplicate_records",
    "torchscript",
    "legacy_format",
    "short_storage",
    "evil_activation",
    "evil_layer",
    "not_a_model",
    "broken_yaml",
    "missing_yaml",
]


def yolo_cases(root: Path, marker: Path) -> dict[str, tuple[Path, list[str]]]:
    """Bad .pt / .yaml files for the YOLO export (`YOLO_CASES`), each with what its error
    must name."""
    touch = _str(f"touch {marker}")
    pickles = {
        "os_system": (pickle.dumps({"model": _RunsShell(f"touch {marker}")}, protocol=2), "posix"),
        "builtins_exec": (
            _yolo_global_pickle(
                _call(_global("builtins", "exec"), _str(f"open({str(marker)!r}, 'w')"))
            ),
            "builtins.exec",
        ),
        "py2_builtin_eval": (
            _yolo_global_pickle(_call(_global("__builtin__", "eval"), _str("1"))),
            "builtins.eval",
        ),
        "getattr_of_a_module": (
            _yolo_global_pickle(
                _call(_global("builtins", "getattr"), _global("os", "system"), _str("x"))
            ),
            "os.system",
        ),
        "getattr_of_a_private_name": (
            _yolo_global_pickle(
                _call(
                    _global("builtins", "getattr"),
                    _global("ultralytics.nn.tasks", "DetectionModel"),
                    _str("__init__"),
                )
            ),
            "getattr",
        ),
        "ultralytics_function": (
            _yolo_global_pickle(_call(_global("ultralytics.nn.tasks", "torch_safe_load"), touch)),
            "ultralytics.nn.tasks.torch_safe_load",
        ),
        "ultralytics_loader_class": (
            _yolo_global_pickle(_call(_global("ultralytics.nn.autobackend", "AutoBackend"), touch)),
            "ultralytics.nn.autobackend.AutoBackend",
        ),
        "model_class_called_with_arguments": (
            _yolo_global_pickle(_call(_global("ultralytics.nn.tasks", "DetectionModel"), touch)),
            "DetectionModel(...)",
        ),
        "torch_loader": (
            _yolo_global_pickle(_call(_global("torch", "load"), touch)),
            "torch.load",
        ),
        "inside_a_tensor": (
            _yolo_global_pickle(
                _call(
                    _global("torch._utils", "_rebuild_tensor_v2"),
                    _call(_global("posix", "system"), touch),
                )
            ),
            "posix.system",
        ),
    }
    cases = {}
    for name, (data_pkl, refused) in pickles.items():
        path = write_torch_zip(root / f"{name}.pt", data_pkl, {})
        cases[name] = (path, [str(path), refused, "--trust-pickle"])
    state_dict = write_state_dict(root / "state_dict.pt", {"w": (2, 2)})
    cases["a_state_dict"] = (state_dict, [str(state_dict), "no 'model' entry"])
    # an allowed torch class rebuilt as torch.save writes modules (NEWOBJ, BUILD): not a YOLO
    linear = _yolo_global_pickle(_global("torch.nn.modules.linear", "Linear") + b")\x81}b")
    path = write_torch_zip(root / "linear.pt", linear, {})
    cases["a_torch_module"] = (path, [str(path), "not an Ultralytics model"])
    for name, source in (("empty", b""), ("not_a_zip", b"\x00" * 64), ("plain", pickle.dumps(1))):
        path = root / f"{name}.pt"
        path.write_bytes(source)
        cases[name] = (path, [str(path), "not a torch.save file"])
    other = root / "other_zip.pt"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("docs/readme.txt", "not a checkpoint")
    cases["zip_that_is_not_a_checkpoint"] = (other, [str(other), "without data.pkl"])
    dupes = root / "duplicate_records.pt"
    with zipfile.ZipFile(dupes, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        z.writestr("archive/DATA.PKL", pickle.dumps({"model": 1}, protocol=2))
    cases["case_folded_duplicate_records"] = (dupes, [str(dupes), "duplicate record names"])
    script = root / "scripted.pt"
    with zipfile.ZipFile(script, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
    cases["torchscript"] = (script, [str(script), "TorchScript"])
    legacy = root / "legacy.pt"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001))
    cases["legacy_format"] = (legacy, [str(legacy), "legacy"])
    short = write_torch_zip(
        root / "short_storage.pt", _yolo_global_pickle(_tensor("0", (4,))), {"0": b"\0" * 8}
    )
    cases["short_storage"] = (short, [str(short), "holds 8 bytes"])
    for name, yaml_text, needle in (
        (
            "evil_activation",
            f"activation: __import__('os').system('touch {marker}')\n",
            "activation",
        ),
        (
            "evil_layer",
            "backbone: [[-1, 1, torch_safe_load, ['x.pt']]]\nhead: []\n",
            "torch_safe_load",
        ),
        ("not_a_model", "just: text\n", "not an Ultralytics model yaml"),
        ("broken_yaml", "backbone: [[-1, 1\n", "model yaml"),
    ):
        path = root / f"{name}.yaml"
        if name == "evil_activation":
            yaml_text += "backbone: [[-1, 1, Conv, [16, 3, 2]]]\nhead: [[-1, 1, Detect, [80]]]\n"
        path.write_text(yaml_text)
        cases[name] = (path, [str(path), needle])
    missing = root / "missing.yaml"
    cases["missing_yaml"] = (missing, [str(missing), "no such file"])
    return cases


@pytest.fixture(scope="module")
def yolo_files(tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("yolo_inputs")
    from yolo_fixtures import ultralytics_offline

    ultralytics_offline(root / "ultralytics_config")
    import ultralytics  # noqa: F401  (writes its settings file now, not inside a watched case)

    cases = yolo_cases(root, root / "MARKER")
    assert list(cases) == YOLO_CASES
    return cases, root


@pytest.mark.needs("ultralytics")
@pytest.mark.parametrize("case", YOLO_CASES)
def test_yolo_export_refuses_without_running_anything(case, yolo_files, tmp_path, capsys):
    cases, root = yolo_files
    path, names = cases[case]
    out = tmp_path / "det" / "yolo.onnx"
    fails_cleanly(main, ["yolo", str(path), str(out)], capsys, names=names, watch=[tmp_path, root])
    assert not (root / "MARKER").exists()


@pytest.mark.needs("ultralytics")
@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["{pt}", "{out}", "--imgsz", "0"], ["--imgsz", "0"]),
        (["{pt}", "{out}", "--imgsz", "100"], ["--imgsz", "100"]),
        (["{pt}", "{out}", "--imgsz", "x"], ["--imgsz"]),
        (["{dir}/absent.pt", "{out}"], ["{dir}/absent.pt", "no such file"]),
        (["{dir}", "{out}"], ["{dir}", "expected an Ultralytics .pt"]),
        (["{folder_pt}", "{out}"], ["{folder_pt}", "is a directory"]),
        (["{dir}/model.onnx", "{out}"], ["model.onnx", "expected an Ultralytics .pt"]),
        (["{pt}", "{dir}"], ["{dir}", "is a directory"]),
        (["{pt}", "{file}/sub/out.onnx"], ["{file}", "not a folder"]),
    ],
    ids=[
        "imgsz_zero",
        "imgsz_not_a_multiple_of_32",
        "imgsz_not_a_number",
        "missing_pt",
        "directory_without_suffix",
        "directory_named_pt",
        "not_a_pt_or_yaml",
        "output_is_a_directory",
        "output_under_a_file",
    ],
)
def test_yolo_arguments_fail_cleanly(argv, names, yolo_files, tmp_path, capsys):
    cases, _ = yolo_files
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "file").write_text("a regular file")
    places = {
        "pt": str(cases["a_state_dict"][0]),
        "out": str(tmp_path / "out.onnx"),
        "dir": str(tmp_path),
        "folder_pt": str(tmp_path / "folder.pt"),
        "file": str(tmp_path / "file"),
    }
    fill = [a.format(**places) for a in argv]
    names = [n.format(**places) for n in names]
    fails_cleanly(main, ["yolo", *fill], capsys, names=names, watch=[tmp_path])


@pytest.mark.needs("ultralytics")
def test_trust_pickle_skips_only_the_allow_list(yolo_files, tmp_path, capsys):
    """A trusted file still gets the format checks (and these fail before any unpickling)."""
    cases, root = yolo_files
    for case in ("a_state_dict", "empty", "torchscript"):
        path, names = cases[case]
        argv = ["yolo", str(path), str(tmp_path / "out.onnx"), "--trust-pickle"]
        fails_cleanly(main, argv, capsys, names=names, watch=[tmp_path, root])


@pytest.mark.needs("ultralytics")
def test_with_trust_pickle_the_payload_does_run(yolo_files, tmp_path, capsys):
    """The control: what the check refused is live code, and --trust-pickle hands it over."""
    cases, root = yolo_files
    marker = root / "MARKER"
    path, _ = cases["os_system"]
    argv = ["yolo", str(path), str(tmp_path / "out.onnx"), "--trust-pickle"]
    try:
        fails_cleanly(main, argv, capsys, names=[str(path), "Ultralytics cannot load it"])
        assert marker.exists()  # os.system ran inside Ultralytics' torch.load
    finally:
        marker.unlink(missing_ok=True)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_a_real_untrained_yolov8n_passes_the_check_and_exports(tmp_path, capsys):
    """The allow-list accepts what Ultralytics writes: `tests/yolo_fixtures.py`'s checkpoint."""
    from yolo_fixtures import export_untrained_yolov8n, ultralytics_offline

    from weights_conversion.convert_yolo import check_checkpoint

    ultralytics_offline(tmp_path / "ultralytics_config")
    onnx = export_untrained_yolov8n(tmp_path / "yolo")
    pt = tmp_path / "yolo" / "yolov8n_untrained.pt"
    check_checkpoint(pt, pt)  # no error: nothing outside the allow-list
    assert onnx.is_file()
    assert _leftovers(onnx.parent) == []


# --- BLO-SAM LoRA import reads a .pth too ---


def test_blo_sam_lora_import_refuses_code_without_running_it(files, tmp_path, capsys):
    argv = [
        "blo-sam-lora",
        "import",
        "--workdir",
        str(tmp_path / "run"),
        "--input",
        str(files["evil"]),
    ]
    fails_cleanly(main, argv, capsys, names=[str(files["evil"]), "posix.system"], watch=[tmp_path])
    assert not files["marker"].exists()


@pytest.mark.parametrize("case", ["empty", "garbage", "truncated", "folder"])
def test_blo_sam_lora_import_of_a_bad_file_fails_cleanly(case, files, tmp_path, capsys):
    argv = [
        "blo-sam-lora",
        "import",
        "--workdir",
        str(tmp_path / "run"),
        "--input",
        str(files[case]),
    ]
    fails_cleanly(main, argv, capsys, names=[str(files[case])], watch=[tmp_path])


# --- a conversion killed (SIGKILL, a real process) at a chosen moment ---

ROOT_DIR = Path(__file__).resolve().parents[2]
KILL_MOMENTS = {
    "after_params_before_config": "amsam_jax.conversion.convert_sam:save_params:1:after",
    "before_config": "amsam_jax.conversion.convert_sam:write_json:1:before",
    "inside_the_params_save": (
        "orbax.checkpoint._src.path.atomicity:AtomicRenameTemporaryPath.finalize:1:before"
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(KILL_MOMENTS))
def test_a_conversion_killed_at_any_moment_leaves_nothing_and_the_rerun_succeeds(
    moment, files, tmp_path
):
    """SIGKILL during `python -m weights_conversion sam`: no `out`, only a hidden temporary that
    the next run removes; the rerun converts and leaves exactly `out`, equal to an unkilled run."""
    import subprocess
    import sys

    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    cli = [sys.executable, str(ROOT_DIR / "tests" / "faults.py"), KILL_MOMENTS[moment], "--",
           "-m", "weights_conversion.__main__", "sam", str(files["tiny"]), str(out)]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    killed = subprocess.run(cli, capture_output=True, text=True, env=env, cwd=ROOT_DIR)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists()
    assert all(p.name.startswith(".") for p in out.parent.iterdir())  # only hidden temporaries
    assert main(["sam", str(files["tiny"]), str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    reference = tmp_path / "reference"
    assert main(["sam", str(files["tiny"]), str(reference)]) == 0
    got, want = load_sam(out), load_sam(reference)
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(got)), nnx.to_flat_state(nnx.state(want)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))

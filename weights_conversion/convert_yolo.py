"""Export an Ultralytics YOLOv8 detector to ONNX for the box prompts (needs the `yolo` extra).

    python -m weights_conversion yolo yolov8n.pt detectors/yolov8n.onnx
    python -m weights_conversion yolo yolov8n.pt detectors/yolov8n_dyn.onnx --imgsz 640 --dynamic

The source is a local `.pt` (or a model `.yaml`, which gives untrained weights, as the tests use);
nothing is downloaded: YOLO_OFFLINE=1 and YOLO_AUTOINSTALL=False are set before Ultralytics is
imported (unless already set).

Ultralytics unpickles a `.pt` in full (`torch.load(weights_only=False)`), so a file can run any
code it names, and it `eval`s a model yaml's `activation`. Before either is handed over, the file
is checked without running it: the `.pt` is copied into a private temporary folder and its pickle
dry-run (`amsam_jax.conversion.torch_pickle.dry_run`) against `ultralytics_global`, the allow-list
of what Ultralytics detection checkpoints name (torch and Ultralytics layer classes, tensor
rebuilds, dtypes, builtin data types); the copy is what Ultralytics loads. A yaml's activation
must be a literal `nn.<Class>(...)` and its layers torch or Ultralytics modules. `--trust-pickle`
skips the allow-list (never the format checks) for a file the user trusts.

The export (ONNX, NMS-free `[B, 4+nc, N]` head, Ultralytics metadata: names, imgsz, stride) is
written in that temporary folder and then atomically into place, so a failed or interrupted export
leaves no partial file and never writes next to the source.
"""

import argparse
import ast
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from amsam_jax.boxes.detector import BoxError, YoloDetector
from amsam_jax.conversion.torch_pickle import (
    STORAGE_DTYPES,
    TORCH_DTYPES,
    CheckpointReadError,
    StandIn,
    UnpicklingRefused,
    dry_run,
)
from amsam_jax.utils.cli import guarded
from amsam_jax.utils.errors import first_line
from amsam_jax.utils.io import atomic_outputs, check_output_file

OFFLINE_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "False"}
TRUST_HINT = "pass --trust-pickle only for a file you trust"
# Globals of the data in an Ultralytics checkpoint (the allow-list of Ultralytics' own opt-in safe
# load, ultralytics/nn/tasks.py `_SafeLoad`, plus torch.load's weights-only defaults).
DATA_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "builtins.set",
        "builtins.frozenset",
        "builtins.slice",
        "builtins.complex",
        "builtins.bytearray",
        "_codecs.encode",  # bytes under pickle protocol 2
        "numpy.dtype",
        "numpy.core.multiarray.scalar",  # trainers store metrics as numpy floats
        "numpy._core.multiarray.scalar",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "pathlib._local.PosixPath",
        "pathlib._local.WindowsPath",
        "ultralytics.utils.IterableSimpleNamespace",
        "ultralytics.yolo.utils.IterableSimpleNamespace",  # before Ultralytics 8.0.44
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._tensor._rebuild_from_type_v2",
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
        "torch.Size",
        "torch.device",
        "torch.UntypedStorage",
        "torch.storage.UntypedStorage",
        *(f"torch.{name}" for name in (*STORAGE_DTYPES, *TORCH_DTYPES)),
    }
)
# Classes Ultralytics renamed and maps on load (ultralytics/nn/tasks.py `torch_safe_load`).
RENAMED_CLASSES = frozenset(
    {
        "ultralytics.nn.modules.block.Silence",
        "ultralytics.nn.tasks.YOLOv10DetectionModel",
        "ultralytics.utils.loss.v10DetectLoss",
    }
)
# Where the nn.Module classes of a checkpoint live, and the modules of the plain classes a
# trained model keeps (its loss and label assigner).
LAYER_PACKAGES = ("torch.nn.modules", "ultralytics.nn.modules", "ultralytics.nn.tasks")
HELPER_MODULES = ("ultralytics.utils.loss", "ultralytics.utils.tal")
TORCH_MODULE = "torch.nn.modules.module.Module"
MODEL_PACKAGE = "ultralytics.nn.tasks."


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _installed_class(module: str, name: str) -> type | None:
    """The class `module.name` of the installed packages, or None (nothing of the file runs)."""
    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return found if isinstance(found, type) else None


def _is_layer(cls: type | None) -> bool:
    return cls is not None and any(
        f"{c.__module__}.{c.__qualname__}" == TORCH_MODULE for c in cls.__mro__
    )


def ultralytics_global(module: str, name: str) -> str | None:
    """The allow-list of a YOLO checkpoint's pickle (`amsam_jax.conversion.torch_pickle.Allow`).

    Data types and tensor rebuilds may be called; nn.Module classes of torch and Ultralytics (and
    the loss and assigner classes of `HELPER_MODULES`, defined there) may only be rebuilt, as
    torch.save writes them; `getattr` only reaches public attributes of those classes.
    """
    qualified = f"{module}.{name}"
    if qualified == "builtins.getattr":
        return "getattr"
    if qualified in DATA_GLOBALS:
        return "call"
    if qualified in RENAMED_CLASSES:
        return "class"
    if _within(module, LAYER_PACKAGES):
        cls = _installed_class(module, name)
        if _is_layer(cls) and _within(cls.__module__, LAYER_PACKAGES):
            return "class"
    if module in HELPER_MODULES:
        cls = _installed_class(module, name)
        if cls is not None and cls.__module__ == module:
            return "class"
    return None


def _trust_all(module: str, name: str) -> str:
    return "call"


def check_checkpoint(path: Path, source: Path, trust_pickle: bool = False) -> None:
    """Checks the `.pt` at `path` (a private copy of `source`) without running any of it.

    Raises:
        BoxError: naming `source`: not a zip torch.save file, damaged, not an Ultralytics
            checkpoint, or (unless `trust_pickle`) a global outside `ultralytics_global`.
    """
    try:
        obj = dry_run(path, _trust_all if trust_pickle else ultralytics_global)
    except UnpicklingRefused as e:
        raise BoxError(
            source,
            f"the pickle names {e.global_name!r}, which is not on the allow-list of Ultralytics "
            f"and torch classes; loading it could run code ({TRUST_HINT})",
        ) from None
    except CheckpointReadError as e:
        raise BoxError(source, e.problem) from None
    if not isinstance(obj, dict):
        raise BoxError(source, f"holds a {type(obj).__name__}, not an Ultralytics checkpoint")
    model = obj.get("ema") or obj.get("model")  # what Ultralytics loads
    if not isinstance(model, StandIn):
        raise BoxError(source, "has no 'model' entry: not an Ultralytics checkpoint")
    if not trust_pickle and not model.global_name.startswith(MODEL_PACKAGE):
        raise BoxError(source, f"its model is a {model.global_name}, not an Ultralytics model")


def _literal_activation(spec: object) -> bool:
    """`[torch.]nn.<Class>(<literal arguments>)`: what Ultralytics' safe load accepts."""
    try:
        call = ast.parse(str(spec).strip(), mode="eval").body
        if not isinstance(call, ast.Call):
            return False
        names, node = [], call.func
        while isinstance(node, ast.Attribute):
            names.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name) or [*names[1:], node.id] not in (["nn"], ["nn", "torch"]):
            return False
        for arg in [*call.args, *(k.value for k in call.keywords)]:
            ast.literal_eval(arg)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return False
    return _is_layer(_installed_class("torch.nn", names[0]))


def check_model_yaml(path: Path, trust: bool = False) -> None:
    """Checks a model yaml before Ultralytics builds it (it `eval`s the activation).

    Raises:
        BoxError: no such file (nor an Ultralytics model name), not a model yaml, or (unless
            `trust`) an activation that is not a literal torch.nn call or a layer that is not a
            torch or Ultralytics module.
    """
    import yaml
    from ultralytics.nn.tasks import yaml_model_load

    try:
        cfg = yaml_model_load(path)
    except FileNotFoundError:
        raise BoxError(path, "no such file (nor an Ultralytics model name)") from None
    except (yaml.YAMLError, ValueError, OSError, TypeError) as e:  # Ultralytics: ValueError
        raise BoxError(path, f"not a readable model yaml ({first_line(e)})") from None
    layers = [*(cfg.get("backbone") or []), *(cfg.get("head") or [])]
    if not layers or not all(isinstance(x, list) and len(x) == 4 for x in layers):
        raise BoxError(
            path, "not an Ultralytics model yaml (backbone/head of [from, n, module, args])"
        )
    if trust:
        return
    act = cfg.get("activation")
    if act is not None and not _literal_activation(act):
        raise BoxError(
            path, f"activation {str(act)[:60]!r} is not a literal torch.nn call ({TRUST_HINT})"
        )
    for _, _, module, _ in layers:
        name = str(module)
        cls = (
            _installed_class("torch.nn", name[3:])
            if name.startswith("nn.")
            else _installed_class("ultralytics.nn.tasks", name)
        )
        if not _is_layer(cls):
            raise BoxError(path, f"layer {name[:60]!r} is not a torch or Ultralytics module")


def export_yolo(
    model: str | os.PathLike,
    output: str | os.PathLike,
    imgsz: int = 640,
    dynamic: bool = False,
    trust_pickle: bool = False,
) -> Path:
    """Exports a YOLOv8 detection model to ONNX and checks that the result loads as a detector.

    Args:
        model: local `.pt` checkpoint or Ultralytics model `.yaml` (e.g. "yolov8n.yaml").
        output: the `.onnx` file to write.
        imgsz: square input size, a multiple of the stride (32).
        dynamic: dynamic batch and spatial axes (batched box precomputation).
        trust_pickle: skip the allow-list check of the file (see the module docstring).

    Returns:
        The written path.

    Raises:
        BoxError: a missing, damaged, code-carrying or non-detection model, an export that is not
            a YOLOv8 head, or an output that cannot be written.
    """
    model, output = Path(model), Path(output)
    if model.suffix not in (".pt", ".yaml", ".yml"):
        raise BoxError(model, "expected an Ultralytics .pt checkpoint or model .yaml")
    if model.is_dir():
        raise BoxError(model, "is a directory, not a model file")
    if model.suffix == ".pt" and not model.is_file():
        raise BoxError(model, "no such file (downloads are disabled)")
    check_output_file(output)  # a folder, a file in the way, a folder that is not writable
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(prefix="amsam-yolo-") as tmp:
        source = model
        if model.suffix == ".pt":
            source = Path(tmp) / model.name  # the file checked is the file Ultralytics loads
            try:
                shutil.copyfile(model, source)
            except OSError as e:
                raise BoxError(model, f"cannot be read ({e.strerror or e})") from None
            check_checkpoint(source, model, trust_pickle)
        else:
            check_model_yaml(model, trust_pickle)
        try:
            yolo = YOLO(str(source))
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            # How Ultralytics reports a model it cannot build (a checked file that is not one).
            raise BoxError(model, f"Ultralytics cannot load it ({first_line(e)})") from None
        if yolo.task != "detect":
            raise BoxError(model, f"a {yolo.task!r} model; box prompts need a detection model")
        # The exporter writes beside `pt_path`; point it into the temporary folder.
        yolo.model.pt_path = str(Path(tmp) / f"{model.stem}.pt")
        exported = yolo.export(
            format="onnx", imgsz=imgsz, dynamic=dynamic, simplify=True, device="cpu", verbose=False
        )
        YoloDetector(exported)
        # Renamed into place whole; on a failure neither it nor the folders made for it stay.
        with open(exported, "rb") as f, atomic_outputs() as outputs:
            outputs.file(output, lambda out: shutil.copyfileobj(f, out))
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_conversion yolo",
        description="Export an Ultralytics YOLOv8 detector (.pt) to ONNX for amsam_jax.boxes. "
        "The .pt is checked first without running it: its pickle may name only Ultralytics "
        "and torch layer classes, tensors and builtin data types.",
    )
    parser.add_argument("model", help="YOLOv8 detection checkpoint (.pt) or model .yaml")
    parser.add_argument("output", help="ONNX file to write")
    parser.add_argument("--imgsz", type=int, default=640, help="square input size")
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch and image axes")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a file that fails the check anyway: Ultralytics unpickles it in full and "
        "runs any code it names (only for a file you trust)",
    )
    args = parser.parse_args(argv)

    def body() -> int:
        if args.imgsz <= 0 or args.imgsz % 32:
            raise BoxError("--imgsz", f"{args.imgsz} is not a positive multiple of 32")
        path = export_yolo(args.model, args.output, args.imgsz, args.dynamic, args.trust_pickle)
        detector = YoloDetector(path)
        batch = "dynamic" if args.dynamic else 1
        print(
            f"exported {args.model} -> {path} ({len(detector.names)} classes, imgsz "
            f"{detector.imgsz[0]}, batch {batch}, sha256 {detector.sha256[:12]})"
        )
        return 0

    return guarded(body, f"nothing was written to {args.output}")


if __name__ == "__main__":
    sys.exit(main())

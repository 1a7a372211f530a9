"""The package layout: no import cycles, one direction between the two packages, no hidden imports.

The import graph is read with the standard library's `ast` from every `import` statement, at module
level and inside functions alike, so a cycle cannot hide behind a function-level import.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("amsam_jax", "weights_conversion")
# Every function-level import is of an optional third-party dependency (ONNX Runtime,
# tensorflow-datasets, torch, Ultralytics): none of a project module.
OPTIONAL_DEPENDENCIES = {
    "onnxruntime": {"amsam_jax.boxes.detector"},
    "tensorflow_datasets": {"amsam_jax.data.tfds", "amsam_jax.data.tfds.base"},
    "torch": {
        "weights_conversion.blo_sam_lora",
        "weights_conversion.make_golden",
        "weights_conversion.export_onnx",
    },
    "ultralytics": {"weights_conversion.convert_yolo"},
}


# The layers of docs/layout.md, lowest first; a module may import its own layer and those below.
# A module belongs to the layer of its longest matching prefix.
LAYERS = (
    ("amsam_jax.utils",),
    (
        "amsam_jax.modeling",
        "amsam_jax.build_sam",
        "amsam_jax.checkpoint",
        "amsam_jax.conversion",
        "amsam_jax.predictor",
        "amsam_jax.automatic_mask_generator",
        "amsam_jax.pretrained",
    ),
    ("amsam_jax.data", "amsam_jax.boxes"),
    ("amsam_jax.training", "amsam_jax.evaluation", "amsam_jax.evaluation.metrics",
     "amsam_jax.evaluation.plots"),
    ("amsam_jax.fewshot", "amsam_jax.sum", "amsam_jax.evaluation.fewshot",
     "amsam_jax.evaluation.interactive"),
    ("amsam_jax.fewshot.trainer", "amsam_jax.sum.refiner", "amsam_jax.sum.trainer",
     "amsam_jax.evaluation.workdir"),
    ("amsam_jax", "amsam_jax.train", "amsam_jax.predict", "amsam_jax.evaluate",
     "amsam_jax.refine", "amsam_jax.pseudo_labels", "amsam_jax.datasets",
     "amsam_jax.boxes.__main__"),
    ("weights_conversion",),
)  # fmt: skip


def layer_of(module: str) -> int:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), i
    assert layer is not None, f"{module} is in no layer of LAYERS"
    return layer


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported name, at module level) for every import statement of `module`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    in_functions = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for inner in ast.walk(node)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".")
            if node.level:
                base = base[: len(base) - node.level + (path.name == "__init__.py")]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix, *(f"{prefix}.{a.name}" for a in node.names)]
        else:
            continue
        out += [(name, id(node) not in in_functions) for name in names]
    return out


def _resolve(name: str) -> str | None:
    """The project module a dotted import name refers to (None: a third-party name)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for name, _ in _imports(module):
            target = _resolve(name)
            # A package's own __init__ runs before its modules: importing a parent is no edge.
            if target and target != module and not module.startswith(target + "."):
                edges[module].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layers(edges: dict[str, set[str]]) -> dict[str, int]:
    """Each module's layer: 0 for a module that imports no project module, else 1 + the highest
    layer among what it imports (the graph is acyclic)."""
    out: dict[str, int] = {}

    def layer(v: str) -> int:
        if v not in out:
            out[v] = 1 + max((layer(w) for w in edges[v]), default=-1)
        return out[v]

    for v in edges:
        layer(v)
    return out


def test_the_import_graph_has_no_cycle():
    assert _cycles(_graph()) == []


def test_every_import_goes_to_the_same_or_a_lower_layer():
    upward = [
        f"{m} (layer {layer_of(m)}) -> {t} (layer {layer_of(t)})"
        for m, targets in _graph().items()
        for t in targets
        if layer_of(t) > layer_of(m)
    ]
    assert upward == []


def test_a_cycle_is_detected():
    """The checker itself: a graph with a cycle through three modules is reported."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]


def test_weights_conversion_is_above_amsam_jax():
    upward = [
        (m, t)
        for m, targets in _graph().items()
        for t in targets
        if m.startswith("amsam_jax") and t.startswith("weights_conversion")
    ]
    assert upward == []


def test_no_function_level_import_of_project_modules():
    hidden = {
        (m, _resolve(name))
        for m in MODULES
        for name, top in _imports(m)
        if not top and _resolve(name) is not None
    }
    assert hidden == set()


@pytest.mark.parametrize("dependency", sorted(OPTIONAL_DEPENDENCIES))
def test_optional_dependencies_are_imported_only_where_they_are_needed(dependency):
    users = {
        m
        for m in MODULES
        for name, _ in _imports(m)
        if name == dependency or name.startswith(dependency + ".")
    }
    assert users <= OPTIONAL_DEPENDENCIES[dependency]


def test_amsam_jax_never_imports_torch():
    users = [m for m in MODULES if m.startswith("amsam_jax") for n, _ in _imports(m)
             if n == "torch" or n.startswith("torch.")]  # fmt: skip
    assert users == []


def test_no_package_exports_a_name_that_is_also_one_of_its_modules():
    """`from amsam_jax.boxes import geometry` must give the module, never a function of the name
    (the `amsam_jax.evaluate` function/module clash this layout removed)."""
    clashes = []
    for module, path in MODULES.items():
        if path.name != "__init__.py":
            continue
        submodules = {m.rpartition(".")[2] for m in MODULES if m.rpartition(".")[0] == module}
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                names = {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.FunctionDef | ast.ClassDef):
                names = {node.name}
            elif isinstance(node, ast.Assign):
                names = {t.id for t in node.targets if isinstance(t, ast.Name)}
            else:
                continue
            imported_modules = (
                {a.name for a in node.names if f"{module}.{a.name}" in MODULES}
                if isinstance(node, ast.ImportFrom)
                else set()
            )
            clashes += [f"{module}.{n}" for n in (names & submodules) - imported_modules]
    assert clashes == []


def test_images_are_decoded_only_by_the_one_reader():
    """`utils/image.py` is the only module that opens image files (one rule for 16-bit, float,
    palette, EXIF, ... everywhere: the detector and SAM see the same pixels)."""
    openers = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("open", "imread")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in ("Image", "cv2", "PIL")
            ):
                openers.append(module)
    assert set(openers) == {"amsam_jax.utils.image"}


def test_nothing_points_outside_the_repository():
    """Docs, code, configs and tests cite files of this repository only (docs/...)."""
    outside = ("../" + "shared", "shared" + "/specs")  # spelled apart: this file is searched too
    offenders = []
    for pattern in ("**/*.py", "**/*.md", "**/*.toml", "**/*.ipynb", "Makefile", ".ci/*"):
        for path in ROOT.glob(pattern):
            if ".venv" in path.parts or not path.is_file():
                continue
            text = path.read_text(errors="replace")
            if any(word in text for word in outside):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []

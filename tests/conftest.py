"""Shared test setup: float32 matmuls on every backend, as the parity tolerances assume, and
the reference-package guard of the two test tiers.

The full suite (slow tests selected) needs the `test` extra: when one of its reference packages is
missing the run stops with a usage error instead of skipping the parity tests. The fast tier
(`-m "not slow"`) needs none of them: a test module that imports a missing one at top level is
not collected when slow tests are deselected (the report header lists such modules).
"""

import ast
import importlib.util
import os
import sys
from pathlib import Path

# The suite is bound by XLA compiles of small test models, not by running them: LLVM's backend
# optimisations cost ~1/3 of a compile and the programs run on Eigen's GEMMs either way (a cold
# suite ~15-25% faster; the full-size parity tests run as fast). Set before JAX starts its CPU
# backend; CLI subprocesses inherit it. Results do not depend on it beyond float rounding, which
# no parity tolerance is near, and every bitwise comparison is between runs under the same flags.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from _pytest.mark.expression import Expression  # noqa: E402
from PIL import Image  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")
# XLA compiles are slow on a 2-core CPU; reuse them across test processes and runs.
_CACHE = Path.home() / ".cache/amsam_jax/jax-tests"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
# CLI subprocesses (`python -m amsam_jax.train ...`) share it: the same recipe compiled in-process
# by one test is a cache hit for another test's subprocess.
# The matmul precision is part of the cache key, so subprocesses get the same setting.
os.environ.setdefault("AMSAM_XLA_CACHE", str(_CACHE))
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "float32")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(autouse=True)
def no_kept_programs(monkeypatch):
    """Every test starts with `utils.program_cache` off: a test that runs a CLI in this process
    (`enable_compilation_cache`) would otherwise turn it on for the tests after it on this
    worker. Tests of it turn it on themselves."""
    from amsam_jax.utils import program_cache

    monkeypatch.setitem(program_cache._state, "dir", None)


@pytest.fixture(autouse=True)
def pil_open_without_ultralytics_patch(monkeypatch):
    """Importing ultralytics (YOLO tests) replaces `PIL.Image.open` by a wrapper that, on a file
    PIL cannot identify, tries to install pi-heif (ModuleNotFoundError offline). amsam_jax never
    imports ultralytics: undo the patch for every test that runs after such an import."""
    patches = sys.modules.get("ultralytics.utils.patches")
    if patches is not None:
        monkeypatch.setattr(Image, "open", patches._image_open)


# ---------------------------------------------------------------------------------------------
# Reference packages (the `test` extra) and the two tiers

REFERENCE_PACKAGES = (
    "torch",
    "segment_anything",
    "ultralytics",
    "onnxruntime",
    "onnx",
    "nbclient",
    "nbformat",
)
_TESTS = Path(__file__).resolve().parent
_HELPERS = {p.stem for p in _TESTS.glob("*.py")} - {"conftest"}  # sam_reference, yolo_fixtures, ...


def _is_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # a blocked import, or sys.modules[name] = None
        return True


MISSING = tuple(name for name in REFERENCE_PACKAGES if _is_missing(name))


def _module_level_imports(path: Path) -> set[str]:
    """Top-level package names a module imports at module level, through the helper modules of
    tests/ that it imports (`from sam_reference import ...` or `from tests.sam_reference import
    ...` imports torch)."""
    names, todo, seen = set(), [path], set()
    while todo:
        current = todo.pop()
        seen.add(current)
        for node in ast.parse(current.read_text()).body:
            if isinstance(node, ast.Import):
                dotted = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                dotted = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in dotted:
                parts = name.split(".")
                if parts[0] == "tests" and len(parts) > 1:
                    parts = parts[1:]
                names.add(parts[0])
                helper = _TESTS / f"{parts[0]}.py"
                if parts[0] in _HELPERS and helper not in seen:
                    todo.append(helper)
    return names


def _needs_missing(path: Path) -> bool:
    return bool(_module_level_imports(path) & set(MISSING))


def _selects_slow(config) -> bool:
    """Whether the -m expression keeps a test marked only `slow` (no -m keeps every test)."""
    markexpr = config.option.markexpr
    if not markexpr:
        return True
    return Expression.compile(markexpr).evaluate(lambda name, /, **kwargs: name == "slow")


def pytest_ignore_collect(collection_path, config):
    # Fast tier without a reference package: skip the import (and its ModuleNotFoundError) of the
    # modules that need it. With slow tests selected nothing is ignored: such modules fail to
    # import (a collection error) and the check below names the missing packages.
    path = Path(collection_path)
    if not MISSING or _selects_slow(config):
        return None
    if path.suffix == ".py" and path.name.startswith("test_") and _needs_missing(path):
        return True
    return None


def pytest_report_header(config):
    if not MISSING:
        return None
    lines = [f"reference packages missing: {', '.join(MISSING)} (pip install -e .[test])"]
    if not _selects_slow(config):
        modules = sorted(
            str(p.relative_to(_TESTS)) for p in _TESTS.rglob("test_*.py") if _needs_missing(p)
        )
        lines.append(f"not collected (they import them): {', '.join(modules) or 'none'}")
    return lines


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "needs(*packages): a fast-tier test that imports reference packages inside the test; "
        "deselected (and counted in the header) in a fast tier that lacks them",
    )


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: `items` are the selected tests
def pytest_collection_modifyitems(config, items):
    if MISSING and not _selects_slow(config):
        needing = [
            item
            for item in items
            if any(set(m.args) & set(MISSING) for m in item.iter_markers("needs"))
        ]
        if needing:
            config.hook.pytest_deselected(items=needing)
            items[:] = [item for item in items if item not in needing]
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if MISSING and slow:
        raise pytest.UsageError(
            f"{len(slow)} selected slow tests need the test extra's reference packages, and "
            f"{', '.join(MISSING)} cannot be imported: pip install -e .[test] "
            '(or run the fast tier: pytest -m "not slow")'
        )

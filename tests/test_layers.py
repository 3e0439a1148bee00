"""The house plan's import rules (docs/ARCHITECTURE.md in this repository, "Layers"):

- ``edge_runtime`` (the device) never reaches ``train``, ``convert``, ``lungedge`` (the command line)
  or TensorFlow/Keras; ``benchmarks`` never reaches ``train``, ``convert`` or TensorFlow/Keras (it
  may drive the command line and use its generated test images);
- ``train`` and ``convert`` are libraries: they never reach ``lungedge``;
- ``train`` never reaches ``convert`` (conversion builds on training, not the other way round).

Checked twice: statically, every import statement in every module (also those inside functions);
and dynamically, importing every device module in a fresh interpreter loads none of them.

Installed, the three library folders are ``lungedge.train``, ``lungedge.convert`` and
``lungedge.edge_runtime`` (setup.cfg's ``package_dir``), so a layer is named by the second part of a
``lungedge.`` import; a bare ``import train`` would work in the checkout and fail in the wheel, and
is refused everywhere.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("train", "convert", "edge_runtime")
FORBIDDEN = {
    "edge_runtime": {"train", "convert", "lungedge", "tensorflow", "keras", "tf_keras"},
    "benchmarks": {"train", "convert", "tensorflow", "keras", "tf_keras"},
    "train": {"lungedge", "convert"},
    "convert": {"lungedge"},
}


def _layer(module: str) -> str:
    """The layer an absolute module name belongs to: ``lungedge.train.x`` is ``train``,
    ``lungedge.cli`` is ``lungedge``, ``numpy.linalg`` is ``numpy``."""
    parts = module.split(".")
    if parts[0] == "lungedge" and len(parts) > 1 and parts[1] in LIBRARIES:
        return parts[1]
    return parts[0]


def _imports(path: Path, raw: bool = False, package: str | None = None):
    """(line, layer) of every import in a file; relative imports resolved to the file's package
    (its top folder in the repository unless given). With ``raw``, the top-level name as written."""
    package = package or path.relative_to(ROOT).parts[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0] if raw else _layer(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield node.lineno, "." if raw else package
            else:
                yield node.lineno, (node.module or "").split(".")[0] if raw else _layer(node.module or "")


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_across_the_layer_rules(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    bad = [f"{f.relative_to(ROOT)}:{line} imports {mod}" for f in files for line, mod in _imports(f)
           if mod in FORBIDDEN[package]]
    assert not bad, "layer rule broken:\n" + "\n".join(bad)


def test_no_module_imports_a_library_by_its_folder_name():
    """``from train.x import y`` runs in the checkout and breaks in the wheel (no top-level ``train``)."""
    files = [f for d in (*LIBRARIES, "app", "benchmarks", "tests") for f in sorted((ROOT / d).rglob("*.py"))]
    bad = [f"{f.relative_to(ROOT)}:{line} imports {mod}" for f in files for line, mod in _imports(f, raw=True)
           if mod in LIBRARIES]
    assert not bad, "import through lungedge.<library>:\n" + "\n".join(bad)


def test_the_static_check_sees_imports_inside_functions(tmp_path):
    p = ROOT / "edge_runtime" / "__init__.py"
    found = {mod for _, mod in _imports(p)}
    assert found, "the parser found no import at all in edge_runtime/__init__.py"
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import tensorflow as tf\n    from lungedge.train.recipes import Recipe\n"
                     "    from lungedge.cli import main\n    from . import spec\n    import train\n")
    assert {mod for _, mod in _imports(probe, package="edge_runtime")} == {"tensorflow", "train", "lungedge",
                                                                           "edge_runtime"}
    assert {mod for _, mod in _imports(probe, package="edge_runtime", raw=True)} == {"tensorflow", "lungedge", ".",
                                                                                     "train"}


def test_importing_every_device_module_loads_no_training_code():
    """Importing every device module loads nothing of train, convert, TensorFlow/Keras or the
    command line; only ``lungedge`` itself (``app/__init__.py``, the light parent package) is allowed."""
    modules = sorted(f"lungedge.edge_runtime.{p.stem}" for p in (ROOT / "edge_runtime").glob("*.py")
                     if p.stem != "__init__")
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in ('lungedge', 'tensorflow', 'keras'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(modules) <= set(loaded), "the check imported nothing"
    assert [m for m in loaded if m != "lungedge" and _layer(m) != "edge_runtime"] == []


def test_no_folder_at_the_root_shadows_the_installed_package():
    """``python -m lungedge`` (and every child process bench starts) puts the working folder first
    on the path: a root folder named ``lungedge`` would be imported instead of the installed
    package, without its libraries. The command-line package lives in ``app/`` (setup.cfg)."""
    assert not (ROOT / "lungedge").exists()
    assert "lungedge = app" in (ROOT / "setup.cfg").read_text()

"""The house plan's import rules (docs/ARCHITECTURE.md in this repository, "Layers"):

- ``edge_runtime`` (the device) never reaches ``train``, ``convert``, ``lungedge`` (the command line)
  or TensorFlow/Keras; ``benchmarks`` never reaches ``train``, ``convert`` or TensorFlow/Keras (it
  may drive the command line and use its generated test images);
- ``train`` and ``convert`` are libraries: they never reach ``lungedge``;
- ``train`` never reaches ``convert`` (conversion builds on training, not the other way round).

Checked twice: statically, every import statement in every module (also those inside functions);
and dynamically, importing every device module in a fresh interpreter loads none of them.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "edge_runtime": {"train", "convert", "lungedge", "tensorflow", "keras", "tf_keras"},
    "benchmarks": {"train", "convert", "tensorflow", "keras", "tf_keras"},
    "train": {"lungedge", "convert"},
    "convert": {"lungedge"},
}


def _imports(path: Path):
    """(line, top-level module) of every import in a file; relative imports resolved to the package."""
    package = path.relative_to(ROOT).parts[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, package if node.level else (node.module or "").split(".")[0]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_across_the_layer_rules(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    bad = [f"{f.relative_to(ROOT)}:{line} imports {mod}" for f in files for line, mod in _imports(f)
           if mod in FORBIDDEN[package]]
    assert not bad, "layer rule broken:\n" + "\n".join(bad)


def test_the_static_check_sees_imports_inside_functions(tmp_path):
    p = ROOT / "edge_runtime" / "__init__.py"
    found = {mod for _, mod in _imports(p)}
    assert found, "the parser found no import at all in edge_runtime/__init__.py"
    code = "def f():\n    import tensorflow as tf\n    from train.recipes import Recipe\n"
    tree_mods = {n.names[0].name.split(".")[0] if isinstance(n, ast.Import) else n.module.split(".")[0]
                 for n in ast.walk(ast.parse(code)) if isinstance(n, (ast.Import, ast.ImportFrom))}
    assert tree_mods == {"tensorflow", "train"}


def test_importing_every_device_module_loads_no_training_code():
    modules = sorted(f"edge_runtime.{p.stem}" for p in (ROOT / "edge_runtime").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in "
            "('train', 'convert', 'lungedge', 'tensorflow', 'keras'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []

"""The Python API a user would guess, the README's example run as written, and the package as
a user installs it: ``import lungedge`` stays light, ``python -m lungedge`` works, and a wheel
installed with the edge extra in a clean venv outside the checkout classifies an image."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_block(heading: str, index: int = 0) -> str:
    section = ROOT.joinpath("README.md").read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)[index]


def test_import_lungedge_is_light():
    code = ("import sys, lungedge; assert lungedge.__version__; "
            "heavy = [m for m in ('tensorflow', 'keras', 'numpy', 'ai_edge_litert', 'mediapipe', 'lungedge.edge_runtime.classifier') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    import lungedge
    from lungedge.edge_runtime.classifier import Classifier

    assert lungedge.Classifier is Classifier and "Classifier" in dir(lungedge)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lungedge.nope  # noqa: B018


def test_python_dash_m_lungedge():
    out = subprocess.run([sys.executable, "-m", "lungedge", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == f"lungedge, version {__import__('lungedge').__version__}"


@pytest.mark.needs_tf
@pytest.mark.needs_shared
def test_readme_api_example_runs_as_written(interop_run, fullres_dir, tmp_path, monkeypatch):
    """The README's example, in a folder holding a converted model and an X-ray under its names."""
    shutil.copy(interop_run / "model_int8.tflite", tmp_path / "model_int8.tflite")
    xray = sorted((fullres_dir / "PNEUMONIA").glob("*.jpeg"))[0]
    shutil.copy(xray, tmp_path / "xray.jpeg")
    monkeypatch.chdir(tmp_path)
    code = _readme_block("### Python API")
    assert "Classifier.from_file(" in code and "result.categories" in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    label, index, score, applied = lines[0].split()
    assert label in ("NORMAL", "PNEUMONIA") and index == str(("NORMAL", "PNEUMONIA").index(label))
    assert 0.0 <= float(score) <= 1.0 and applied in ("True", "False")
    # the domain verdict: an X-ray of the training kind, accepted, with its score and the threshold
    assert lines[1].startswith("True {'in_domain': True, 'domain_score': "), lines
    categories = [ln.split() for ln in lines[2:-1]]  # max_results=2, score_threshold=0.01
    assert 1 <= len(categories) <= 2 and all(float(c[2]) >= 0.01 for c in categories), lines
    assert {c[1] for c in categories} <= {"NORMAL", "PNEUMONIA"} and lines[-1].startswith("['NORMAL', 'PNEUMONIA']")


def test_classifier_options_are_checked():
    from lungedge.edge_runtime.classifier import Classifier
    from lungedge.edge_runtime.errors import ConfigError

    for bad in ({"max_results": 0}, {"max_results": True}, {"score_threshold": 1.5}, {"score_threshold": "0.2"}):
        with pytest.raises(ConfigError, match=list(bad)[0]):
            Classifier.from_file("unused.tflite", **bad)


@pytest.mark.needs_shared
def test_categories_follow_max_results_and_score_threshold(coral_dir):
    from lungedge import Classifier

    with Classifier.from_file(coral_dir / "mobilenet_v2_1.0_224_quant.tflite", max_results=3) as clf:
        r = clf.classify(coral_dir / "cat.bmp")
        assert [c.label for c in r.categories] == [k for k, _ in r.top_k(3)]
        assert r.categories[0].index == clf.labels.index(r.categories[0].label) == r.index
        assert r.label == r.categories[0].label and r.score == r.categories[0].score
    with pytest.raises(Exception, match="closed"):
        clf.classify(coral_dir / "cat.bmp")
    few = Classifier.from_file(coral_dir / "mobilenet_v2_1.0_224_quant.tflite", score_threshold=0.05)
    scores = [c.score for c in few.classify(coral_dir / "cat.bmp").categories]
    assert scores and all(s >= 0.05 for s in scores) and len(scores) < 10


@pytest.mark.slow
@pytest.mark.needs_shared
def test_wheel_installs_with_the_edge_extra_and_classifies_outside_the_checkout(coral_dir, tmp_path):
    """Build the wheel, install it with the ``edge`` extra in a fresh venv, run classify from a
    folder that is not the checkout (so nothing is imported from the source tree)."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = wheels.glob("lungedge-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"{wheel}[edge]"], check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run([str(venv / "bin" / "lungedge"), "classify", "--json", "-m",
                          str(coral_dir / "mobilenet_v2_1.0_224_quant.tflite"), str(coral_dir / "cat.bmp")],
                         capture_output=True, text=True, cwd=work, env=env)
    assert out.returncode == 0, out.stderr
    assert '"label": "Egyptian cat"' in out.stdout or '"label": "tabby, tabby cat"' in out.stdout, out.stdout
    where = subprocess.run([str(py), "-c", "import lungedge, lungedge.edge_runtime as e; print(lungedge.__file__, e.__file__)"],
                           capture_output=True, text=True, cwd=work, env=env, check=True).stdout
    assert str(ROOT) not in where and "site-packages" in where
    # one import name in site-packages: no generic top-level train/convert/edge_runtime
    import zipfile

    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"lungedge"}, top
    assert {"lungedge/train/recipes.py", "lungedge/convert/quant_gate.py", "lungedge/edge_runtime/classifier.py"} <= set(
        zipfile.ZipFile(wheel).namelist())
    clash = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in ('train', 'convert', "
                            "'edge_runtime') if u.find_spec(m)])"], capture_output=True, text=True, cwd=work, env=env)
    assert clash.stdout.strip() == "[]", clash.stdout
    again = subprocess.run([str(py), "-m", "lungedge", "--version"], capture_output=True, text=True, cwd=work, env=env)
    assert again.returncode == 0
    # at the checkout's root, where a benchmarker who cloned the repository types them: no folder
    # there may shadow the installed package (python -m puts the working folder first on the path,
    # and bench runs each model in a child process started the same way)
    at_root = subprocess.run([str(py), "-m", "lungedge", "--version"], capture_output=True, text=True, cwd=ROOT,
                             env=env)
    assert at_root.returncode == 0 and "No module named" not in at_root.stderr, at_root.stderr
    bench = subprocess.run([str(venv / "bin" / "lungedge"), "bench", str(coral_dir / "mobilenet_v2_1.0_224_quant.tflite"),
                            "--labels", str(coral_dir / "imagenet_labels.txt"), "--images", str(coral_dir / "cat.bmp"),
                            "--threads", "1", "--runs", "2", "--warmup", "1", "-o", str(tmp_path / "bench")],
                           capture_output=True, text=True, cwd=ROOT, env=env)
    assert bench.returncode == 0 and "No module named" not in bench.stdout + bench.stderr, bench.stdout + bench.stderr
    report = json.loads((tmp_path / "bench" / "bench_report.json").read_text())
    assert [m["status"] for m in report["models"]] == ["ok"], report["models"]

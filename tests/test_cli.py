"""The command line as a user meets it: exit codes, one-line errors, no TensorFlow on the device path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lungedge.cli import main

from images import BAD, GOOD, write_good_and_bad


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_every_command_and_each_has_help_with_an_example():
    r = run("--help")
    assert r.exit_code == 0
    listed = {ln.split()[0] for ln in r.output.split("Commands:")[1].splitlines() if ln.strip()}
    assert listed == set(main.commands), (listed, set(main.commands))
    assert len(listed) >= 10
    for name, cmd in main.commands.items():
        h = run(name, "--help")
        assert h.exit_code == 0, name
        assert h.output.startswith(f"Usage: main {name}") or f" {name} " in h.output.splitlines()[0], name
        assert "lungedge " + name in h.output, f"`lungedge {name} --help` shows no example"
        assert "--help" in h.output and (cmd.help or "").strip(), name


def test_usage_errors_exit_2(tmp_path):
    assert run("classify").exit_code == 2  # no paths, no model
    assert run("classify", "--model", tmp_path / "m.tflite", "x.jpg", "--threads", "0").exit_code == 2


def test_missing_model_is_one_line_exit_1(tmp_path):
    r = run("classify", "--model", tmp_path / "none.tflite", "x.jpg")
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model file not found"), r.output
    assert "Traceback" not in r.output


@pytest.mark.needs_shared
def test_classify_batch_reports_bad_files_and_goes_on(coral_dir, tmp_path):
    files = write_good_and_bad(tmp_path / "imgs")
    model, labels = coral_dir / "mobilenet_v2_1.0_224_quant.tflite", coral_dir / "imagenet_labels.txt"
    r = run("classify", "--model", model, "--labels", labels, "--json", tmp_path / "imgs", tmp_path / "missing.jpg")
    assert r.exit_code == 1
    records = [json.loads(ln) for ln in r.output.splitlines() if ln.startswith("{")]
    errors = [x for x in records if "error" in x]
    oks = [x for x in records if "label" in x]
    assert len(oks) == len(GOOD) and len(errors) == len(BAD) + 1
    assert all(x["backend"] in ("litert", "tflite-runtime") for x in records)
    r2 = run("classify", "--model", model, "--labels", labels, "--top-k", "3", "--json", coral_dir / "cat.bmp")
    record = json.loads(r2.output.strip().splitlines()[-1])
    assert r2.exit_code == 0 and record["label"] in ("Egyptian cat", "tabby", "tiger cat"), record
    assert record["backend"] in ("litert", "tflite-runtime")
    r3 = run("classify", "--model", model, "--labels", labels, coral_dir / "cat.bmp")
    first = r3.output.splitlines()[0]
    assert ("litert" in first.lower()) or ("tflite-runtime" in first), first


@pytest.mark.needs_shared
def test_broken_model_exit_1_one_line(coral_dir):
    r = run("classify", "--model", coral_dir / "model_invoking_error.tflite", "--labels",
            coral_dir / "imagenet_labels.txt", coral_dir / "cat.bmp")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert [ln for ln in r.output.splitlines() if ln.startswith("error:")] == [r.output.strip().splitlines()[-1]]


@pytest.mark.needs_shared
def test_evaluate_on_a_labelled_folder(coral_dir, tmp_path):
    import shutil

    for cls in ("Egyptian cat", "tabby, tabby cat"):
        (tmp_path / "data" / cls).mkdir(parents=True)
    shutil.copy(coral_dir / "cat.bmp", tmp_path / "data" / "Egyptian cat" / "a.bmp")
    shutil.copy(coral_dir / "cat.bmp", tmp_path / "data" / "tabby, tabby cat" / "b.bmp")
    r = run("evaluate", "--model", coral_dir / "mobilenet_v2_1.0_224_quant.tflite", "--labels",
            coral_dir / "imagenet_labels.txt", "--data", tmp_path / "data", "--out", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 2 and m["accuracy"] == 0.5 and "confusion matrix" in r.output


def test_metrics_match_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    from lungedge.edge_runtime.metrics import classification_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(0, 3, 200))
    probs = rng.dirichlet([1, 1, 1], 200)
    probs[np.arange(200), y] += 0.5
    probs /= probs.sum(1, keepdims=True)
    m = classification_metrics(y, p, ["a", "b", "c"], probs)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, p))
    for avg in ("macro", "weighted"):
        pr, rc, f1, _ = sk.precision_recall_fscore_support(y, p, average=avg, zero_division=0)
        assert (m[avg]["precision"], m[avg]["recall"], m[avg]["f1"]) == pytest.approx((pr, rc, f1))
    assert m["confusion_matrix"] == sk.confusion_matrix(y, p).tolist()
    for i, name in enumerate("abc"):
        assert m["auc"]["per_class"][name] == pytest.approx(sk.roc_auc_score(y == i, probs[:, i]))
    assert m["auc"]["macro"] == pytest.approx(sk.roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)


def test_import_edge_runtime_never_loads_tensorflow():
    r = _fresh_python("import sys, edge_runtime, lungedge.cli; "
                      "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'sklearn', 'matplotlib')]; "
                      "print(bad); sys.exit(1 if bad else 0)")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.needs_shared
def test_full_classify_never_loads_tensorflow(coral_dir):
    code = ("import sys\nfrom lungedge.cli import main\n"
            "try:\n    main(['classify', '--model', sys.argv[1], '--labels', sys.argv[2], sys.argv[3]])\n"
            "except SystemExit as e:\n    code = e.code\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]\n"
            "print('CODE', code, 'TF', bad)\nsys.exit(1 if bad or code else 0)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    r = subprocess.run([sys.executable, "-c", code, str(coral_dir / "mobilenet_v2_1.0_224_quant.tflite"),
                        str(coral_dir / "imagenet_labels.txt"), str(coral_dir / "cat.bmp")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "TF []" in r.stdout, r.stdout + r.stderr

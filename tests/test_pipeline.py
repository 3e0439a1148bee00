"""The whole job end to end: the pipeline on a tiny model, the demo, and the README's quick start."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.needs_tf, pytest.mark.slow]


def _linked_files(index_md: Path) -> list:
    return re.findall(r"\]\(([^)]+)\)", index_md.read_text())


def _assert_index_complete(report: Path) -> None:
    assert (report / "index.html").is_file() and (report / "index.md").is_file()
    links = _linked_files(report / "index.md")
    assert links, "the index links nothing"
    missing = [p for p in links if not (report / p).is_file()]
    assert not missing, f"index links files that do not exist: {missing}"
    html = (report / "index.html").read_text()
    for p in links:
        assert f'href="{p}"' in html


def test_pipeline_end_to_end_smallest_settings(tmp_path):
    from lungedge.demo_data import make_demo_dataset
    from lungedge.pipeline import run_pipeline
    from train.recipes import get_recipe

    data = make_demo_dataset(tmp_path / "data", per_class=16, size=96, seed=1, progress=False)
    recipe = get_recipe("xray-pneumonia").replace(
        name="tiny", weights="none", alpha=0.35, image_size=96, epochs=1, batch_size=8, augment=False,
        split="random", fractions=(0.5, 0.25, 0.25))
    result = run_pipeline(recipe, str(data), str(tmp_path / "report"), calibration_count=8, bench_runs=3,
                          bench_threads=(1,), gate=False, log=lambda m: None)
    assert [s.status for s in result.stages] == ["passed"] * 4, [(s.name, s.status, s.message) for s in result.stages]
    _assert_index_complete(tmp_path / "report")
    links = _linked_files(tmp_path / "report" / "index.md")
    for must in ("run/model_card.md", "run/quantization_report.md", "bench/bench_report.md", "run/model_int8.tflite"):
        assert must in links
    assert len(result.summary["classify_examples"]["rows"]) > 0


def test_pipeline_stops_at_a_failing_stage_and_keeps_earlier_output(tmp_path):
    from lungedge.demo_data import make_demo_dataset
    from lungedge.pipeline import run_pipeline
    from train.recipes import get_recipe

    data = make_demo_dataset(tmp_path / "data", per_class=12, size=96, seed=2, progress=False)
    recipe = get_recipe("xray-pneumonia").replace(
        name="tiny", weights="none", alpha=0.35, image_size=96, epochs=1, batch_size=8, augment=False,
        fractions=(0.5, 0.25, 0.25))
    result = run_pipeline(recipe, str(data), str(tmp_path / "report"), variants=("float32", "no-such-variant"),
                          log=lambda m: None)
    status = {s.name: s for s in result.stages}
    assert status["train"].status == "passed"
    assert status["convert"].status == "failed" and "no-such-variant" in status["convert"].message
    assert status["benchmark"].status == "not run" and not result.ok
    assert (tmp_path / "report" / "run" / "model.keras").is_file()
    _assert_index_complete(tmp_path / "report")


def test_demo_command_small(tmp_path):
    from click.testing import CliRunner

    from lungedge.cli import main

    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--images-per-class", "20",
                                  "--epochs", "2", "--bench-runs", "3"], catch_exceptions=False)
    out = r.output
    assert "report:" in out and "lungedge train --recipe" in out, out[-2000:]
    assert ("ImageNet weights from" in out) or ("ImageNet weights not found" in out)
    _assert_index_complete(tmp_path / "demo" / "report")


def _quick_start():
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        from readme_command import quick_start_commands
    finally:
        sys.path.pop(0)
    return quick_start_commands((ROOT / "README.md").read_text())


def test_readme_quick_start_is_two_commands_and_ci_runs_the_second():
    demo, test = _quick_start()
    assert demo.endswith("lungedge demo") and "pytest" in test
    assert "readme_command.py test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to copy the tracked files")
def test_readme_demo_command_runs_exactly_as_written(tmp_path):
    """Copy the repository (tracked files, as a clone would have them) and run the first
    quick-start command there, unchanged: it makes its own .venv, installs and runs the demo."""
    demo, _ = _quick_start()
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    repo = tmp_path / "lungedge"
    for f in files:
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "/.venv/" not in p and "/venv/" not in p)
    r = subprocess.run(["bash", "-c", demo], cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode in (0, 1), tail
    assert "report:" in r.stdout, tail
    report = repo / "lungedge-demo" / "report"
    _assert_index_complete(report)
    assert r.returncode == 0, "the demo's pipeline reported a failed stage:\n" + tail

"""The whole job in one call: train, convert, gate, benchmark, evaluate the shipped file, report.

Stages run in order; a failing stage stops the pipeline with a clear message, keeps what the
earlier stages wrote, and the index says which stage failed and why. A training run that did
not learn (``edge_runtime.learning_floor``) fails the train stage: nothing is converted or shipped. A
conversion that fails the gate (``convert.quant_gate``, the same rule as ``lungedge convert``) marks
the convert stage "gate failed", and the best passing file, if any, is still benchmarked and
evaluated so the report can show why.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from lungedge.edge_runtime.atomic_write import atomic_write_text
from lungedge.edge_runtime.errors import LungedgeError

from .pipeline_settings import PipelineSettings
from .report_index import write_index

_LOG = logging.getLogger(__name__)


@dataclass
class Stage:
    name: str
    status: str = "not run"  # passed | failed | gate failed | not run
    seconds: float = 0.0
    message: str = ""
    outputs: Dict[str, str] = field(default_factory=dict)


@dataclass
class PipelineResult:
    out_dir: Path
    stages: List[Stage]
    index: Path
    summary: dict

    @property
    def ok(self) -> bool:
        return all(s.status == "passed" for s in self.stages)

    @property
    def shipped(self) -> Optional[str]:
        """The variant the pipeline ships (None: nothing)."""
        return self.summary.get("ship")


@dataclass
class _Job:
    """What the stages share: settings in, summary out."""

    recipe: object
    data_dir: str
    out: Path
    settings: PipelineSettings
    summary: dict

    @property
    def run_dir(self) -> Path:
        return self.out / "run"

    @property
    def variants(self) -> Tuple[str, ...]:
        return self.settings.convert.variant_names()


def run_pipeline(recipe, data_dir: str, out_dir: str, settings: Optional[PipelineSettings] = None, *,
                 title: str = "lungedge pipeline", notes: Sequence[str] = (), facts: Optional[dict] = None,
                 **fields) -> PipelineResult:
    """Train ``recipe`` on ``data_dir``, convert, benchmark, evaluate the file to ship, report.

    Args:
        recipe: a ``train.recipes.Recipe``.
        data_dir: class-folder dataset.
        out_dir: the report folder (created); the training run is ``out_dir/run``.
        settings: what to convert, benchmark and gate (``lungedge.pipeline_settings.PipelineSettings``;
            default: its defaults).
        title: the index's title.
        notes: lines added to the top of the index (e.g. how the data was made).
        facts: key facts for the index (e.g. ``{"imagenet_weights": False}``).
        fields: fields of the settings or of their conversion applied over ``settings``
            (e.g. ``variants=("float32", "int8"), bench_runs=3``).

    Returns:
        A ``PipelineResult``; ``.ok`` is False when any stage failed.
    """
    settings = (settings if settings is not None else PipelineSettings()).replace(**fields)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"recipe": recipe.name, "recipe_resolved": recipe.to_dict(), "data": str(data_dir),
                     "variants": list(settings.convert.variant_names()), "notes": list(notes),
                     "facts": dict(facts or {}), "ship": None}
    job = _Job(recipe, str(data_dir), out, settings, summary)
    stages = [Stage("train"), Stage("convert"), Stage("benchmark"), Stage("evaluate")]
    steps = {"train": _train, "convert": _convert, "benchmark": _bench, "evaluate": _evaluate}
    for stage in stages:
        if not _run_stage(stage, steps[stage.name], job):
            if not (stage.name == "convert" and stage.status == "gate failed" and summary.get("ship")):
                break
    summary["stages"] = [s.__dict__ for s in stages]
    atomic_write_text(str(out / "summary.json"), json.dumps(summary, indent=2, default=str))
    index = write_index(out, title, stages, summary)
    return PipelineResult(out, stages, index, summary)


def _run_stage(stage: Stage, fn: Callable, job: _Job) -> bool:
    """Run one stage; a ``LungedgeError`` is the stage's failure message. A bug propagates."""
    _LOG.info(f"== {stage.name} ==")
    t0 = time.perf_counter()
    try:
        fn(stage, job)
        if stage.status == "not run":
            stage.status = "passed"
    except LungedgeError as exc:
        stage.status, stage.message = "failed", str(exc)
    finally:
        stage.seconds = time.perf_counter() - t0
    if stage.status != "passed":
        _LOG.info(f"{stage.name} stage {stage.status}: {stage.message}")
    return stage.status == "passed"


def _train(stage: Stage, job: _Job) -> None:
    from lungedge.train.training import train_run

    try:
        train_run(job.recipe, job.data_dir, job.run_dir, resume=job.settings.resume and job.run_dir.is_dir())
    finally:  # a run that did not learn still leaves its metrics for the report
        job.summary["train_metrics"] = _read_json(job.run_dir / "metrics.json")
        stage.outputs = _existing(job.run_dir, ["model_card.md", "metrics.json", "recipe.json", "spec.json",
                                                "split_manifest.csv", "history.csv"]) | _pngs(job.run_dir)


def _convert(stage: Stage, job: _Job) -> None:
    from lungedge.convert.conversion import convert_run

    report = convert_run(job.run_dir, job.settings.convert.replace(out_dir=None))
    verdict = report["verdict"]
    job.summary["quantization"] = _quant_summary(report)
    job.summary["keras"] = {k: report["keras"]["metrics"].get(k) for k in ("accuracy", "learning_floor")}
    job.summary["test"] = {k: report["test"][k] for k in ("n", "note", "class_counts")}
    job.summary["gate"] = {**report["gate"], **verdict}
    job.summary["ship"] = verdict["ship"]
    stage.outputs = _existing(job.run_dir, ["quantization_report.md", "quantization_report.json",
                                            "quantization_report.png"] + [f"model_{v}.tflite" for v in job.variants])
    stage.message = verdict["message"]
    if not verdict["passed"] and job.settings.gate:
        stage.status = "gate failed"


def _bench(stage: Stage, job: _Job) -> None:
    from lungedge.edge_runtime.bench import run_bench
    from lungedge.bench_report import write_report

    models = [str(job.run_dir / f"model_{v}.tflite") for v in job.variants
              if (job.run_dir / f"model_{v}.tflite").is_file()]
    report = run_bench(models, images=_test_images(job.run_dir, limit=8), threads=job.settings.bench_threads,
                       runs=job.settings.bench_runs, warmup=3)
    paths = write_report(report, job.out / "bench")
    job.summary["bench"] = _bench_summary(report)
    job.summary["machine"] = report.get("machine", {})
    files = [paths.get(k) for k in ("md", "json", "png") if paths.get(k)]
    stage.outputs = {Path(p).name: str(Path(p).relative_to(job.out)) for p in files if Path(p).exists()}
    if any(m.get("status") == "error" for m in report.get("models", [])):
        raise LungedgeError("some models failed to benchmark (see bench/bench_report.md)")


def _evaluate(stage: Stage, job: _Job) -> None:
    """The shipped file on every test image, as the device runs it: metrics, confusion matrix, ROC."""
    from lungedge.edge_runtime import Classifier, learning_floor
    from lungedge.train.run_report import plot_confusion, plot_roc

    ship = job.summary.get("ship")
    if not ship:
        raise LungedgeError("no variant passed the gate: nothing to ship")
    from lungedge.train.runfolder import load_run

    run = load_run(job.run_dir)
    test = run.split("test")
    clf = Classifier(job.run_dir / f"model_{ship}.tflite")
    import numpy as np

    from lungedge.edge_runtime.metrics import classification_metrics

    from lungedge.edge_runtime.classifier import Refusal

    probs, truth, pred_idx, examples, accepted = [], [], [], [], []
    for path, y in zip(test.paths, test.labels):
        result = clf.classify(path)
        refused = isinstance(result, Refusal)
        # the learning floor and the figures judge every test image (a refused one with the class the
        # model would have given); the accepted ones are counted for the coverage
        pred = result.hidden if refused else result
        accepted.append(not refused)
        probs.append([pred.probabilities[n] for n in clf.labels])
        truth.append(y)
        pred_idx.append(list(clf.labels).index(pred.label))
        if not refused and sum(1 for e in examples if e["truth"] == run.spec.labels[y]) < 3:
            examples.append({"image": Path(path).name, "truth": run.spec.labels[y], "predicted": pred.label,
                             "probabilities": pred.probabilities, "ms": round(pred.total_ms, 2)})
    probs = np.asarray(probs)
    m = classification_metrics(truth, pred_idx, list(clf.labels), probs)
    verdict = learning_floor.judge(truth, pred_idx, list(clf.labels))
    plots = job.out / "shipped"
    plots.mkdir(exist_ok=True)
    plot_confusion(plots / "confusion_matrix.png", m["confusion_matrix"], clf.labels,
                   f"model_{ship}.tflite: {len(truth)} test images")
    plot_roc(plots / "roc.png", np.asarray(truth), probs, clf.labels, f"model_{ship}.tflite: test ROC")
    job.summary["shipped"] = {
        "variant": ship, "file": f"run/model_{ship}.tflite", "backend": clf.backend.describe(),
        "size_bytes": clf.model_size, "accuracy": m["accuracy"], "learning_floor": verdict.to_dict(),
        "per_class_recall": {n: c["recall"] for n, c in m["per_class"].items()},
        "auc": (m.get("auc") or {}).get("macro"), "probability_std": float(probs.std(axis=0).max()),
        "examples": examples, "refused_out_of_domain": int(len(accepted) - sum(accepted)),
        "coverage": float(np.mean(accepted)) if accepted else None}
    stage.outputs = {"confusion_matrix.png": "shipped/confusion_matrix.png", "roc.png": "shipped/roc.png"}
    if verdict.failed:
        raise LungedgeError(f"model_{ship}.tflite: {verdict.sentence()}")


# ---- small helpers -----------------------------------------------------------------------
def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _existing(run_dir: Path, names: List[str]) -> Dict[str, str]:
    return {n: f"run/{n}" for n in names if (run_dir / n).is_file()}


def _pngs(run_dir: Path) -> Dict[str, str]:
    return {str(p.relative_to(run_dir)): f"run/{p.relative_to(run_dir)}" for p in sorted(run_dir.rglob("*.png"))
            if not p.name.startswith("quantization")}


def _test_images(run_dir: Path, limit: int) -> List[str]:
    """A few test-split images, classes alternating, in a fixed order (from the run's manifest)."""
    from lungedge.train.runfolder import load_run

    run = load_run(run_dir)
    test = run.split("test")
    by_class: Dict[int, list] = {}
    for p, y in zip(test.paths, test.labels):
        by_class.setdefault(y, []).append(p)
    picked: List[str] = []
    while len(picked) < limit and any(by_class.values()):
        for y in sorted(by_class):
            if by_class[y] and len(picked) < limit:
                picked.append(by_class[y].pop(0))
    return picked


def _quant_summary(report: dict) -> list:
    keys = ("variant", "size_bytes", "size_ratio", "accuracy", "correct", "n", "accuracy_ci95", "learning_floor",
            "top1_agreement", "gate", "gate_reasons", "input_dtype", "output_dtype", "domain")
    return [{k: v.get(k) for k in keys} for v in report.get("variants") or []]


def _bench_summary(report: dict) -> list:
    rows = []
    for m in report.get("models", []):
        for r in m.get("runs", []):
            rows.append({"model": Path(m.get("model", "")).name, "threads": r.get("threads"),
                         "invoke_p50_ms": (r.get("invoke") or {}).get("p50_ms"),
                         "e2e_p50_ms": (r.get("end_to_end") or {}).get("p50_ms"),
                         "backend": m.get("backend")})
    return rows

"""The whole job in one call: train, convert, gate, benchmark, classify, and one report folder.

Stages run in order; a failing stage stops the pipeline with a clear message, keeps what the
earlier stages wrote, and the index says which stage failed and why.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from edge_runtime.data import atomic_write_text
from edge_runtime.errors import LungedgeError

DEFAULT_VARIANTS = ("float32", "float16", "int8", "int8-mixed")
#: Integer variants in order of preference for shipping: fastest first.
_INTEGER_PREFERENCE = ("int8", "int8-float-io", "int8-mixed")


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


def run_pipeline(
    recipe,
    data_dir: str,
    out_dir: str,
    *,
    overrides: Optional[dict] = None,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    test_data: Optional[str] = None,
    calibration_count: int = 200,
    bench_runs: int = 30,
    bench_threads: Sequence[int] = (1, 2),
    gate: bool = True,
    title: str = "lungedge pipeline",
    notes: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> PipelineResult:
    """Train ``recipe_name`` on ``data_dir``, convert to ``variants``, benchmark, classify, report.

    Args:
        recipe: a ``train.recipes.Recipe``, or the name of one (``train.recipes.RECIPES``).
        data_dir: class-folder dataset.
        out_dir: the report folder (created); the training run is ``out_dir/run``.
        overrides: recipe fields to change (with a recipe name).
        test_data: a labelled folder for the quantisation report (default: the run's test split).
        gate: a quantised variant that loses too much accuracy fails the convert stage.
        notes: lines added to the top of the index (e.g. how the data was made).

    Returns:
        A ``PipelineResult``; ``.ok`` is False when any stage failed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    stages = [Stage("train"), Stage("convert"), Stage("benchmark"), Stage("classify")]
    recipe_name = recipe if isinstance(recipe, str) else recipe.name
    summary: dict = {"recipe": recipe_name, "data": str(data_dir), "variants": list(variants), "notes": list(notes)}

    def do(stage: Stage, fn: Callable[[], None]) -> bool:
        log(f"== {stage.name} ==")
        t0 = time.perf_counter()
        try:
            fn()
            if stage.status == "not run":
                stage.status = "passed"
        except LungedgeError as exc:
            stage.status, stage.message = "failed", str(exc)
        except Exception as exc:  # a bug or an environment problem: still keep earlier results
            stage.status, stage.message = "failed", f"{type(exc).__name__}: {exc}"
        stage.seconds = time.perf_counter() - t0
        if stage.status != "passed":
            log(f"{stage.name} stage {stage.status}: {stage.message}")
        return stage.status == "passed"

    def train_stage() -> None:
        from train.recipes import get_recipe
        from train.run import train_run

        resolved = get_recipe(recipe, **(overrides or {})) if isinstance(recipe, str) else recipe
        summary["recipe_resolved"] = resolved.to_dict()
        train_run(resolved, data_dir, run_dir)
        metrics = _read_json(run_dir / "metrics.json")
        summary["train_metrics"] = metrics
        stages[0].outputs = _existing(run_dir, ["model_card.md", "metrics.json", "recipe.json", "spec.json",
                                                "split_manifest.csv", "history.csv"]) | _pngs(run_dir)

    def convert_stage() -> None:
        from convert.run import convert_run

        report = convert_run(run_dir, variants=tuple(variants), data_dir=test_data,
                             calibration_count=calibration_count, progress=True)
        summary["quantization"] = _quant_summary(report)
        stages[1].outputs = _existing(run_dir, ["quantization_report.md", "quantization_report.json",
                                                "quantization_report.png"] + [f"model_{v}.tflite" for v in variants])
        gates = {v.get("variant"): v.get("gate") for v in report.get("variants") or []}
        failed = [v for v, g in gates.items() if g != "passed"]
        integer = [v for v in _INTEGER_PREFERENCE if v in gates]
        shippable = next((v for v in integer if gates[v] == "passed"), None)
        summary["shippable_integer_variant"] = shippable
        # The gate asks for a small model that keeps the Keras model's accuracy: every float
        # variant must pass, and at least one integer variant (the first passing one is shipped).
        blocking = [v for v in failed if v not in integer] + (integer if integer and not shippable else [])
        if failed:
            stages[1].message = (f"gate failed for {', '.join(failed)}"
                                 + (f"; {shippable} passed and is the integer model to ship" if shippable else "")
                                 + " (see quantization_report.md)")
        if blocking and gate:
            stages[1].status = "gate failed"

    def bench_stage() -> None:
        from edge_runtime.bench import run_bench, write_report

        models = [str(run_dir / f"model_{v}.tflite") for v in variants if (run_dir / f"model_{v}.tflite").is_file()]
        images = _test_images(run_dir, limit=8)
        report = run_bench(models, images=images, threads=tuple(bench_threads), runs=bench_runs, warmup=3)
        paths = write_report(report, out / "bench")
        summary["bench"] = _bench_summary(report)
        files = [paths.get(k) for k in ("md", "json", "png") if paths.get(k)]
        stages[2].outputs = {Path(p).name: str(Path(p).relative_to(out)) for p in files if Path(p).exists()}
        if any(m.get("status") == "error" for m in report.get("models", [])):
            raise LungedgeError("some models failed to benchmark (see bench/bench_report.md)")

    def classify_stage() -> None:
        from edge_runtime import Classifier

        order = [summary.get("shippable_integer_variant")] + list(_INTEGER_PREFERENCE) + list(variants)
        best = next((run_dir / f"model_{v}.tflite" for v in order
                     if v and (run_dir / f"model_{v}.tflite").is_file()), None)
        if best is None:
            raise LungedgeError("no converted model to classify with")
        clf = Classifier(best)
        rows = []
        for path, truth in _test_images(run_dir, limit=6, with_labels=True):
            pred = clf.classify(path)
            rows.append({"image": path, "truth": truth, "predicted": pred.label,
                         "probabilities": pred.probabilities, "ms": round(pred.total_ms, 2)})
        summary["classify_examples"] = {"model": best.name, "backend": clf.backend.describe(), "rows": rows}

    for stage, fn in zip(stages, (train_stage, convert_stage, bench_stage, classify_stage)):
        if not do(stage, fn):
            # a gate failure still leaves usable files: benchmark and classify them, report the failure
            if not (stage.name == "convert" and stage.status == "gate failed"):
                break
    summary["stages"] = [s.__dict__ for s in stages]
    atomic_write_text(str(out / "summary.json"), json.dumps(summary, indent=2, default=str))
    index = write_index(out, title, stages, summary)
    return PipelineResult(out, stages, index, summary)


# ---- report index ------------------------------------------------------------------------
def write_index(out: Path, title: str, stages: List[Stage], summary: dict) -> Path:
    """Write ``index.md`` and ``index.html`` linking every artefact; returns the HTML path."""
    rel_run = "run"
    md = [f"# {title}", ""]
    for n in summary.get("notes", []):
        md.append(f"> {n}")
    md += ["", f"Recipe `{summary['recipe']}`, data `{summary['data']}`.", "", "## Stages", "",
           "| stage | status | time (s) | message |", "|---|---|---|---|"]
    for s in stages:
        md.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.message or ''} |")
    links: List[tuple] = []
    for s in stages:
        for name, rel in s.outputs.items():
            links.append((s.name, name, rel))
    md += ["", "## Files", ""]
    for stage, name, rel in links:
        md.append(f"- {stage}: [{name}]({rel})")
    q = summary.get("quantization")
    if q:
        md += ["", "## Quantisation", "", "| variant | size (bytes) | size ratio | accuracy | agreement | gate |",
               "|---|---|---|---|---|---|"]
        for v in q:
            md.append(f"| {v['variant']} | {v.get('size_bytes', '')} | {_f(v.get('size_ratio'))} | {_f(v.get('accuracy'))} "
                      f"| {_f(v.get('agreement'))} | {v.get('gate', '')} |")
    b = summary.get("bench")
    if b:
        md += ["", "## Latency (this machine)", "", "| model | threads | invoke p50 ms | end-to-end p50 ms | backend |",
               "|---|---|---|---|---|"]
        for r in b:
            md.append(f"| {r['model']} | {r['threads']} | {_f(r.get('invoke_p50_ms'), 2)} | {_f(r.get('e2e_p50_ms'), 2)} | {r.get('backend', '')} |")
    ex = summary.get("classify_examples")
    if ex:
        md += ["", f"## Example classifications ({ex['model']}, {ex['backend']})", "",
               "| image | truth | predicted | ms |", "|---|---|---|---|"]
        for r in ex["rows"]:
            md.append(f"| {Path(r['image']).name} | {r['truth']} | {r['predicted']} | {r['ms']} |")
    md.append("")
    atomic_write_text(str(out / "index.md"), "\n".join(md))
    pngs = [rel for _, name, rel in links if rel.endswith(".png")]
    body = _md_to_html("\n".join(md)) + "".join(
        f'<figure><img src="{html.escape(p)}" style="max-width:720px"><figcaption>{html.escape(p)}</figcaption></figure>'
        for p in pngs)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}</style></head>"
            f"<body>{body}</body></html>")
    atomic_write_text(str(out / "index.html"), page)
    return out / "index.html"


def _md_to_html(md: str) -> str:
    """Just enough Markdown (headings, tables, lists, links, quotes) for the index."""
    import re

    out, in_table = [], False
    for line in md.splitlines():
        esc = html.escape(line)
        esc = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', esc)
        esc = re.sub(r"`([^`]+)`", r"<code>\1</code>", esc)
        if line.startswith("|"):
            cells = [c.strip() for c in esc.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("# "):
            out.append(f"<h1>{esc[2:]}</h1>")
        elif line.startswith("## "):
            out.append(f"<h2>{esc[3:]}</h2>")
        elif line.startswith("- "):
            out.append(f"<li>{esc[2:]}</li>")
        elif line.startswith("&gt; "):
            out.append(f"<blockquote>{esc[5:]}</blockquote>")
        elif line.strip():
            out.append(f"<p>{esc}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out)


# ---- small helpers -----------------------------------------------------------------------
def _f(v, digits: int = 4) -> str:
    return "" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


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


def _test_images(run_dir: Path, limit: int, with_labels: bool = False):
    """A few test-split images of each class, in a fixed order (from the run's manifest)."""
    from convert.runfolder import load_run

    run = load_run(run_dir)
    test = run.split("test")
    by_class: Dict[str, list] = {}
    for p, y in zip(test.paths, test.labels):
        by_class.setdefault(run.spec.labels[y], []).append(p)
    picked = []
    while len(picked) < limit and any(by_class.values()):
        for lab in sorted(by_class):
            if by_class[lab] and len(picked) < limit:
                picked.append((by_class[lab].pop(0), lab))
    return picked if with_labels else [p for p, _ in picked]


def _quant_summary(report: dict) -> list:
    out = []
    for v in report.get("variants") or []:
        out.append({"variant": v.get("variant"), "size_bytes": v.get("size_bytes"), "size_ratio": v.get("size_ratio"),
                    "accuracy": v.get("accuracy"), "agreement": v.get("top1_agreement"), "gate": v.get("gate")})
    return out


def _bench_summary(report: dict) -> list:
    rows = []
    for m in report.get("models", []):
        for r in m.get("runs", []):
            rows.append({"model": Path(m.get("model", "")).name, "threads": r.get("threads"),
                         "invoke_p50_ms": (r.get("invoke") or {}).get("p50_ms"),
                         "e2e_p50_ms": (r.get("end_to_end") or {}).get("p50_ms"),
                         "backend": m.get("backend")})
    return rows

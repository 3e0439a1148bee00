"""Benchmark reports: JSON, a Markdown table, a PNG chart, and comparisons across machines.

The measuring is ``edge_runtime.bench`` (on the device); the reports live here, with the command
line, so the device package stays small.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import List, Sequence

from lungedge.edge_runtime.bench import SCHEMA
from lungedge.edge_runtime.errors import ConfigError

REPORT_NAME = "bench_report"
COMPARE_NAME = "compare_report"

def write_report(report: dict, out_dir: str, name: str = REPORT_NAME) -> dict:
    """Write ``NAME.json``, ``NAME.md`` and (if matplotlib is installed) ``NAME.png``.

    Returns:
        ``{"json": path, "md": path, "png": path or None, "png_skipped": reason or None}``.
    """
    from lungedge.edge_runtime.atomic_write import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / f"{name}.json"), "md": str(out / f"{name}.md"), "png": None, "png_skipped": None}
    atomic_write_text(paths["json"], json.dumps(report, indent=1))
    atomic_write_text(paths["md"], format_markdown(report))
    rows = report_rows(report)
    try:
        from .bench_plot import plot_rows

        plot_rows(rows, str(out / f"{name}.png"), title=_title(report))
        paths["png"] = str(out / f"{name}.png")
        trade = tradeoff_rows(report) if report.get("kind") != "comparison" else []
        if trade:
            from .bench_plot import plot_tradeoff

            paths["tradeoff_png"] = plot_tradeoff(trade, str(out / "bench_tradeoff.png"),
                                                  title=_title(report), note=cpu_features_text(report.get("machine", {})))
    except ImportError as exc:
        paths["png_skipped"] = f"matplotlib not installed ({exc.name or exc}); PNG chart skipped"
    return paths


def load_report(path: str) -> dict:
    """Read a bench report JSON, checking its schema.

    Raises:
        ConfigError: missing, not JSON, or not a ``lungedge.bench/1`` report.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"report not found: {str(p)!r}")
    try:
        report = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not a JSON report: {str(p)!r} ({exc})") from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        got = report.get("schema") if isinstance(report, dict) else type(report).__name__
        raise ConfigError(f"not a {SCHEMA} report (schema {got!r}): {str(p)!r}")
    return report


def compare_reports(paths: Sequence[str], out_dir: str) -> dict:
    """Merge reports from several machines (or backends) into one table and chart.

    Writes ``compare_report.{json,md,png}`` in ``out_dir``; the JSON keeps every input
    report whole under ``reports``. Returns the paths, as ``write_report``.

    Raises:
        ConfigError: fewer than one report, or a file that is not a bench report.
    """
    if not paths:
        raise ConfigError("no reports given to compare")
    reports = [load_report(p) for p in paths]
    for p, r in zip(paths, reports):  # bench_report.json files from several machines differ by folder
        r["_label"] = _machine_label(r, f"{Path(p).parent.name}/{Path(p).stem}")
    merged = {"schema": SCHEMA, "kind": "comparison",
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "sources": [str(p) for p in paths], "reports": reports}
    return write_report(merged, out_dir, name=COMPARE_NAME)


def _machine_label(report: dict, stem: str) -> str:
    m = report.get("machine", {})
    return f"{m.get('hostname', '?')}/{m.get('arch', '?')} ({stem})"


def report_rows(report: dict) -> List[dict]:
    """One flat row per model x threads (errors included), for tables and charts."""
    if report.get("kind") == "comparison":
        rows = []
        for r in report["reports"]:
            for row in report_rows(r):
                rows.append({**row, "machine": r.get("_label") or _machine_label(r, "?")})
        return rows
    machine = report.get("machine", {})
    rows = []
    for m in report.get("models", []):
        base = {"machine": f"{machine.get('hostname', '?')}/{machine.get('arch', '?')}", "model": m.get("name"),
                "variant": m.get("variant"), "backend": m.get("backend"), "backend_version": m.get("backend_version"),
                "size_mb": (m["size_bytes"] / 1e6) if m.get("size_bytes") else None,
                "sha256": (m.get("sha256") or "")[:12], "peak_rss_mb": m.get("peak_rss_mb"),
                "accuracy": (m.get("accuracy") or {}).get("accuracy"),
                "image_failures": len((m.get("images") or {}).get("failures", [])),
                "error": m.get("error")}
        if not m.get("runs"):
            rows.append({**base, "threads": None})
        for r in m.get("runs", []):
            rows.append({**base, "threads": r["threads"], "delegate_nodes": r.get("delegate_nodes"),
                         "startup_ms": r.get("startup_ms"), "first_invoke_ms": r.get("first_invoke_ms"),
                         "first_classify_ms": r.get("first_classify_ms"),
                         "invoke": r.get("invoke"), "end_to_end": r.get("end_to_end"),
                         "classify_decoded": r.get("classify_decoded"), "preprocess": r.get("preprocess"),
                         "throughput_ips": r.get("throughput_ips"), "pipelined_ips": r.get("pipelined_ips"),
                         "workers": r.get("workers")})
    return rows


def tradeoff_rows(report: dict) -> List[dict]:
    """Per model that ran with accuracy measured (``--data``): accuracy, agreement with the
    reference model's labels image by image (the float32 variant, else the largest file), size,
    and p50 latencies at the lowest thread count. Empty without accuracy."""
    models = [m for m in report.get("models", []) if m.get("status") == "ok"
              and (m.get("accuracy") or {}).get("accuracy") is not None and m.get("runs")]
    if not models:
        return []
    ref = next((m for m in models if m.get("variant") == "float32"), None) or max(models, key=lambda m: m.get("size_bytes") or 0)
    ref_pred = ref["accuracy"].get("predictions")
    rows = []
    for m in models:
        run = min(m["runs"], key=lambda r: r["threads"])
        pred = m["accuracy"].get("predictions")
        agree = None
        if pred and ref_pred and len(pred) == len(ref_pred):
            pairs = [(a, b) for a, b in zip(pred, ref_pred) if a is not None and b is not None]
            agree = sum(a == b for a, b in pairs) / len(pairs) if pairs else None
        rows.append({"model": m.get("name"), "variant": m.get("variant"), "accuracy": m["accuracy"]["accuracy"],
                     "majority_rate": m["accuracy"].get("majority_rate"),
                     "n": m["accuracy"].get("n"), "agreement": agree, "reference": ref.get("name"),
                     "size_mb": (m.get("size_bytes") or 0) / 1e6, "threads": run["threads"],
                     "invoke_p50_ms": (run.get("invoke") or {}).get("p50_ms"),
                     "e2e_p50_ms": (run.get("end_to_end") or {}).get("p50_ms")})
    return sorted(rows, key=lambda r: (r["invoke_p50_ms"] or 0))


def _data_name(report: dict) -> str:
    return next((m["accuracy"].get("data") for m in report.get("models", []) if m.get("accuracy")), "?")


def cpu_features_text(machine: dict) -> str:
    """One line: the CPU features that decide int8 speed, present and absent, as read."""
    f = machine.get("cpu_features") or {}
    if not f or not f.get("read"):
        return "CPU features: not readable on this system (no /proc/cpuinfo flags)"
    notes = f.get("notes", {})
    have = "; ".join(notes.get(k, k) for k in f.get("present", [])) or "none of them"
    lack = ", ".join(f.get("absent", [])) or "none"
    return f"int8-relevant CPU features ({f.get('arch')}): {have}. Absent: {lack}."


def format_tradeoff(report: dict) -> List[str]:
    rows = tradeoff_rows(report)
    if not rows:
        return []
    lines = ["", "## Trade-off: accuracy, agreement, size and latency per variant", "",
             f"Accuracy on `{_data_name(report)}` ({rows[0]['n']} images; always answering the most frequent "
             f"class would score {_f(rows[0]['majority_rate'], '{:.2%}')}). Agreement: the share of images given "
             f"the same label as `{rows[0]['reference']}`. Latency at {rows[0]['threads']} thread(s). "
             "Chart: `bench_tradeoff.png`.", "",
             "| model | variant | accuracy | images | agreement | size MB | invoke p50 ms | e2e p50 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant'] or ''} | {_f(r['accuracy'], '{:.2%}')} | {r['n']} | "
                     f"{_f(r['agreement'], '{:.2%}')} | {r['size_mb']:.2f} | {_f(r['invoke_p50_ms'])} | "
                     f"{_f(r['e2e_p50_ms'])} |")
    lines += ["", cpu_features_text(report.get("machine", {})),
              "Integer kernels gain most where the CPU multiplies int8 in one instruction (VNNI/AMX on x86, "
              "the dot-product and i8mm extensions on ARM); without them int8 can be slower than float32 "
              "at the same thread count, even though the file is a quarter of the size."]
    return lines


def _f(x, fmt="{:.2f}") -> str:
    return "" if x is None else fmt.format(x)


def format_markdown(report: dict) -> str:
    """The report as a Markdown table (one row per model x threads) with its context."""
    rows = report_rows(report)
    comparison = report.get("kind") == "comparison"
    lines = [f"# {_title(report)}", ""]
    sources = report["reports"] if comparison else [report]
    for r in sources:
        m, s = r.get("machine", {}), r.get("settings", {})
        label = f"**{r.get('_label')}**: " if comparison else ""
        lines.append(f"- {label}{m.get('cpu')}, {m.get('cores')} cores, {m.get('arch')}, {m.get('os')}, "
                     f"Python {m.get('python')}, numpy {m.get('numpy')}; load average before/after "
                     f"{(r.get('load_avg') or {}).get('before')} / {(r.get('load_avg') or {}).get('after')}; "
                     f"{s.get('runs')} runs after {s.get('warmup')} warm-up; images: {_images_text(s)}; "
                     f"created {r.get('created')}")
        lines.append(f"  {cpu_features_text(m)}")
    lines += ["", "Times in ms (p50 / p90 / p99 of raw timings). invoke = `interpreter.invoke()` alone; "
              "e2e = `Classifier.classify(path)`: decode + preprocess + invoke + postprocess, one image at a time; "
              "img/s (folder) = `lungedge classify FOLDER`'s path: decoding on N worker threads overlapping invoke. "
              "Delegate nodes: graph nodes taken by XNNPACK (0 = none: every op on the reference kernels).", ""]
    with_accuracy = any(r.get("accuracy") is not None for r in rows)  # only with --data
    head = (["machine"] if comparison else []) + [
        "model", "variant", "backend", "threads", "delegate nodes", "invoke p50 / p90 / p99", "e2e p50 / p90 / p99",
        "img/s (e2e)", "img/s (folder, N workers)", "start-up", "1st invoke", "1st image", "peak RSS MB", "size MB", "sha256"] + (
        ["accuracy"] if with_accuracy else []) + ["status"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        inv, e2e = r.get("invoke") or {}, r.get("end_to_end") or {}
        status = "ok" if not r.get("error") else "FAILED: " + r["error"].replace("|", "\\|")
        if not r.get("error") and r.get("image_failures"):
            status = f"ok ({r['image_failures']} bad images skipped)"
        cells = ([r["machine"]] if comparison else []) + [
            str(r.get("model")), str(r.get("variant") or ""),
            f"{r.get('backend') or ''} {r.get('backend_version') or ''}".strip(), _f(r.get("threads"), "{}"),
            _f(r.get("delegate_nodes"), "{}"), _triple(inv), _triple(e2e), _f(r.get("throughput_ips"), "{:.1f}"),
            "" if r.get("pipelined_ips") is None else f"{r['pipelined_ips']:.1f} ({r.get('workers')})",
            _f(r.get("startup_ms"), "{:.1f}"), _f(r.get("first_invoke_ms"), "{:.1f}"),
            _f(r.get("first_classify_ms"), "{:.1f}"), _f(r.get("peak_rss_mb"), "{:.0f}"), _f(r.get("size_mb")),
            r.get("sha256") or ""] + ([_f(r.get("accuracy"), "{:.3f}")] if with_accuracy else []) + [status]
        lines.append("| " + " | ".join(cells) + " |")
    acc_errors = [(m.get("name"), m["accuracy"]["error"]) for r in sources for m in r.get("models", [])
                  if (m.get("accuracy") or {}).get("error")]
    if acc_errors:
        lines += ["", "Accuracy not measured:", ""] + [f"- {name}: {err}" for name, err in acc_errors]
    if not comparison:
        lines += format_tradeoff(report)
    lines += _domain_lines(sources)
    bad = [(m.get("name"), f) for r in sources for m in r.get("models", [])
           for f in (m.get("images") or {}).get("failures", [])]
    if bad:
        lines += ["", "Images that could not be read (left out of the timings):", ""]
        seen = set()
        for _, f in bad:
            if f["source"] not in seen:
                seen.add(f["source"])
                lines.append(f"- `{f['source']}`: {f['error']}")
    return "\n".join(lines) + "\n"


def _triple(s: dict) -> str:
    if not s:
        return ""
    return f"{s['p50_ms']:.2f} / {s['p90_ms']:.2f} / {s['p99_ms']:.2f}"


def _images_text(settings: dict) -> str:
    imgs = settings.get("images")
    return "synthetic JPEG" if imgs is None else ", ".join(str(x) for x in imgs)


def _title(report: dict) -> str:
    if report.get("kind") == "comparison":
        return f"lungedge bench comparison ({len(report['reports'])} reports)"
    m = report.get("machine", {})
    return f"lungedge bench on {m.get('cpu')} ({m.get('cores')} cores, {m.get('arch')}, host {m.get('hostname')})"


def _domain_lines(sources) -> List[str]:
    """Each model's domain gate: its threshold and the refusal rates measured at conversion
    (validation split, development out-of-domain sets), as its record states them."""
    lines, seen = [], set()
    for r in sources:
        for m in r.get("models", []):
            if (m.get("name"), m.get("sha256")) in seen:  # the same file on several machines: once
                continue
            seen.add((m.get("name"), m.get("sha256")))
            gate = m.get("domain")
            if m.get("status", "ok") != "ok" and gate is None:
                continue
            if not gate:
                lines.append(f"- {m.get('name')}: no domain gate (answers every image)")
                continue
            rates = ", ".join(f"{k} {100 * v:.1f} %" for k, v in (gate.get("refusal") or {}).items()
                              if isinstance(v, (int, float)))
            lines.append(f"- {m.get('name')}: refuses above {gate['threshold']:.4g} ({gate['method']}); refused at "
                         f"conversion: {rates or 'not recorded'}")
    return (["", "## Domain gate (refusal rates measured at conversion, from each file's record)", ""] + lines
            if lines else [])

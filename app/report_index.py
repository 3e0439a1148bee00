"""The pipeline's report index (``index.md`` and ``index.html``), written from ``summary.json``'s content.

The top answers the user's question (which file to ship, why, its accuracy with counts and an
interval next to the majority-class rate, its size and latency on the named CPU); the details
follow. The HTML is the Markdown rendered by markdown-it-py (tables included).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import List, Optional

from lungedge.edge_runtime.atomic_write import atomic_write_text

_CSS = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;line-height:1.45}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "blockquote{color:#444;border-left:4px solid #ccc;margin:.5em 0;padding:.1em 1em}"
        "img{max-width:100%;border:1px solid #eee}code{background:#f4f4f4;padding:0 3px}"
        ".ship{background:#eef8ee;border:1px solid #9c9;padding:.2em 1em}.noship{background:#fbeeee;"
        "border:1px solid #c99;padding:.2em 1em}")


def write_index(out: Path, title: str, stages, summary: dict) -> Path:
    """Write ``index.md`` and ``index.html`` into ``out``; returns the HTML path."""
    md = index_markdown(title, stages, summary)
    atomic_write_text(str(out / "index.md"), md)
    atomic_write_text(str(out / "index.html"), render_html(md, title, shipped=bool(summary.get("ship"))))
    return out / "index.html"


def render_html(md: str, title: str, shipped: bool) -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    # the recommendation section gets a coloured box
    body = body.replace("<h2>Recommendation</h2>", f'<div class="{"ship" if shipped else "noship"}">'
                        "<h2>Recommendation</h2>", 1)
    end = body.find("<blockquote>") if "<blockquote>" in body else body.find("<h2>Stages</h2>")
    body = body[:end] + "</div>\n" + body[end:]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def index_markdown(title: str, stages, summary: dict) -> str:
    lines = [f"# {title}", ""] + _recommendation(summary)
    for n in summary.get("notes", []):
        lines += [f"> {n}", ""]
    lines += ["## Stages", "", "| stage | status | time (s) | message |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {_cell(s.message)} |" for s in stages]
    lines += _variants(summary) + _latency(summary) + _examples(summary) + _figures(stages) + _files(stages)
    return "\n".join(lines) + "\n"


def _recommendation(summary: dict) -> List[str]:
    lines = ["## Recommendation", ""]
    facts = summary.get("facts", {})
    weights = facts.get("weights_sentence")
    ship, shipped = summary.get("ship"), summary.get("shipped")
    train_floor = (summary.get("train_metrics") or {}).get("learning_floor")
    if not ship or not shipped:
        why = summary.get("gate", {}).get("message") or (train_floor or {}).get("sentence") or \
            next((f"the {s['name']} stage {s['status']}: {s['message']}" for s in summary.get("stages", [])
                  if s["status"] not in ("passed", "not run")), "a stage failed")
        lines += [f"**Nothing to ship.** {_cell(why)}", ""]
        if weights:
            lines += [f"Weights: {weights}", ""]
        return lines
    fl = shipped["learning_floor"]
    lo, hi = fl["accuracy_ci95"]
    keras = (summary.get("keras") or {}).get("accuracy")
    q = next((v for v in summary.get("quantization", []) if v["variant"] == ship), {})
    lines += [f"**Ship `{shipped['file']}`** ({ship}: {_variant_description(ship)}).", "",
              f"- Why: {summary['gate']['message']} (gate: learned, at most {summary['gate']['max_accuracy_drop']:g} "
              f"accuracy points and {summary['gate']['max_recall_drop']:g} recall points below Keras).",
              f"- Accuracy of this file on the {fl['n']} test images: **{100 * fl['accuracy']:.2f} %** "
              f"({fl['correct']}/{fl['n']}, 95 % CI {100 * lo:.1f}-{100 * hi:.1f} %), against a majority-class rate of "
              f"{100 * fl['majority_rate']:.2f} % (always '{fl['majority_label']}'): {fl['status']} "
              f"(one-sided binomial p = {fl['p_value']:.2g})."
              + (f" The Keras model scored {100 * keras:.2f} %." if keras is not None else "")
              + f" One test image is {100 / max(fl['n'], 1):.2f} points.",
              f"- Size: {_mb(shipped['size_bytes'])}" + (f" ({q['size_ratio']:.3f}x float32)" if q.get("size_ratio") else "")
              + "; " + _latency_sentence(summary, ship)]
    lines.append("- " + domain_sentence(q.get("domain")))
    if shipped.get("refused_out_of_domain") is not None:
        lines.append(f"- On the {fl['n']} test images the shipped file's domain gate refused "
                     f"{shipped['refused_out_of_domain']} (coverage {100 * (shipped.get('coverage') or 0):.1f} %); "
                     "the accuracy above counts them with the class the model would have given.")
    if weights:
        lines.append(f"- Weights: {weights}")
    return lines + [""]


def domain_sentence(d: Optional[dict]) -> str:
    """The domain gate of one converted file in one sentence: refusal on validation, test and the
    development out-of-domain sets (``convert.conversion``'s ``domain`` row)."""
    if not d or d.get("gate") != "on":
        return "Domain gate: none: this file answers every image, whatever it shows."
    dev = ", ".join(f"{k} {100 * v['refused']:.0f} % of {v['n']}" for k, v in (d.get("dev_sets") or {}).items()
                    if v.get("refused") is not None)
    val = d.get("validation_refused")
    acc = (d.get("accepted") or {}).get("accuracy")
    return (f"Domain gate: refuses images unlike its training images (score > {d['threshold']:.4g}); refused "
            + (f"{100 * val:.1f} % of the validation images, " if val is not None else "")
            + f"{100 * d['test_refused']:.1f} % of the test images ({d['test_refused_n']})"
            + (f"; of the development out-of-domain sets: {dev}" if dev else "")
            + (f". Accuracy on the accepted test images {100 * acc:.2f} %." if acc is not None else "."))


def _latency_sentence(summary: dict, variant: str) -> str:
    rows = [r for r in summary.get("bench", []) if r["model"] == f"model_{variant}.tflite"]
    if not rows:
        return "latency not measured."
    m = summary.get("machine", {})
    parts = [f"{r['invoke_p50_ms']:.2f} ms at {r['threads']} thread{'s' if r['threads'] > 1 else ''}"
             for r in rows if r.get("invoke_p50_ms") is not None]
    return (f"invoke p50 {', '.join(parts)} on {m.get('cpu', 'this CPU')} ({m.get('cores', '?')} cores, "
            f"{rows[0].get('backend', '')}).")


def _variants(summary: dict) -> List[str]:
    q = summary.get("quantization")
    if not q:
        return []
    t = summary.get("test", {})
    counts = ", ".join(f"{k} {v}" for k, v in (t.get("class_counts") or {}).items())
    lines = ["", "## Variants", "", f"Judged on {t.get('n')} test images ({t.get('note', '')}; {counts}).", "",
             "| variant | what | size | x float32 | accuracy (correct/n) | 95 % CI | vs Keras (pts) | "
             "agreement with Keras | learned | gate |", "|---|---|---|---|---|---|---|---|---|---|"]
    keras = (summary.get("keras") or {}).get("accuracy") or 0.0
    for v in q:
        ci = v.get("accuracy_ci95") or [0, 0]
        gate = v["gate"] + (f": {'; '.join(v['gate_reasons'])}" if v.get("gate_reasons") else "")
        lines.append(f"| {v['variant']} | {_cell(_variant_description(v['variant']))} | {_mb(v['size_bytes'])} | "
                     f"{_num(v.get('size_ratio'), 3)} | {100 * v['accuracy']:.2f} % ({v.get('correct')}/{v.get('n')}) | "
                     f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f} % | {100 * (v['accuracy'] - keras):+.2f} | "
                     f"{_pct(v.get('top1_agreement'))} | {v.get('learning_floor')} | {_cell(gate)} |")
    return lines


def _latency(summary: dict) -> List[str]:
    b = summary.get("bench")
    if not b:
        return []
    m = summary.get("machine", {})
    lines = ["", f"## Latency on {m.get('cpu', '?')} ({m.get('cores', '?')} cores, {m.get('arch', '?')})", "",
             "| model | threads | invoke p50 ms | end-to-end p50 ms (decode + preprocess + invoke) | backend |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['threads']} | {_num(r.get('invoke_p50_ms'), 2)} | {_num(r.get('e2e_p50_ms'), 2)} "
              f"| {r.get('backend', '')} |" for r in b]
    return lines


def _examples(summary: dict) -> List[str]:
    s = summary.get("shipped")
    if not s:
        return []
    lines = ["", f"## Example classifications (model_{s['variant']}.tflite on {s['backend']})", "",
             "| image | truth | predicted | probabilities | ms |", "|---|---|---|---|---|"]
    for r in s["examples"]:
        probs = ", ".join(f"{k} {v:.3f}" for k, v in r["probabilities"].items())
        lines.append(f"| {r['image']} | {r['truth']} | {r['predicted']} | {probs} | {r['ms']} |")
    return lines


def _figures(stages) -> List[str]:
    order = ["shipped/confusion_matrix.png", "shipped/roc.png", "run/quantization_report.png",
             "run/plots/training_curves.png", "bench/bench_report.png"]
    present = {rel for s in stages for rel in s.outputs.values() if rel.endswith(".png")}
    figs = [p for p in order if p in present] + sorted(present - set(order))
    if not figs:
        return []
    lines = ["", "## Plots", ""]
    for p in figs:
        lines += [f"![{p}]({p})", ""]
    return lines


def _files(stages) -> List[str]:
    lines = ["", "## Files", ""]
    for s in stages:
        for name, rel in s.outputs.items():
            lines.append(f"- {s.name}: [{name}]({rel})")
    return lines


def _variant_description(name: str) -> str:
    from lungedge.convert.variants import VARIANTS

    v = VARIANTS.get(name)
    return v.description if v else name


def _cell(text: Optional[str]) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def _num(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"

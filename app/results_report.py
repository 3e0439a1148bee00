"""The results report: a CSV and an HTML page of results, with thumbnails and heat maps.

Used by ``lungedge classify --report DIR`` and by the web page (``lungedge serve``); numpy and
Pillow only (the device install). Every text that comes from a file (names, labels) is escaped
for HTML, and CSV cells that a spreadsheet would run as a formula are neutralised. No patient
data is written unless ``keep_phi`` (DICOM results are named by file and SOP Instance UID).
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

from PIL import Image

from lungedge.edge_runtime.results import Failure, Prediction, Refusal

NOT_A_DEVICE = ("Not a medical device. Research software: results are not a diagnosis and must not be used "
                "for clinical decisions without a qualified reader.")

#: Longest side of the thumbnails and heat-map images in reports and on the web page.
THUMB_SIDE = 256

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass
class Entry:
    """One input's result for a report: ``result`` is a Prediction, a Refusal or a Failure."""

    name: str
    result: object
    thumb_png: Optional[bytes] = None
    heatmap_png: Optional[bytes] = None


def model_facts(clf) -> dict:
    """The model facts every report repeats: file name, sha256, variant, decision rule, backend."""
    info = clf.describe()
    th = clf.spec.threshold if clf.use_threshold else None
    return {"model": os.path.basename(info["model"]), "sha256": info["sha256"], "variant": info["variant"] or "unknown",
            "decision": f"{th.label} if p >= {th.value:.3f}, else the most probable other class" if th else "most probable class",
            "threshold_label": th.label if th else "", "threshold": f"{th.value:.4f}" if th else "",
            "backend": f"{info['backend']} {info['backend_version']}", "labels": list(clf.labels),
            "heatmap": bool(info.get("heatmap")), "intended": info.get("intended") or {},
            "domain": _gate_text(info.get("domain"), info.get("domain_gate"))}


def _gate_text(gate: Optional[dict], state: Optional[str]) -> str:
    """The domain gate in words for the facts list."""
    if not gate:
        return "none: this model file answers every image (convert it again to add a gate)"
    refusal = gate.get("refusal") or {}
    val = refusal.get("validation")
    text = (f"refuses images unlike its training images (domain score > {gate['threshold']:.4g}, "
            f"{gate['method']}), and blank, saturated or odd-shaped frames"
            + (f"; {100 * val:.1f} % of its validation images refused" if isinstance(val, (int, float)) else ""))
    return text if state == "on" else text + " (turned off: --allow-out-of-domain, results marked)"


def summary_counts(entries) -> tuple:
    """(classified, refused, failed) among report entries."""
    refused = sum(1 for e in entries if is_refusal(e.result))
    ok = sum(1 for e in entries if isinstance(e.result, Prediction))
    return ok, refused, len(entries) - ok - refused


def is_refusal(result) -> bool:
    return isinstance(result, Refusal)


def images_for(source, prediction, name: Optional[str] = None, max_side: int = THUMB_SIDE) -> tuple:
    """(thumbnail PNG, heat-map overlay PNG or None) for one classified image."""
    from lungedge.edge_runtime.heatmap_overlay import display_pixels, overlay

    pixels = display_pixels(source, max_side=max_side, name=name)
    thumb = png_bytes(Image.fromarray(pixels))
    heat = None
    if getattr(prediction, "heatmap", None) is not None:
        heat = png_bytes(overlay(pixels, prediction.heatmap))
    return thumb, heat


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")  # Pillow writes no text chunks unless given pnginfo: nothing about the patient
    return buf.getvalue()


def safe_stem(name: str, index: int) -> str:
    """A file name for outputs about input ``index``: its stem reduced to [A-Za-z0-9._-], numbered."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(name)).stem)[:60].strip("._") or "image"
    return f"{index:04d}_{stem}"


def csv_rows(entries: Sequence[Entry], facts: dict, keep_phi: bool = False, image_files: bool = False) -> List[dict]:
    labels = facts["labels"]
    rows = []
    for i, e in enumerate(entries):
        r = e.result
        row = {"file": e.name, "sop_instance_uid": "", "label": "", **{f"p_{k}": "" for k in labels},
               "threshold_label": facts["threshold_label"], "threshold": facts["threshold"],
               "in_domain": "", "domain_score": "", "domain_threshold": "", "domain_reason": "", "error": ""}
        verdict = getattr(r, "verdict", None) or getattr(r, "domain", None)
        if verdict is not None:
            row.update(in_domain=str(verdict.in_domain).lower(),
                       domain_score="" if verdict.score is None else f"{verdict.score:.4g}",
                       domain_threshold="" if verdict.threshold is None else f"{verdict.threshold:.4g}",
                       domain_reason=verdict.reason or "")
        if is_refusal(r):
            row["label"] = "OUT OF DOMAIN"
            if r.dicom is not None:
                row["sop_instance_uid"] = r.dicom.sop_instance_uid
        elif isinstance(r, Prediction):
            row["label"] = r.label
            for k in labels:
                row[f"p_{k}"] = f"{r.probabilities[k]:.4f}"
            if r.dicom is not None:
                row["sop_instance_uid"] = r.dicom.sop_instance_uid
                if keep_phi:
                    for k, v in r.dicom.phi.items():
                        row[f"phi_{k}"] = v
        else:
            row["error"] = r.error
        if image_files:
            row["heatmap_file"] = f"images/{safe_stem(e.name, i)}_heatmap.png" if e.heatmap_png else ""
        row.update({"model": facts["model"], "model_sha256": facts["sha256"], "variant": facts["variant"]})
        rows.append(row)
    return rows


def csv_text(rows: List[dict]) -> str:
    """CSV of ``rows`` (union of their columns, in first-seen order), spreadsheet-safe."""
    columns: List[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(r.get(k, "")) for k in columns})
    return buf.getvalue()


def _cell(value) -> str:
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _data_uri(png: Optional[bytes]) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii") if png else ""


def results_table(entries: Sequence[Entry], facts: dict, image_src=None, numbers: Optional[Sequence[int]] = None) -> str:
    """The HTML table of results. ``image_src(i, kind, png)`` gives each image's src (default: inline);
    ``numbers`` the rows' numbers (default 1, 2, ...)."""
    esc = html.escape
    image_src = image_src or (lambda i, kind, png: _data_uri(png))
    head = "".join(f"<th>p({esc(k)})</th>" for k in facts["labels"])
    out = [f'<table class="results"><thead><tr><th>#</th><th>image</th><th>heat map</th><th>file</th>'
           f'<th>class</th>{head}</tr></thead><tbody>']
    for i, e in enumerate(entries):
        r = e.result
        n = numbers[i] if numbers is not None else i + 1
        name = esc(e.name)
        if isinstance(r, Prediction):
            uid = f'<div class="uid">SOP Instance UID {esc(r.dicom.sop_instance_uid)}</div>' if r.dicom else ""
            thumb = f'<img alt="image {n}" src="{image_src(i, "thumb", e.thumb_png)}">' if e.thumb_png else ""
            heat = (f'<img alt="heat map {n}" src="{image_src(i, "heatmap", e.heatmap_png)}">'
                    if e.heatmap_png else '<span class="muted">none</span>')
            probs = "".join(f"<td>{r.probabilities[k]:.3f}</td>" for k in facts["labels"])
            mark = ""
            if r.domain is not None and not r.domain.in_domain:  # answered anyway (--allow-out-of-domain)
                mark = f'<div class="refused">OUT OF DOMAIN, answered anyway: {esc(r.domain.reason or "")}</div>'
            out.append(f'<tr class="ok"><td>{n}</td><td>{thumb}</td><td>{heat}</td><td>{name}{uid}</td>'
                       f'<td class="label">{esc(r.label)}{mark}</td>{probs}</tr>')
        elif is_refusal(r):
            v = r.verdict
            thumb = f'<img alt="image {n}" src="{image_src(i, "thumb", e.thumb_png)}">' if e.thumb_png else ""
            score = (f' (domain score {v.score:.3g}, threshold {v.threshold:.3g})'
                     if v.score is not None and v.threshold is not None and v.stage != "score" else "")
            out.append(f'<tr class="refused"><td>{n}</td><td>{thumb}</td><td></td><td>{name}</td>'
                       f'<td colspan="{1 + len(facts["labels"])}" class="refused"><b>OUT OF DOMAIN</b>: '
                       f'{esc(v.reason or "")}{esc(score)}. No class is given.</td></tr>')
        else:
            out.append(f'<tr class="error"><td>{n}</td><td colspan="3">{name}</td>'
                       f'<td colspan="{1 + len(facts["labels"])}" class="error">error: {esc(r.error)}</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#111}table{border-collapse:collapse}
td,th{border:1px solid #bbb;padding:4px 8px;vertical-align:top;text-align:left}img{max-width:256px;display:block}
.notice{background:#fff3cd;border:1px solid #d6b656;padding:.6em;margin:.8em 0}.error{color:#a00}
.refused{color:#8a4b00}.muted,.uid{color:#666;font-size:.85em}.label{font-weight:bold}dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px}
dt{font-weight:bold}"""


def facts_html(facts: dict) -> str:
    esc = html.escape
    items = [("model", facts["model"]), ("sha256", facts["sha256"]), ("variant", facts["variant"]),
             ("decision", facts["decision"]), ("runtime", facts["backend"]),
             ("built for", "; ".join(f"{k}: {v}" for k, v in (facts.get("intended") or {}).items()) or "not recorded"),
             ("domain gate", facts.get("domain", "")),
             ("heat map", "class activation map of the predicted class (red: strongest evidence)" if facts["heatmap"]
              else "this model file has none")]
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(str(v))}</dd>" for k, v in items) + "</dl>"


def report_html(entries: Sequence[Entry], facts: dict, title: str = "lungedge report", image_src=None) -> str:
    esc = html.escape
    ok, refused, failed = summary_counts(entries)
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>"
            f'<p class="notice" id="not-a-device">{esc(NOT_A_DEVICE)}</p>'
            f"<p>{ok} classified, {failed} failed" + (f", {refused} refused (out of domain)" if refused else "")
            + f"; written {esc(when)}.</p>"
            f"{facts_html(facts)}"
            f"{results_table(entries, facts, image_src)}</body></html>\n")


def write_report(out_dir: Union[str, Path], entries: Sequence[Entry], facts: dict, keep_phi: bool = False) -> Path:
    """Write ``out_dir/report.html``, ``out_dir/results.csv`` and ``out_dir/images/*.png``.

    Each file is written atomically. Output names come from the input's index and a cleaned
    stem, never from a path the input gave.

    Raises:
        WriteError: a file could not be written.
    """
    from lungedge.edge_runtime.atomic_write import atomic_write_bytes, atomic_write_text

    out = Path(out_dir)
    srcs = {}
    for i, e in enumerate(entries):
        for kind, png in (("thumb", e.thumb_png), ("heatmap", e.heatmap_png)):
            if png:
                rel = f"images/{safe_stem(e.name, i)}_{kind}.png"
                atomic_write_bytes(str(out / rel), png)
                srcs[(i, kind)] = rel
    atomic_write_text(str(out / "results.csv"), csv_text(csv_rows(entries, facts, keep_phi, image_files=True)))
    page = report_html(entries, facts, image_src=lambda i, kind, png: html.escape(srcs.get((i, kind), "")))
    atomic_write_text(str(out / "report.html"), page)
    return out / "report.html"


def heatmap_file(out_dir: Union[str, Path], name: str, index: int, png: bytes) -> Path:
    """Write one overlay PNG for ``--heatmap DIR``; returns its path."""
    from lungedge.edge_runtime.atomic_write import atomic_write_bytes

    p = Path(out_dir) / f"{safe_stem(name, index)}_heatmap.png"
    atomic_write_bytes(str(p), png)
    return p


def entries_with_images(entries: List[Entry], sources: Sequence, names: Optional[Sequence[str]] = None) -> None:
    """Fill each successful entry's thumbnail and heat map (in place); a failure to draw one becomes
    that entry's error."""
    from lungedge.edge_runtime.errors import ImageError

    for i, (e, src) in enumerate(zip(entries, sources)):
        if not isinstance(e.result, Prediction):
            continue
        try:
            e.thumb_png, e.heatmap_png = images_for(src, e.result, name=names[i] if names else None)
        except ImageError as exc:
            e.result = Failure(e.name, str(exc))

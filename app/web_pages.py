"""The HTML and JSON the web page answers with, from typed results (no Starlette here)."""

from __future__ import annotations

import html
from typing import List, Optional

from lungedge.edge_runtime.classifier import Prediction, Refusal
from lungedge.results_report import NOT_A_DEVICE, STYLE, Entry

ACCEPT = ".jpg,.jpeg,.png,.bmp,.gif,.tif,.tiff,.webp,.pgm,.ppm,.dcm,.dicom,application/dicom,image/*"


def page(body: str, title: str = "lungedge", script: str = "") -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f'<body><h1>{html.escape(title)}</h1><p class="notice" id="not-a-device">{html.escape(NOT_A_DEVICE)}</p>'
            f"{body}{script}</body></html>")


def upload_form(settings) -> str:
    token = settings.token
    hidden = f'<input type="hidden" name="token" value="{html.escape(token)}">' if token else ""
    return (f'<form id="upload" method="post" action="/classify" enctype="multipart/form-data">{hidden}'
            f'<p><label>Images or DICOM files (up to {settings.max_files}, {settings.max_upload_bytes // 2**20} MiB '
            f'each): <input id="files" type="file" name="files" multiple accept="{ACCEPT}"></label></p>'
            f'<p><button id="send" type="submit">Classify</button></p></form>')


def summary_html(counts: tuple, csv_href: str) -> str:
    ok, refused, failed = counts
    return (f'<p id="summary">{ok} classified, {failed} failed'
            + (f", {refused} refused (out of domain)" if refused else "") + ". "
            f'<a id="csv" href="{html.escape(csv_href)}">Download the results (CSV)</a> · '
            f'<a href="/">Classify more</a></p>')


def api_result(e: Entry) -> dict:
    """One entry as the JSON API gives it: a class, a refusal (no class) or an error."""
    r = e.result
    if isinstance(r, Prediction):
        d = {"file": e.name, "label": r.label, "probabilities": r.probabilities, "heatmap": e.heatmap_png is not None}
        if r.domain is not None:
            d.update(r.domain.to_dict())
    elif isinstance(r, Refusal) and r.verdict is not None:
        d = {"file": e.name, **r.verdict.to_dict()}
    else:
        return {"file": e.name, "error": r.error}
    if r.dicom is not None:
        d["sop_instance_uid"] = r.dicom.sop_instance_uid
    return d


def api_answer(entries: List[Entry], facts: dict, csv_href: str) -> dict:
    th: Optional[dict] = ({"label": facts["threshold_label"], "value": float(facts["threshold"])}
                          if facts["threshold"] else None)
    return {"results": [api_result(e) for e in entries], "csv": csv_href, "threshold": th,
            "model": {"sha256": facts["sha256"], "variant": facts["variant"]}}

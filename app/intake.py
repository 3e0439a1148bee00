"""One received image to one report entry: the path an upload and a DICOM C-STORE share.

The interpreter is not thread-safe, so classification holds the caller's lock; drawing the
thumbnail and heat map happens outside it. Every outcome is an ``Entry`` whose ``result`` is a
``Prediction``, a ``Refusal`` (the domain gate said no) or a ``Failure`` (one-line reason).
"""

from __future__ import annotations

import threading
from typing import Optional, Union

from lungedge.edge_runtime.classifier import Failure, Prediction, Refusal
from lungedge.edge_runtime.errors import ImageError, OutputError
from lungedge.results_report import Entry, images_for

Result = Union[Prediction, Refusal, Failure]


def classify_bytes(clf, lock: threading.Lock, data: bytes, name: str, audit=None, source: str = "upload",
                   sop_instance_uid: Optional[str] = None, **details) -> Entry:
    """Classify ``data`` (an image or DICOM file's bytes) named ``name``; never raises for bad input.

    With ``audit`` (an ``AuditLog``), one line records the outcome (with ``details``).
    """
    with lock:
        try:
            result: Result = clf.classify(data, heatmap=clf.has_heatmap, name=name)
        except (ImageError, OutputError) as exc:
            result = Failure(name, str(exc))
    entry = Entry(name, result)
    if isinstance(result, Prediction):
        try:
            entry.thumb_png, entry.heatmap_png = images_for(data, result, name=name)
        except ImageError as exc:
            entry.result = Failure(name, str(exc))
    if audit is not None:
        audit.record_result(source, name, entry.result, sop_instance_uid=sop_instance_uid, **details)
    return entry


def failed(name: str, reason: str) -> Entry:
    """An entry for an input refused before classification (too large, empty, bad name)."""
    return Entry(name, Failure(name, reason))

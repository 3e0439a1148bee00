"""The audit log: one JSON line per image classified or refused, so a result can be traced
afterwards (when, from where, which model file, what answer).

Append-only JSON lines, PHI-free unless ``keep_phi`` (a DICOM image is named by its SOP Instance
UID; an upload or a file by its name). Each line is written whole or not at all: one ``write``
under an exclusive lock, cut back if the disk takes only part of it, then ``fdatasync``. The
file is rotated by size (``LOG`` -> ``LOG.1`` -> ... ``LOG.<keep>``), under the same lock, so
``serve`` and ``listen`` may share one log.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import threading
from typing import Optional

from lungedge.edge_runtime.classifier import Prediction, Refusal
from lungedge.edge_runtime.errors import WriteError

#: rotate when the log would grow past this many bytes
MAX_BYTES = 10 * 2**20
#: rotated files kept (LOG.1 ... LOG.<KEEP>)
KEEP = 5


class AuditLog:
    """Appends audit records to ``path`` for one model (``facts``: ``model_facts`` of the reading module)."""

    def __init__(self, path: str, facts: dict, keep_phi: bool = False, max_bytes: int = MAX_BYTES, keep: int = KEEP):
        self.path, self.keep_phi, self.max_bytes, self.keep = os.fspath(path), keep_phi, max_bytes, keep
        self.model = {"model_sha256": facts["sha256"], "variant": facts["variant"]}
        self._lock = threading.Lock()
        try:
            os.close(self._open_locked())  # an unwritable log fails at start, not at the first image
        except OSError as exc:
            raise WriteError(f"cannot open the audit log ({exc.strerror or exc}): {self.path!r}") from None

    def record_result(self, source: str, name: str, result, sop_instance_uid: Optional[str] = None,
                      **details) -> None:
        """One classified, refused (out of domain) or failed image."""
        rec = {"source": source, "name": name, **details}
        dicom = getattr(result, "dicom", None)
        uid = sop_instance_uid or (dicom.sop_instance_uid if dicom is not None else None)
        if uid:
            rec["sop_instance_uid"] = uid
        if isinstance(result, Prediction):
            rec.update(result=result.label, probability=round(result.score, 6), in_domain=result.in_domain)
        elif isinstance(result, Refusal):
            rec.update(result="OUT OF DOMAIN", in_domain=False,
                       reason=result.verdict.reason if result.verdict is not None else result.error)
        else:
            rec.update(result="error", in_domain=None, reason=result.error)
        if self.keep_phi and dicom is not None and dicom.phi:
            rec["phi"] = dict(dicom.phi)
        self.write(rec)

    def record_refusal(self, source: str, reason: str, **details) -> None:
        """Something refused before any image was classified (an association, a dataset)."""
        self.write({"source": source, "result": "refused", "reason": reason, **details})

    def write(self, record: dict) -> None:
        """Append one line (time and model added).

        Raises:
            WriteError: the line could not be written (nothing of it is left in the log).
        """
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        line = (json.dumps({"time": now, **record, **self.model}, ensure_ascii=True, default=str) + "\n").encode()
        with self._lock:
            try:
                self._append(line)
            except OSError as exc:
                raise WriteError(f"cannot write the audit log ({exc.strerror or exc}): {self.path!r}") from None

    def _append(self, line: bytes) -> None:
        fd = self._open_locked()
        try:
            size = os.fstat(fd).st_size
            if size and size + len(line) > self.max_bytes:
                self._rotate()
                os.close(fd)
                fd = self._open_locked()
                size = 0
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(28, "the disk took only part of the line")
                os.fdatasync(fd)
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)

    def _open_locked(self) -> int:
        """The log open for appending under an exclusive lock, the file now at ``path``."""
        while True:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # another process rotated it while this one waited: open the new file

    def _rotate(self) -> None:
        for i in range(self.keep - 1, 0, -1):
            older = f"{self.path}.{i}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")


def open_audit(path: Optional[str], clf, keep_phi: bool = False) -> Optional[AuditLog]:
    """The audit log for ``clf`` at ``path``, or None when no path is given."""
    if not path:
        return None
    from lungedge.results_report import model_facts

    return AuditLog(path, model_facts(clf), keep_phi=keep_phi)


def log_files(path: str) -> list:
    """``path`` and its rotated files that exist, oldest first."""
    rotated = [f"{path}.{i}" for i in range(KEEP * 4, 0, -1)]
    return [p for p in rotated + [path] if os.path.exists(p)]


def summarise(path: str) -> dict:
    """Counts over a log and its rotated files: per class, per day, refusals, models used.

    Raises:
        InputError: there is no log at ``path``.
    """
    from collections import Counter

    from lungedge.edge_runtime.errors import InputError

    files = log_files(os.fspath(path))
    if not files:
        raise InputError(f"no audit log here: {os.fspath(path)!r}")
    per_class, per_day, per_source, refusals, models = Counter(), Counter(), Counter(), Counter(), Counter()
    lines = unreadable = 0
    for f in files:
        with open(f, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw)
                    result, day = str(rec["result"]), str(rec["time"])[:10]
                except (ValueError, KeyError, TypeError):
                    unreadable += 1
                    continue
                lines += 1
                per_day[day] += 1
                per_source[str(rec.get("source"))] += 1
                models[f"{str(rec.get('model_sha256'))[:12]} {rec.get('variant')}"] += 1
                if result in ("refused", "error", "OUT OF DOMAIN"):
                    refusals[f"{result}: {str(rec.get('reason', ''))[:80]}"] += 1
                else:
                    per_class[result] += 1
    return {"files": files, "records": lines, "unreadable_lines": unreadable, "per_class": dict(per_class),
            "per_day": dict(sorted(per_day.items())), "per_source": dict(per_source),
            "refusals": dict(refusals.most_common()), "models": dict(models.most_common())}


def summary_lines(s: dict) -> list:
    """The summary as text, one fact a line."""
    out = [f"{s['records']} records in {len(s['files'])} file(s)"
           + (f"; {s['unreadable_lines']} unreadable line(s)" if s["unreadable_lines"] else "")]
    for title, key in (("per class", "per_class"), ("per day", "per_day"), ("per source", "per_source"),
                       ("not classified", "refusals"), ("models (sha256, variant)", "models")):
        out.append(f"{title}:" + ("" if s[key] else " none"))
        out.extend(f"  {n:>7}  {k}" for k, n in s[key].items())
    return out

"""The audit log: one whole JSON line per image, PHI-free unless asked, rotated by size, shared
safely by threads and processes; ``lungedge audit`` summarises it. No model needed."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading

import pytest

from lungedge.audit import AuditLog, log_files, summarise
from lungedge.edge_runtime.classifier import Failure, Prediction, Refusal
from lungedge.edge_runtime.dicom import DicomInfo
from lungedge.edge_runtime.domain import DomainVerdict
from lungedge.edge_runtime.errors import WriteError

FACTS = {"model": "m.tflite", "sha256": "ab" * 32, "variant": "int8"}
PHI = {"PatientName": "Testperson^Alice", "PatientID": "PID-73519"}
DICOM = DicomInfo(sop_instance_uid="1.2.3.4", modality="CR", phi=PHI)


def _pred(label="PNEUMONIA", dicom=None):
    return Prediction(label=label, probabilities={"NORMAL": 0.2, "PNEUMONIA": 0.8} if label == "PNEUMONIA"
                      else {"NORMAL": 0.7, "PNEUMONIA": 0.3}, dicom=dicom)


def _lines(path):
    return [json.loads(x) for x in open(path, encoding="utf-8")]


def test_each_outcome_is_one_line_naming_model_source_and_result(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl", FACTS)
    log.record_result("upload", "x.png", _pred())
    log.record_result("listen", "1.2.3.4", _pred("NORMAL", DICOM), calling_ae="XRAY1")
    log.record_result("classify", "y.png", Refusal("y.png", "out of domain", verdict=DomainVerdict(False, 9.0, 2.0,
                                                                                                  "a photo", "score")))
    log.record_result("classify", "z.png", Failure("z.png", "not an image: 'z.png'"))
    log.record_refusal("listen", "calling AE title 'X' is not on the allow list", calling_ae="X")
    rows = _lines(tmp_path / "a.jsonl")
    assert [r["result"] for r in rows] == ["PNEUMONIA", "NORMAL", "OUT OF DOMAIN", "error", "refused"]
    assert all(r["model_sha256"] == FACTS["sha256"] and r["variant"] == "int8" and r["time"].endswith("+00:00")
               for r in rows)
    assert rows[0]["probability"] == pytest.approx(0.8) and rows[1]["sop_instance_uid"] == "1.2.3.4"
    assert rows[1]["calling_ae"] == "XRAY1" and rows[2]["in_domain"] is False and rows[2]["reason"] == "a photo"
    assert "PID-73519" not in (tmp_path / "a.jsonl").read_text()  # PHI-free by default


def test_keep_phi_writes_the_patient_identifiers(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl", FACTS, keep_phi=True)
    log.record_result("listen", "1.2.3.4", _pred(dicom=DICOM))
    assert _lines(tmp_path / "a.jsonl")[0]["phi"] == PHI


def test_a_line_the_disk_takes_only_in_part_leaves_nothing(tmp_path, monkeypatch):
    import lungedge.audit as audit

    log = AuditLog(tmp_path / "a.jsonl", FACTS)
    log.record_result("upload", "ok.png", _pred())
    before = (tmp_path / "a.jsonl").read_bytes()
    real_write = os.write
    monkeypatch.setattr(audit.os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    with pytest.raises(WriteError, match="audit log"):
        log.record_result("upload", "half.png", _pred())
    monkeypatch.setattr(audit.os, "write", real_write)
    assert (tmp_path / "a.jsonl").read_bytes() == before
    log.record_result("upload", "after.png", _pred())
    assert [r["name"] for r in _lines(tmp_path / "a.jsonl")] == ["ok.png", "after.png"]


def test_rotated_by_size_and_summarised_across_the_files(tmp_path):
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, FACTS, max_bytes=2000, keep=3)
    for i in range(40):
        log.record_result("listen", f"img{i}", _pred("PNEUMONIA" if i % 4 else "NORMAL"))
    files = log_files(str(path))
    assert len(files) == 4 and all(os.path.getsize(f) <= 2000 for f in files)  # LOG.3 LOG.2 LOG.1 LOG
    kept = [r for f in files for r in _lines(f)]
    assert [r["name"] for r in kept] == [f"img{i}" for i in range(40 - len(kept), 40)]  # in order, whole lines
    s = summarise(str(path))
    assert s["records"] == len(kept) and sum(s["per_class"].values()) == len(kept)
    assert list(s["models"]) == [f"{'ab' * 6} int8"]


def _write_many(path, n, tag):
    log = AuditLog(path, FACTS, max_bytes=50_000)
    for i in range(n):
        log.record_result("upload", f"{tag}-{i}", _pred())


def test_threads_and_processes_sharing_a_log_never_mix_lines(tmp_path):
    path = str(tmp_path / "a.jsonl")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(path, 150, f"p{k}")) for k in range(2)]
    threads = [threading.Thread(target=_write_many, args=(path, 150, f"t{k}")) for k in range(2)]
    for w in procs + threads:
        w.start()
    for w in procs + threads:
        w.join(timeout=120)
    rows = [r for f in log_files(path) for r in _lines(f)]  # each line parses: none torn or mixed
    names = {r["name"] for r in rows}
    assert len(rows) == len(names) == 600, len(rows)


def test_audit_command_prints_counts_and_refusals(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl", FACTS)
    for label in ("PNEUMONIA", "PNEUMONIA", "NORMAL"):
        log.record_result("listen", "u", _pred(label))
    log.record_refusal("listen", "SOP class not accepted", status="0x0122")
    run = subprocess.run([sys.executable, "-m", "lungedge.cli", "audit", str(tmp_path / "a.jsonl")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "4 records" in run.stdout and "      2  PNEUMONIA" in run.stdout
    assert "refused: SOP class not accepted" in run.stdout
    run = subprocess.run([sys.executable, "-m", "lungedge.cli", "audit", "--json", str(tmp_path / "a.jsonl")],
                         capture_output=True, text=True, timeout=60)
    assert json.loads(run.stdout)["per_class"] == {"PNEUMONIA": 2, "NORMAL": 1}
    run = subprocess.run([sys.executable, "-m", "lungedge.cli", "audit", str(tmp_path / "none.jsonl")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stderr.startswith("error: no audit log here")

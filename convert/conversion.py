"""Convert a training run folder into TFLite variants and judge them: ``convert_run``."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from lungedge.edge_runtime import learning_floor as floor
from lungedge.edge_runtime.errors import ConfigError, ModelError

from . import quant_gate
from .calibration import calibration_from_files, calibration_from_folder, load_images
from .variant_eval import compare, decide, keras_probabilities, rechoose_threshold, summarize, tflite_probabilities
from .keras_convert import (check_classifier, convert_keras_model, converter_versions, integer_source,
                            load_keras_model, model_sha256, tflite_bytes, write_tflite)
from .quant_report import report_paths, write_report
from lungedge.train.runfolder import calibration_split, class_counts, eval_split, load_run, tflite_name
from .settings import ConvertSettings, settings_from
from .variants import get_variant


def convert_run(run_dir, settings: Optional[ConvertSettings] = None, **fields) -> dict:
    """Convert a run's ``model.keras`` to each variant and compare them with it.

    Writes ``model_<variant>.tflite`` (atomically, metadata inside) and
    ``quantization_report.{json,md,png}`` into ``settings.out_dir`` (default: the run folder).

    Args:
        run_dir: a training run folder (model.keras, spec.json, split_manifest.csv).
        settings: what to convert and how (``convert.settings.ConvertSettings``; default: its defaults).
        fields: ``ConvertSettings`` fields applied over ``settings`` (e.g. ``variants="int8"``).

    Returns:
        The report (also written as JSON): per variant ``gate`` ("passed"/"failed") and
        ``gate_reasons``; overall ``passed``.

    Raises:
        ConfigError: missing run folder or spec, unknown variant, no test or calibration images.
        ModelError: no model.keras, not a classifier, or a conversion failed.
    """
    s = settings_from(settings, fields)
    chosen = s.checked()
    job = _prepare(run_dir, s, any(v.calibrated for v in chosen))
    rows = [_convert_one(job, v) for v in chosen]
    base = next((r["size_bytes"] for r in rows if r["variant"] == "float32"), None)
    for r in rows:
        r["size_ratio"] = (r["size_bytes"] / base) if base else None
    report = _report(job, rows, base)
    write_report(report, job.out)
    card = job.run.path / "model_card.md"
    if job.out.resolve() == job.run.path.resolve() and card.is_file():
        _card_domain_section(card, report)
    return report


@dataclass
class _Job:
    """What every variant's conversion shares: the settings, the run and its model, the images."""

    s: ConvertSettings
    run: object
    spec: object
    out: Path
    model: object
    sha: str
    calibration: Optional[np.ndarray] = None
    calib_info: dict = field(default_factory=lambda: {"count": 0, "source": "not needed", "class_counts": {}})
    picked: list = field(default_factory=list)
    ref: Optional["_Reference"] = None
    val: Optional[tuple] = None
    domain_fit: object = None
    frame_facts: Optional[dict] = None
    domain_note: str = "off (--no-domain)"
    reference: Optional[bytes] = None
    ood_sets: Optional[dict] = None

    @property
    def gate_x(self):
        """The images the domain threshold is chosen on: the validation split, else the calibration images."""
        return self.val[0] if self.val is not None else self.calibration

    @property
    def gate_source(self) -> str:
        return "validation split" if self.val is not None else "calibration images (no validation split)"


def _prepare(run_dir, s: ConvertSettings, calibrate: bool) -> _Job:
    """Load the run and its model, read the images, fit the domain score, convert the shared reference."""
    run = load_run(run_dir)
    spec = run.spec
    model = load_keras_model(run.model_path)
    check_classifier(model, spec)
    job = _Job(s, run, spec, Path(s.out_dir) if s.out_dir else run.path, model, model_sha256(run.model_path))
    if calibrate:  # before judging the model: a bad calibration folder is an input error
        job.calibration, job.calib_info, job.picked = _calibration(run, spec, s.calibration_dir,
                                                                   s.calibration_count, s.seed)
    job.ref = _reference(run, model, s.data_dir, s.learning_floor)
    if (s.rethreshold and spec.threshold is not None) or s.domain:
        job.val = _validation(run)
    if s.domain:
        _fit_domain(job)
    if job.calibration is not None and s.bias_correction:
        # the bias correction's float32 reference: converted once for all integer variants
        job.reference = tflite_bytes(integer_source(model, spec)[0], get_variant("float32"), heatmap=s.heatmap,
                                     domain=job.domain_fit)
    return job


def _fit_domain(job: _Job) -> None:
    from .domain_gate import fit_run

    fitted, facts = fit_run(job.run, job.model, job.picked, job.s.seed, reference_x=job.gate_x)
    job.domain_note = "fitted" if fitted is not None else facts
    job.domain_fit, job.frame_facts = fitted, (facts if fitted is not None else None)


def _convert_one(job: _Job, v) -> dict:
    """Convert, write and judge one variant: its report row."""
    s, spec = job.s, job.spec
    t0 = time.perf_counter()
    data = convert_keras_model(job.model, spec, v, calibration=job.calibration, source_sha256=job.sha,
                               extra={"calibration": job.calib_info} if v.calibrated else None,
                               bias_correction=s.bias_correction, reference=job.reference,
                               heatmap=s.heatmap, domain=job.domain_fit)
    seconds = time.perf_counter() - t0
    path = job.out / tflite_name(v.name)
    write_tflite(path, data)
    note = None
    if job.val is not None and v.calibrated and s.rethreshold and spec.threshold is not None:
        data, note = _rethreshold(path, data, job.val, spec)
        write_tflite(path, data)
    domain_row = _domain_threshold(job, path, data) if job.domain_fit is not None else None
    row = _judge(path, v, job.ref, spec, s.limits, seconds, s.learning_floor)
    if v.micro:
        _micro(path, job.ref, row, spec, s.limits, s.learning_floor)
    if note:
        row["threshold_note"] = note
    if domain_row is not None:
        row["domain"].update(domain_row)
    return row


def _domain_threshold(job: _Job, path: Path, data: bytes) -> dict:
    """Choose the written file's domain threshold, measure its refusal rates, record them in the file."""
    from .domain_gate import folder_sets, refusal_rates, set_threshold

    data, gate_note = set_threshold(path, data, job.domain_fit, job.frame_facts, job.gate_x, job.gate_source)
    write_tflite(path, data)
    if job.ood_sets is None:
        job.ood_sets = folder_sets(job.s.ood_dir, job.spec)
    rates = refusal_rates(path, getattr(job.gate_x, "pixels", None), job.spec, job.ood_sets)
    write_tflite(path, _with_refusal(data, rates))
    return {"note": gate_note, "dev_sets": rates}


#: The model card's domain-gate section is replaced between these markers by each conversion.
_CARD_START, _CARD_END = "<!-- domain gate: written by lungedge convert -->", "<!-- end of domain gate -->"


def _card_domain_section(card: Path, report: dict) -> None:
    """Write the conversion's domain-gate section into the run's model card (replacing an earlier one)."""
    from lungedge.edge_runtime.atomic_write import atomic_write_bytes

    from .quant_report import domain_section

    text = card.read_text(encoding="utf-8")
    if _CARD_START in text and _CARD_END in text:
        text = text[: text.index(_CARD_START)].rstrip("\n") + "\n" + text[text.index(_CARD_END) + len(_CARD_END):].lstrip("\n")
    section = "\n".join(domain_section(report)).strip("\n")
    text = text.rstrip("\n") + f"\n\n{_CARD_START}\n{section}\n{_CARD_END}\n"
    atomic_write_bytes(str(card), text.encode("utf-8"))


@dataclass
class _Reference:
    """The images every variant is judged on, and what the Keras model made of them."""

    x: np.ndarray
    y: np.ndarray
    note: str
    source: str
    failures: list
    probs: np.ndarray
    pred: np.ndarray
    metrics: dict
    disease: Optional[str]


def _reference(run, model, data_dir, learning_floor: bool) -> _Reference:
    """Read the test images, run the Keras model on them, and refuse a model that did not learn."""
    spec = run.spec
    test, note = eval_split(run, data_dir)
    x, kept, failures = load_images(test.paths, spec.preprocessing, desc="test images")
    if len(x) == 0:
        raise ConfigError(f"none of the {len(test)} test images ({test.source}) could be read")
    y = np.asarray([test.labels[i] for i in kept])
    probs = keras_probabilities(model, x)
    metrics = summarize(y, probs, spec, spec.threshold)
    pred = decide(probs, spec.labels, spec.threshold)
    verdict = floor.judge(y, pred, spec.labels)
    metrics["learning_floor"] = verdict.to_dict()
    if verdict.failed and learning_floor:
        raise ModelError(f"{verdict.sentence()}: the Keras model of {run.path} is not worth converting")
    disease = spec.positive_label or (spec.threshold.label if spec.threshold else None)
    return _Reference(x, y, note, test.source, failures, probs, pred, metrics, disease)


def _validation(run):
    """The validation split's images and labels (to re-choose thresholds), or None when there is none."""
    val_split = run.split("val")
    if not len(val_split):
        return None
    xv, kv, _ = load_images(val_split.paths, run.spec.preprocessing, desc="val images")
    return xv, np.asarray([val_split.labels[i] for i in kv])


def _report(job: _Job, rows: list, base_size) -> dict:
    run, ref, s = job.run, job.ref, job.s
    verdict = quant_gate.overall(rows)
    report = {
        "source": str(run.path),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "labels": list(run.spec.labels),
        "recipe": run.spec.recipe,
        "source_model_sha256": job.sha,
        "versions": converter_versions(),
        "test": {"n": int(len(ref.y)), "note": ref.note, "source": ref.source,
                 "class_counts": class_counts(ref.y.tolist(), run.spec.labels),
                 "failures": [{"path": p, "error": e} for p, e in ref.failures]},
        "calibration": job.calib_info,
        "bias_correction": s.bias_correction,
        "gate": {"max_accuracy_drop": s.max_accuracy_drop, "max_recall_drop": s.max_recall_drop,
                 "disease_class": ref.disease or "every class", "learning_floor": floor.ALPHA,
                 "paired_alpha": quant_gate.PAIRED_ALPHA},
        "keras": _keras_row(ref.metrics),
        "variants": rows,
        "passed": verdict.passed,
        "verdict": verdict.to_dict(),
        "size_ratio_note": None if base_size else "float32 not converted: no size ratios",
        "domain_gate": job.domain_note,
    }
    if job.domain_fit is not None:
        facts = job.frame_facts
        report["domain_fit"] = {**job.domain_fit.record(), "aspect_range": facts.get("aspect_range"),
                                "structure_floor": facts.get("structure_floor"),
                                "saturation_limit": facts.get("saturation_limit")}
    report["files"] = report_paths(job.out)
    return report


def _calibration(run, spec, calibration_dir, count, seed):
    """(images, record, indices picked from the training split: [] for a folder)."""
    if calibration_dir is not None:
        x = calibration_from_folder(calibration_dir, spec.preprocessing, spec.labels, count, seed)
        return x, {"count": int(len(x)), "source": f"folder {calibration_dir}", "class_counts": {}}, []
    train = calibration_split(run)
    from .calibration import stratified_pick

    picked = stratified_pick(train.labels, count, seed)
    x = calibration_from_files(train.paths, train.labels, spec.preprocessing, count, seed,
                               source=train.source)
    return x, {"count": int(len(x)), "source": f"stratified from the {train.source}",
               "class_counts": class_counts([train.labels[i] for i in picked], spec.labels)}, picked


def _rethreshold(path, data, val, spec):
    """Re-choose the threshold of a quantised file on the validation split; re-embed it."""
    from lungedge.edge_runtime.classifier import Classifier
    from lungedge.edge_runtime.metadata import embed_spec, read_spec

    xv, yv = val
    clf = Classifier(path, use_threshold=False)
    probs = tflite_probabilities(clf, xv, desc=f"val {path.name}")
    old = spec.threshold
    new = rechoose_threshold(probs, yv, spec.labels, old, "validation (re-chosen for this quantised model)")
    file_spec = read_spec(data)
    note = f"threshold re-chosen on {len(yv)} validation images: {old.value:.4f} -> {new.value:.4f}"
    return embed_spec(data, file_spec.replace(threshold=new)), note


def _with_refusal(data: bytes, rates: dict) -> bytes:
    """``data`` with the development sets' refusal rates added to its gate's record."""
    from lungedge.edge_runtime.metadata import embed_spec, read_spec

    spec = read_spec(data)
    refusal = dict(spec.domain.refusal)
    refusal.update({k: v["refused"] for k, v in rates.items() if v["refused"] is not None})
    return embed_spec(data, spec.replace(domain=type(spec.domain)(**{**spec.domain.__dict__, "refusal": refusal})))


def _keras_row(m: dict) -> dict:
    return {"accuracy": m["accuracy"], "per_class_recall": {n: c["recall"] for n, c in m["per_class"].items()},
            "macro_f1": m["macro"]["f1"], "decision": m["decision"], "metrics": m}


def _judge(path, v, ref: _Reference, spec, limits, seconds, learning_floor=True):
    """Load the written file in the runtime, run the test images, apply the gate."""
    from lungedge.edge_runtime.classifier import Classifier

    clf = Classifier(path)
    probs, scores = tflite_probabilities(clf, ref.x, desc=f"test {v.name}", with_scores=True)
    threshold = clf.spec.threshold if clf.use_threshold else None
    m = summarize(ref.y, probs, spec, threshold)
    pred = decide(probs, spec.labels, threshold)
    verdict = floor.judge(ref.y, pred, spec.labels)
    m["learning_floor"] = verdict.to_dict()
    cmp_ = compare(ref.probs, probs, ref.pred, pred)
    drop = 100.0 * (ref.metrics["accuracy"] - m["accuracy"])
    reasons = quant_gate.variant_reasons(ref.metrics, m, ref.disease, *limits,
                                   learned=not (verdict.failed and learning_floor), floor_sentence=verdict.sentence(),
                                   paired=(ref.y, ref.pred, pred))
    details = clf.describe()
    return {
        "variant": v.name,
        "file": str(path),
        "size_bytes": clf.model_size,
        "sha256": clf.model_sha256,
        "input_dtype": details["input_dtype"],
        "output_dtype": details["output_dtype"],
        "backend": f"{clf.backend.name} {clf.backend.version}",
        "conversion_seconds": seconds,
        "accuracy": m["accuracy"],
        "correct": verdict.correct,
        "n": verdict.n,
        "accuracy_ci95": list(verdict.accuracy_ci95),
        "learning_floor": verdict.status,
        "accuracy_drop_pts": drop,
        "per_class_recall": {n: c["recall"] for n, c in m["per_class"].items()},
        "macro_f1": m["macro"]["f1"],
        **cmp_,
        "decision": m["decision"],
        "gate": "failed" if reasons else "passed",
        "gate_reasons": reasons,
        "metrics": m,
        "domain": _domain_row(clf, scores, probs, ref, spec, threshold),
    }


def _micro(path: Path, ref: _Reference, row: dict, spec, limits, learning_floor: bool = True) -> None:
    """Verify a micro file in TensorFlow Lite Micro and write its C sources. TFLM's own answers
    on the test images face the same gate as LiteRT's; a file TFLM cannot run (an operator it
    lacks, a class output off LiteRT's reference kernels) fails the gate with the reason."""
    from lungedge.edge_runtime.metadata import read_spec

    from .micro import export

    file_spec = read_spec(path.read_bytes())
    try:
        report, tflm = export(path, ref.x, file_spec, ref.y)
    except ModelError as exc:
        row["micro"] = {"error": str(exc)}
        row["gate"] = "failed"
        row["gate_reasons"] = list(row["gate_reasons"]) + [f"microcontroller: {exc}"]
        return
    threshold = file_spec.threshold
    m = summarize(ref.y, tflm["probs"], spec, threshold)
    verdict = floor.judge(ref.y, tflm["class"], spec.labels)
    reasons = quant_gate.variant_reasons(ref.metrics, m, ref.disease, *limits,
                                   learned=not (verdict.failed and learning_floor),
                                   floor_sentence=verdict.sentence(), paired=(ref.y, ref.pred, tflm["class"]))
    row["micro"] = report
    if reasons:
        row["gate"] = "failed"
        row["gate_reasons"] = list(row["gate_reasons"]) + [f"in TensorFlow Lite Micro: {r}" for r in reasons]


def _domain_row(clf, scores, probs, ref: _Reference, spec, threshold) -> dict:
    """The gate on the test images: threshold, refusal (score only), metrics on the accepted ones."""
    gate = clf.domain
    if gate is None or scores is None:
        return {"gate": "none"}
    accepted = scores <= gate.threshold
    row = {"gate": "on", "threshold": gate.threshold, "test_refused": float(1 - accepted.mean()),
           "test_refused_n": int((~accepted).sum()), "validation_refused": gate.refusal.get("validation"),
           "score_ceiling": gate.fit.get("score_ceiling"), "accepted": None}
    if accepted.any():
        m = summarize(ref.y[accepted], probs[accepted], spec, threshold)
        row["accepted"] = {"n": int(accepted.sum()), "accuracy": m["accuracy"], "auc": m.get("auc"),
                           "per_class_recall": {n: c["recall"] for n, c in m["per_class"].items()}}
    return row

"""Site recalibration: re-choose a model's decision threshold, and optionally a temperature, on
a clinic's own labelled images, on the device (numpy; no TensorFlow).

A model trained on one hospital's images meets another's: the ranking of its scores usually
survives the shift better than their level (the X-ray models over-call pneumonia on an
external set at the threshold chosen in-folder: train/SELECTION.md). Recalibration keeps the model and moves only
the operating point:

1. the model runs on the site's labelled folder (``folder_eval.labelled_outputs``);
2. with ``temperature``, a temperature T is fitted by maximum likelihood (the logits are divided
   by T; ranking unchanged, probabilities honest on this site's data);
3. the threshold on the disease class is chosen by the project's one rule
   (``operating_point``): the best balanced accuracy among thresholds whose disease recall on
   these images is at least the target;
4. sensitivity, specificity and accuracy at the old and new operating points are given with
   bootstrap 95 % intervals (percentile, resampled within each class, fixed seed);
5. the new file carries the new threshold and temperature, and a record of the calibration set
   (count per class, a content hash, the date) beside the old threshold.

The refusal rule (``disease_images_needed``): a recall target R can only be promised from a set
that could show it. With n disease images all detected, the exact one-sided 95 % lower bound of
the recall is 0.05 ** (1 / n); it reaches R only when n >= ln(0.05) / ln(R): 59 images for 0.95,
29 for 0.90, 299 for 0.99. Fewer disease images than that: refused, saying how many are needed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from .decision import apply_threshold, output_probabilities
from .errors import ConfigError, InputError, ModelError
from .operating_point import operating_point
from .spec import ModelSpec, Threshold

#: Confidence of the refusal rule and of the printed intervals.
CONFIDENCE = 0.95
#: Bootstrap resamples for the intervals.
BOOTSTRAP = 2000
#: Bins of the reliability diagram and of the expected calibration error.
BINS = 10
#: The temperature is searched in [1/T_RANGE, T_RANGE] (times the file's current one).
T_RANGE = 20.0


def disease_images_needed(target_recall: float, confidence: float = CONFIDENCE) -> int:
    """The fewest disease images from which ``target_recall`` can be shown at ``confidence``:
    the smallest n with target ** n <= 1 - confidence (all n detected, exact binomial bound).

    Raises:
        ConfigError: a target outside (0, 1) (a recall of 1 cannot be shown on any finite set).
    """
    if not 0.0 < target_recall < 1.0:
        raise ConfigError(f"target recall must be above 0 and below 1 (a recall of 1 cannot be shown on a "
                          f"finite set), got {target_recall!r}")
    return int(math.ceil(math.log(1.0 - confidence) / math.log(target_recall) - 1e-9))


def fit_temperature(probs: np.ndarray, y: Sequence[int]) -> float:
    """The temperature T (relative to the outputs as given) that minimises the negative
    log-likelihood of softmax(log(probs) / T) on labels ``y``: golden-section search on log T."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)

    def nll(log_t: float) -> float:
        q = output_probabilities(p, "probabilities", math.exp(log_t)).astype(np.float64)
        return float(-np.mean(np.log(np.clip(q[np.arange(len(y)), y], 1e-12, None))))

    lo, hi = -math.log(T_RANGE), math.log(T_RANGE)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    best = (lo + hi) / 2
    return float(math.exp(best)) if nll(best) < nll(0.0) else 1.0


def negative_log_likelihood(probs: np.ndarray, y: Sequence[int]) -> float:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))


@dataclass(frozen=True)
class Rates:
    """Sensitivity (disease recall), specificity and accuracy of one operating point, each as
    (estimate, low, high) with the bootstrap 95 % interval; ``n`` disease and healthy counts."""

    sensitivity: Tuple[float, float, float]
    specificity: Tuple[float, float, float]
    accuracy: Tuple[float, float, float]
    n_disease: int
    n_other: int

    def to_dict(self) -> dict:
        return {"sensitivity": list(self.sensitivity), "specificity": list(self.specificity),
                "accuracy": list(self.accuracy), "disease_images": self.n_disease, "other_images": self.n_other}


def bootstrap_rates(predicted_disease: Sequence[bool], is_disease: Sequence[bool], resamples: int = BOOTSTRAP,
                    seed: int = 0) -> Rates:
    """``Rates`` of binary decisions, intervals from ``resamples`` bootstrap resamples drawn within
    each class (the class counts stay fixed, as they are in the calibration set)."""
    pred = np.asarray(predicted_disease, dtype=bool)
    pos = np.asarray(is_disease, dtype=bool)
    hits_pos = pred[pos].astype(np.float64)  # detected disease
    hits_neg = (~pred[~pos]).astype(np.float64)  # healthy left alone
    rng = np.random.default_rng(seed)

    def resample(hits):
        if len(hits) == 0:
            return np.zeros(resamples)
        return hits[rng.integers(0, len(hits), (resamples, len(hits)))].sum(axis=1)

    s_pos, s_neg = resample(hits_pos), resample(hits_neg)
    n_pos, n_neg = len(hits_pos), len(hits_neg)
    q = [(1 - CONFIDENCE) / 2 * 100, (1 + CONFIDENCE) / 2 * 100]

    def triple(est, samples):
        lo, hi = np.percentile(samples, q)
        return (float(est), float(lo), float(hi))

    sens = triple(hits_pos.mean() if n_pos else 0.0, s_pos / max(n_pos, 1))
    spec = triple(hits_neg.mean() if n_neg else 0.0, s_neg / max(n_neg, 1))
    acc = triple((hits_pos.sum() + hits_neg.sum()) / max(n_pos + n_neg, 1), (s_pos + s_neg) / max(n_pos + n_neg, 1))
    return Rates(sens, spec, acc, n_pos, n_neg)


def reliability_bins(positive_probs: Sequence[float], is_positive: Sequence[bool], bins: int = BINS) -> list:
    """Per equal-width bin of the disease probability: (mean probability, observed disease
    fraction, count); empty bins are left out."""
    p = np.asarray(positive_probs, dtype=np.float64)
    y = np.asarray(is_positive, dtype=bool)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        if m.any():
            out.append((float(p[m].mean()), float(y[m].mean()), int(m.sum())))
    return out


def expected_calibration_error(positive_probs: Sequence[float], is_positive: Sequence[bool], bins: int = BINS) -> float:
    """Mean |probability - observed fraction| over the reliability bins, weighted by count."""
    rows = reliability_bins(positive_probs, is_positive, bins)
    n = sum(c for _, _, c in rows)
    return float(sum(c * abs(p - f) for p, f, c in rows) / n) if n else 0.0


@dataclass(frozen=True)
class Recalibration:
    """What site recalibration found and chose (``recalibrate_outputs``)."""

    labels: Tuple[str, ...]
    positive_label: str
    target_recall: float
    disease_needed: int
    counts: dict
    temperature_before: float
    temperature: float  # the new file's temperature (absolute)
    nll: Tuple[float, float]  # before, after
    ece: Tuple[float, float]
    threshold_before: Optional[Threshold]
    threshold: Threshold
    before: Rates
    after: Rates
    bins_before: list = field(default_factory=list)
    bins_after: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "positive_label": self.positive_label, "target_recall": self.target_recall,
            "rule": f"recall >= {self.target_recall:g} can be shown (one-sided {CONFIDENCE:.0%}, exact binomial) "
                    f"only from >= {self.disease_needed} {self.positive_label} images",
            "images": self.counts,
            "temperature": {"before": self.temperature_before, "after": self.temperature},
            "negative_log_likelihood": {"before": self.nll[0], "after": self.nll[1]},
            "expected_calibration_error": {"before": self.ece[0], "after": self.ece[1], "bins": BINS},
            "threshold": {"before": self.threshold_before.to_dict() if self.threshold_before else None,
                          "after": self.threshold.to_dict()},
            "at_previous_operating_point": self.before.to_dict(),
            "at_new_operating_point": self.after.to_dict(),
            "intervals": f"bootstrap {CONFIDENCE:.0%} percentile, {BOOTSTRAP} resamples within each class, seed 0",
        }


def positive_label_of(spec: ModelSpec, given: Optional[str] = None) -> str:
    """The disease class: ``given``, else the file's positive label or threshold label.

    Raises:
        ConfigError: none is known, or ``given`` is not a label.
    """
    label = given or spec.positive_label or (spec.threshold.label if spec.threshold else None)
    if label is None:
        raise ConfigError(f"the model names no disease class; give --positive-label (one of {list(spec.labels)})")
    if label not in spec.labels:
        raise ConfigError(f"positive label {label!r} is not one of the model's labels {list(spec.labels)}")
    return label


def recalibrate_outputs(probs: np.ndarray, y: Sequence[int], spec: ModelSpec, target_recall: float,
                        positive_label: Optional[str] = None, temperature: bool = True,
                        seed: int = 0) -> Recalibration:
    """Choose the new temperature and threshold from the device's probabilities ``probs`` (N,
    classes, as the file computes them now) and true classes ``y``.

    Raises:
        InputError: too few disease images for the target (the rule above), or no other image.
        ConfigError: no disease class, or a target outside (0, 1).
    """
    labels = tuple(spec.labels)
    label = positive_label_of(spec, positive_label)
    k = labels.index(label)
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    is_pos = y == k
    needed = disease_images_needed(target_recall)
    counts = {name: int((y == i).sum()) for i, name in enumerate(labels)}
    if is_pos.sum() < needed:
        raise InputError(f"too few {label} images to promise a recall of {target_recall:g}: {int(is_pos.sum())} "
                         f"readable, the rule needs at least {needed} (with all of them detected, the one-sided "
                         f"{CONFIDENCE:.0%} lower bound of the recall is {target_recall:g} only from {needed} on)")
    if (~is_pos).sum() == 0:
        raise InputError(f"no image other than {label}: specificity and the threshold's cost cannot be measured")
    t_rel = fit_temperature(p, y) if temperature else 1.0
    q = output_probabilities(p, "probabilities", t_rel).astype(np.float64) if t_rel != 1.0 else p
    value = operating_point(q, y, k, target_recall)
    old = spec.threshold
    before_pred = apply_threshold(p, labels.index(old.label), old.value) if old else p.argmax(axis=1)
    after_pred = apply_threshold(q, k, value)
    today = datetime.now(timezone.utc).date().isoformat()
    new = Threshold(label, value, float(target_recall), f"site recalibration ({today})")
    return Recalibration(
        labels=labels, positive_label=label, target_recall=float(target_recall), disease_needed=needed,
        counts=counts, temperature_before=spec.temperature, temperature=spec.temperature * t_rel,
        nll=(negative_log_likelihood(p, y), negative_log_likelihood(q, y)),
        ece=(expected_calibration_error(p[:, k], is_pos), expected_calibration_error(q[:, k], is_pos)),
        threshold_before=old, threshold=new,
        before=bootstrap_rates(before_pred == k, is_pos, seed=seed),
        after=bootstrap_rates(after_pred == k, is_pos, seed=seed),
        bins_before=reliability_bins(p[:, k], is_pos), bins_after=reliability_bins(q[:, k], is_pos))


def apply_recalibration(probs: np.ndarray, result: Recalibration) -> np.ndarray:
    """The decisions the recalibrated file makes on images whose probabilities under the old file
    are ``probs``: the new temperature (relative to the old), then the new threshold."""
    relative = result.temperature / result.temperature_before
    q = output_probabilities(np.asarray(probs, np.float64), "probabilities", relative) if relative != 1.0 else probs
    return apply_threshold(q, result.labels.index(result.positive_label), result.threshold.value)


def calibration_set_record(paths: Sequence[str], y: Sequence[int], labels: Sequence[str], unreadable: int = 0,
                           folder: Optional[str] = None) -> dict:
    """What the metadata says about the calibration set: counts, a content hash and the date.

    The hash is the sha256 of the sorted lines ``<class>\\t<sha256 of the file's bytes>``, so
    it names the images and their labels, not their paths or order.
    """
    lines = []
    for path, c in zip(paths, y):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        lines.append(f"{labels[int(c)]}\t{h.hexdigest()}\n")
    digest = hashlib.sha256("".join(sorted(lines)).encode("utf-8")).hexdigest()
    return {"images": len(lines), "per_class": {name: int(sum(1 for c in y if int(c) == i)) for i, name in enumerate(labels)},
            "unreadable": int(unreadable), "sha256": digest, "hash_of": "sorted lines '<class>\\t<sha256 of image bytes>'",
            "folder": Path(folder).name if folder else None,
            "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}


def recalibrated_spec(spec: ModelSpec, result: Recalibration, calibration_set: dict) -> ModelSpec:
    """``spec`` with the new threshold and temperature, and ``extra["recalibration"]``: the
    calibration set, the old threshold and temperature, and the rates before and after. An earlier
    recalibration's record is kept under ``history``."""
    extra = dict(spec.extra or {})
    record = {"calibration_set": calibration_set, **result.to_dict()}
    earlier = extra.get("recalibration")
    if isinstance(earlier, dict):
        record["history"] = list(earlier.get("history", [])) + [{k: v for k, v in earlier.items() if k != "history"}]
    extra["recalibration"] = record
    short = calibration_set["sha256"][:12]
    threshold = Threshold(result.threshold.label, result.threshold.value, result.threshold.target_recall,
                          f"site recalibration: {calibration_set['images']} images, sha256 {short}, "
                          f"{calibration_set['date'][:10]}")
    return spec.replace(threshold=threshold, temperature=result.temperature,
                        positive_label=spec.positive_label or result.positive_label, extra=extra)


@dataclass(frozen=True)
class RecalibratedFile:
    """``recalibrate_file``'s outcome: the choice, the calibration set's record, the new record."""

    result: Recalibration
    calibration_set: dict
    spec: ModelSpec
    failures: Tuple[dict, ...]
    out: str
    plot: Optional[str]
    #: the domain threshold re-chosen on the site's images (``site_domain_threshold``), or None
    domain: Optional[dict] = None


def recalibrate_file(model: str, data_dir: str, target_recall: float, out: str, *,
                     positive_label: Optional[str] = None, temperature: bool = True, plot: Optional[str] = None,
                     workers: Optional[int] = None, threads: Optional[int] = None, progress: bool = False,
                     seed: int = 0, domain_threshold: bool = True) -> RecalibratedFile:
    """Run ``model`` (a lungedge ``.tflite``) on the labelled folder ``data_dir``, choose the new
    operating point (``recalibrate_outputs``) and write the recalibrated file to ``out``
    (atomically; the model's bytes are unchanged, only its records), and the reliability diagram
    to ``plot`` when given. With ``domain_threshold`` and a file with a domain gate, the gate's
    acceptance threshold is re-chosen on the site's images too (``site_domain_threshold``).

    Raises:
        ConfigError: ``out`` the same file as ``model``.
        InputError: too few disease images (see the module's rule), no readable image, or a folder
            that does not fit the model's labels.
        ModelError: the model cannot be loaded, or has no lungedge metadata.
    """
    from .classifier import Classifier
    from .atomic_write import atomic_write_bytes
    from .folder_eval import labelled_outputs
    from .metadata import embed_spec, read_spec

    if Path(out).resolve() == Path(model).resolve():
        raise ConfigError(f"--out must be a new file, not the model itself: {out!r}")
    clf = Classifier(model, threads=threads, domain_gate=False)  # the site's images are in its domain
    data = clf.model_bytes  # the one read: the file written is the file that ran
    spec = read_spec(data, name=model)
    if spec is None:
        raise ModelError(f"{model!r} has no lungedge metadata: recalibration rewrites that record")
    try:
        outputs = labelled_outputs(clf, data_dir, progress=progress, workers=workers)
    except ConfigError as exc:
        raise InputError(str(exc)) from None
    if len(outputs.y_true) == 0:
        raise InputError(f"no readable image in {data_dir!r}")
    result = recalibrate_outputs(outputs.probabilities, outputs.y_true, clf.spec, target_recall,
                                 positive_label=positive_label, temperature=temperature, seed=seed)
    record = calibration_set_record(outputs.paths, outputs.y_true, clf.labels, unreadable=len(outputs.failures),
                                    folder=data_dir)
    new_spec = recalibrated_spec(spec, result, record)
    domain = None
    if domain_threshold and spec.domain is not None and outputs.scores is not None:
        domain = site_domain_threshold(spec.domain, outputs.scores, record)
        new_spec = new_spec.replace(domain=domain["gate"])
    atomic_write_bytes(str(out), embed_spec(data, new_spec))
    if plot:
        from .reliability_plot import draw_reliability

        th = result.threshold_before
        draw_reliability(result.bins_before, result.bins_after, plot,
                         title=f"{Path(model).name} on {record['images']} images of {record['folder']}: "
                               f"{result.positive_label} probability",
                         label_before=f"before: T {result.temperature_before:.2f}, ECE {result.ece[0]:.3f}"
                                      + (f", threshold {th.value:.3f}" if th else ", argmax"),
                         label_after=f"after: T {result.temperature:.2f}, ECE {result.ece[1]:.3f}, "
                                     f"threshold {result.threshold.value:.3f}")
    return RecalibratedFile(result, record, new_spec, outputs.failures, str(out), plot, domain)


def site_domain_threshold(gate, scores: np.ndarray, calibration_set: dict) -> dict:
    """The domain gate's acceptance threshold re-chosen on a site's own images (its scanner is in
    the model's domain): their split-conformal 99th percentile, as at conversion. Returns the new
    gate and the site's refusal before and after."""
    import dataclasses

    from .domain import refused_share, threshold_from

    value = threshold_from(scores, gate.percentile)
    short = calibration_set["sha256"][:12]
    refusal = dict(gate.refusal)
    refusal["site (recalibration)"] = refused_share(scores, value)
    new = dataclasses.replace(gate, threshold=value, refusal=refusal,
                              chosen_on=f"site recalibration: {len(scores)} images, sha256 {short}, "
                                        f"{calibration_set['date'][:10]}, split-conformal 99th percentile "
                                        f"(before: {gate.threshold:.4g}, {gate.chosen_on})")
    return {"gate": new, "before": gate.threshold, "after": value, "images": int(len(scores)),
            "refused_before": refused_share(scores, gate.threshold), "refused_after": refused_share(scores, value)}


def format_recalibration(r: RecalibratedFile) -> list:
    """The lines ``lungedge recalibrate`` prints."""
    res, cs = r.result, r.calibration_set
    per = ", ".join(f"{k} {v}" for k, v in cs["per_class"].items())
    old = res.threshold_before
    lines = [
        f"calibration set: {cs['images']} images ({per}; {cs['unreadable']} unreadable), sha256 {cs['sha256'][:16]}",
        f"rule: a recall of {res.target_recall:g} can be promised only from >= {res.disease_needed} "
        f"{res.positive_label} images (all detected: one-sided {CONFIDENCE:.0%} lower bound {res.target_recall:g}); "
        f"have {res.counts[res.positive_label]}",
        f"temperature {res.temperature_before:.3f} -> {res.temperature:.3f} (negative log-likelihood "
        f"{res.nll[0]:.4f} -> {res.nll[1]:.4f}; expected calibration error {res.ece[0]:.4f} -> {res.ece[1]:.4f})",
        f"threshold on {res.positive_label}: " + (f"{old.value:.4f} ({old.chosen_on})" if old else "none (argmax)")
        + f" -> {res.threshold.value:.4f} (target recall {res.target_recall:g})",
        f"{'':8}{'sensitivity':>24}{'specificity':>24}{'accuracy':>24}   (bootstrap {CONFIDENCE:.0%} intervals)",
    ]
    for name, rates in (("before", res.before), ("after", res.after)):
        cells = "".join(f"{v[0]:>8.4f} ({v[1]:.3f}-{v[2]:.3f})" for v in (rates.sensitivity, rates.specificity,
                                                                           rates.accuracy))
        lines.append(f"{name:<8}{cells}")
    if r.domain:
        d = r.domain
        lines.append(f"domain threshold: {d['before']:.4g} -> {d['after']:.4g} (split-conformal 99th percentile of the "
                     f"site's {d['images']} images); site images refused: {100 * d['refused_before']:.1f} % -> "
                     f"{100 * d['refused_after']:.1f} %")
    lines.append(f"wrote {r.out}" + (f" and the reliability diagram {r.plot}" if r.plot else ""))
    return lines

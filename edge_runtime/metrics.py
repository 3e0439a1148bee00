"""Classification metrics with numpy only (the device has no scikit-learn)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from .errors import ConfigError


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Counts ``cm[true, predicted]``."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise ConfigError(f"y_true and y_pred differ in length: {t.shape} vs {p.shape}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def binary_auc(positive_scores: Sequence[float], is_positive: Sequence[bool]) -> Optional[float]:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half. None if one class is absent."""
    s = np.asarray(positive_scores, dtype=np.float64)
    y = np.asarray(is_positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks for ties
    uniq, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def bootstrap_auc(positive_scores: Sequence[float], is_positive: Sequence[bool], resamples: int = 2000,
                  seed: int = 0, confidence: float = 0.95) -> Optional[Tuple[float, float]]:
    """Percentile bootstrap interval of ``binary_auc``, resampling within each class (class counts
    fixed); None if one class is absent. O(images) per resample: scores are ranked once, and each
    resample only re-weights the ranked groups."""
    s = np.asarray(positive_scores, dtype=np.float64)
    y = np.asarray(is_positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    uniq, group = np.unique(s, return_inverse=True)
    u = len(uniq)
    rng = np.random.default_rng(seed)
    rows = np.arange(resamples)[:, None] * u

    def weights(members):  # (resamples, u): how often each score group is drawn
        drawn = members[rng.integers(0, len(members), (resamples, len(members)))]
        return np.bincount((drawn + rows).ravel(), minlength=resamples * u).reshape(resamples, u).astype(np.float64)

    wp, wn = weights(group[y]), weights(group[~y])
    below = np.cumsum(wn, axis=1) - wn
    aucs = (wp * (below + 0.5 * wn)).sum(axis=1) / (n_pos * n_neg)
    lo, hi = np.percentile(aucs, [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100])
    return float(lo), float(hi)


def classification_metrics(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    class_names: Sequence[str],
    probabilities: Optional[np.ndarray] = None,
) -> dict:
    """Accuracy, per-class precision/recall/F1/specificity/support, macro and weighted averages,
    the confusion matrix and, given probabilities, one-vs-rest ROC AUC per class and macro.

    Undefined ratios (no predictions or no samples of a class) are reported as 0.0, as
    scikit-learn does with ``zero_division=0``.
    """
    n = len(class_names)
    cm = confusion_matrix(y_true, y_pred, n)
    total = int(cm.sum())
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    fp = predicted - tp
    fn = support - tp
    tn = total - tp - fp - fn
    precision = _div(tp, predicted)
    recall = _div(tp, support)
    f1 = _div(2 * precision * recall, precision + recall)
    specificity = _div(tn, tn + fp)
    per_class = {}
    for i, name in enumerate(class_names):
        per_class[name] = {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "specificity": float(specificity[i]),
            "support": int(support[i]),
        }
    weights = support / support.sum() if support.sum() else np.zeros(n)
    out = {
        "n": total,
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "per_class": per_class,
        "macro": {k: float(v.mean()) for k, v in (("precision", precision), ("recall", recall), ("f1", f1), ("specificity", specificity))},
        "weighted": {k: float((v * weights).sum()) for k, v in (("precision", precision), ("recall", recall), ("f1", f1), ("specificity", specificity))},
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
    }
    if probabilities is not None and total:
        probs = np.asarray(probabilities, dtype=np.float64)
        truth = np.asarray(y_true)
        aucs = {name: binary_auc(probs[:, i], truth == i) for i, name in enumerate(class_names)}
        valid = [a for a in aucs.values() if a is not None]
        out["auc"] = {"per_class": aucs, "macro": float(np.mean(valid)) if valid else None}
        if n == 2 and valid:  # two classes: one AUC, with its bootstrap interval (class 1 as positive)
            out["auc"]["ci95"] = bootstrap_auc(probs[:, 1], truth == 1)
    return out


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(b > 0, a / np.where(b > 0, b, 1), 0.0)
    return r


def format_report(m: dict) -> str:
    """A plain-text table of ``classification_metrics`` output."""
    names = m["class_names"]
    w = max(12, *(len(n) for n in names)) + 2
    lines = [f"accuracy {m['accuracy']:.4f}  (n={m['n']})", ""]
    lines.append(f"{'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'specif.':>10}{'support':>9}")
    for name in names:
        c = m["per_class"][name]
        lines.append(f"{name:<{w}}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['f1']:>10.4f}{c['specificity']:>10.4f}{c['support']:>9d}")
    for avg in ("macro", "weighted"):
        a = m[avg]
        lines.append(f"{avg + ' avg':<{w}}{a['precision']:>10.4f}{a['recall']:>10.4f}{a['f1']:>10.4f}{a['specificity']:>10.4f}{m['n']:>9d}")
    if m.get("auc") and m["auc"].get("macro") is not None:
        ci = m["auc"].get("ci95")
        lines.append(f"\nROC AUC (one-vs-rest) macro {m['auc']['macro']:.4f}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in m["auc"]["per_class"].items() if v is not None)
            + (f" (bootstrap 95 % CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else ""))
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    cw = max(8, *(len(n) for n in names)) + 2
    lines.append(" " * w + "".join(f"{n:>{cw}}" for n in names))
    for name, row in zip(names, m["confusion_matrix"]):
        lines.append(f"{name:<{w}}" + "".join(f"{v:>{cw}d}" for v in row))
    return "\n".join(lines)

"""Evaluate converted variants against the Keras model on the same preprocessed images.

The variants run in ``edge_runtime.Classifier`` (what the device runs); the Keras model gets
exactly the same float arrays. Decisions use each model's own threshold record.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from lungedge.edge_runtime.decision import decide
from lungedge.edge_runtime.metrics import classification_metrics
from lungedge.edge_runtime.operating_point import operating_point
from lungedge.edge_runtime.spec import ModelSpec, Threshold


def keras_probabilities(model, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Keras outputs for preprocessed images (N, H, W, C; an array or ``NormalizedImages``), as
    float64 probabilities."""
    if len(x) == 0:
        return np.zeros((0, int(model.outputs[0].shape[-1])))
    # batch by batch: ``predict`` on the whole array would copy it into one tensor first
    rows = [np.asarray(model.predict_on_batch(np.asarray(x[i:i + batch_size], np.float32)), np.float64)
            for i in range(0, len(x), batch_size)]
    return np.concatenate(rows)


def tflite_probabilities(clf, x: np.ndarray, desc: str = "evaluate",
                         with_scores: bool = False):
    """Probabilities of an ``edge_runtime.Classifier`` for each preprocessed image; with
    ``with_scores`` also the domain scores (None for a file without them)."""
    from lungedge.edge_runtime.progress import bar

    rows = [clf.predict_with_score(x[i]) for i in bar(range(len(x)), desc=desc)]
    probs = np.asarray([r[0] for r in rows], np.float64).reshape(len(x), len(clf.labels))
    if not with_scores:
        return probs
    scores = None if not rows or rows[0][1] is None else np.asarray([r[1] for r in rows], np.float64)
    return probs, scores


def summarize(y_true: Sequence[int], probs: np.ndarray, spec: ModelSpec,
              threshold: Optional[Threshold]) -> dict:
    """Metrics of one model: accuracy, per-class recall, macro F1, confusion matrix, AUC."""
    pred = decide(probs, spec.labels, threshold)
    m = classification_metrics(list(y_true), pred.tolist(), list(spec.labels), probs)
    m["decision"] = f"{threshold.label} if p >= {threshold.value:.4f}" if threshold else "argmax"
    return m


def compare(keras_probs: np.ndarray, probs: np.ndarray, keras_pred: np.ndarray, pred: np.ndarray) -> dict:
    """How closely a variant follows the Keras model on the same images."""
    if len(probs) == 0:
        return {"top1_agreement": None, "decision_agreement": None, "max_prob_diff": None, "mean_prob_diff": None}
    diff = np.abs(np.asarray(probs) - np.asarray(keras_probs))
    return {
        "top1_agreement": float(np.mean(probs.argmax(1) == keras_probs.argmax(1))),
        "decision_agreement": float(np.mean(pred == keras_pred)),
        "max_prob_diff": float(diff.max()),
        "mean_prob_diff": float(diff.mean()),
    }


def rechoose_threshold(probs: np.ndarray, y_true: Sequence[int], labels: Sequence[str],
                       old: Threshold, chosen_on: str) -> Threshold:
    """Re-choose a threshold for a quantised model by the training rule recorded in ``old``
    (``edge_runtime.operating_point``). Used on the validation split only.
    """
    value = operating_point(np.asarray(probs, np.float64), y_true, list(labels).index(old.label),
                            old.target_recall, old.rule)
    return Threshold(old.label, value, old.target_recall, chosen_on, old.rule)

"""Judge converted variants against the Keras model on the same preprocessed images.

The variants run in ``edge_runtime.Classifier`` (what the device runs); the Keras model gets
exactly the same float arrays. Decisions use each model's own threshold record.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from edge_runtime.metrics import classification_metrics
from edge_runtime.spec import ModelSpec, Threshold


def decide(probs: np.ndarray, labels: Sequence[str], threshold: Optional[Threshold]) -> np.ndarray:
    """Class index per row: the threshold rule of ``edge_runtime.Classifier``, else argmax.

    With a threshold on label L: L when p(L) >= value, otherwise the most probable other class.
    """
    probs = np.asarray(probs, np.float64)
    if threshold is None:
        return probs.argmax(axis=1)
    i = list(labels).index(threshold.label)
    rest = probs.copy()
    rest[:, i] = -np.inf
    return np.where(probs[:, i] >= threshold.value, i, rest.argmax(axis=1))


def keras_probabilities(model, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Keras outputs for preprocessed images (N, H, W, C), as float64 probabilities."""
    if len(x) == 0:
        return np.zeros((0, int(model.outputs[0].shape[-1])))
    y = model.predict(x, batch_size=batch_size, verbose=0)
    return np.asarray(y, np.float64)


def tflite_probabilities(clf, x: np.ndarray, progress: bool = False, desc: str = "evaluate") -> np.ndarray:
    """Probabilities of an ``edge_runtime.Classifier`` for each preprocessed image."""
    from tqdm import tqdm

    rows = [clf.predict_proba(x[i]) for i in tqdm(range(len(x)), desc=desc, unit="img",
                                                      disable=not progress, leave=False)]
    return np.asarray(rows, np.float64).reshape(len(x), len(clf.labels))


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


def choose_threshold(probs: np.ndarray, y_true: Sequence[int], labels: Sequence[str],
                     old: Threshold, chosen_on: str) -> Threshold:
    """Re-choose a threshold for a quantised model by the training rule (train/threshold.py).

    Among the values whose recall of ``old.label`` on these images is at least the target (all
    values when there is no target), the one with the best balanced accuracy (mean per-class
    recall); ties go to the lower value. Used on the validation split only.
    """
    i = list(labels).index(old.label)
    y = np.asarray(y_true)
    p = np.asarray(probs, np.float64)
    present = [c for c in range(p.shape[1]) if (y == c).any()]
    pos = y == i
    best_value, best_score = old.value, None
    for v in np.unique(np.concatenate([p[:, i], [old.value]])):  # ascending: ties keep the lower
        pred = decide(p, labels, Threshold(old.label, float(np.clip(v, 0.0, 1.0))))
        recall = float(np.mean(pred[pos] == i)) if pos.any() else 1.0
        if old.target_recall is not None and recall + 1e-12 < old.target_recall:
            continue
        score = float(np.mean([(pred[y == c] == c).mean() for c in present]))
        if best_score is None or score > best_score + 1e-12:
            best_value, best_score = float(v), score
    return Threshold(old.label, float(np.clip(best_value, 0.0, 1.0)), old.target_recall, chosen_on)

"""The decision rule, in one place: training, conversion reports and the device all use it.

With a threshold on class L: predict L when p(L) >= the threshold, otherwise the most probable
of the other classes. Without one: the most probable class.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .spec import Threshold


#: Probabilities below this are clipped before their log is taken (temperature scaling of a
#: probability output, whose quantised zero has no logarithm).
_MIN_PROBABILITY = 1e-12


def output_probabilities(y: np.ndarray, output: str = "probabilities", temperature: float = 1.0) -> np.ndarray:
    """Class probabilities from a model's output rows ``y`` (classes,) or (N, classes).

    ``output`` "logits": softmax(y / temperature); "probabilities": y as it is at temperature 1,
    else softmax(log(y) / temperature) (the same as scaling the logits the softmax saw).
    """
    y = np.asarray(y, dtype=np.float64)
    if output == "probabilities":
        if temperature == 1.0:
            return y.astype(np.float32)
        y = np.log(np.clip(y, _MIN_PROBABILITY, None))
    z = y / float(temperature)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def apply_threshold(probs: np.ndarray, positive_index: Optional[int], value: Optional[float]) -> np.ndarray:
    """Predicted class per row of ``probs`` (N, classes); plain argmax when ``positive_index``
    or ``value`` is None."""
    probs = np.asarray(probs, dtype=np.float64)
    if positive_index is None or value is None:
        return probs.argmax(axis=1)
    rest = probs.copy()
    rest[:, positive_index] = -np.inf
    return np.where(probs[:, positive_index] >= value, positive_index, rest.argmax(axis=1))


def decide(probs: np.ndarray, labels: Sequence[str], threshold: Optional[Threshold]) -> np.ndarray:
    """``apply_threshold`` with the threshold record of a model (None: argmax)."""
    if threshold is None:
        return apply_threshold(probs, None, None)
    return apply_threshold(probs, list(labels).index(threshold.label), threshold.value)

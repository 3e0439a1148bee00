"""The operating-point rule, in one place: how a decision threshold on the disease class is chosen.

Used by training (on the validation split), by conversion (re-chosen for a quantised file) and
on the device (site recalibration). The decision rule itself is ``edge_runtime.decision``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from .decision import apply_threshold
from .errors import ConfigError
from .spec import THRESHOLD_RULES


def operating_point(probs: np.ndarray, y_true: Sequence[int], positive_index: int,
                           target_recall: Optional[float], rule: str = "balanced") -> float:
    """The threshold, among those whose recall of the positive class on these data is >= ``target_recall``,
    with the best balanced accuracy (mean per-class recall); ties go to the lower threshold.

    With ``rule="fewest-false-positives"``: the highest of those thresholds (``recall_threshold``),
    which spends the whole recall margin on specificity. For a model that will meet images from
    other sites, whose validation split is easier than the world (in-folder validation
    under-states how much a model over-calls the disease elsewhere), that is the rule that
    transferred: measured on the external X-ray dev set in train/SELECTION.md.

    Taking simply the highest threshold that meets the target would push the disease class's recall
    down to the target even when the model does better at its natural operating point; maximising
    balanced accuracy under the recall constraint moves the threshold only where it pays: up when the
    model over-calls the disease, down when the target is not met.

    Raises:
        ConfigError: no positive example, or target out of range.
    """
    if rule not in THRESHOLD_RULES:
        raise ConfigError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}, got {rule!r}")
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    is_pos = y == positive_index
    if rule == "fewest-false-positives":
        if target_recall is None:
            raise ConfigError("the fewest-false-positives rule needs a target recall")
        return recall_threshold(probs[:, positive_index], is_pos, target_recall)
    # without a recall target every threshold is allowed: best balanced accuracy overall
    t_max = 1.0 if target_recall is None else recall_threshold(probs[:, positive_index], is_pos, target_recall)
    candidates = np.unique(np.concatenate([probs[:, positive_index], [t_max]]))
    candidates = candidates[candidates <= t_max]
    present = [c for c in range(probs.shape[1]) if (y == c).any()]
    best_t, best_score = t_max, -1.0
    for t in candidates:  # ascending: ties keep the lower threshold
        pred = apply_threshold(probs, positive_index, float(t))
        score = float(np.mean([(pred[y == c] == c).mean() for c in present]))
        if score > best_score + 1e-12:
            best_t, best_score = float(t), score
    return float(np.clip(best_t, 0.0, 1.0))


def recall_threshold(positive_probs: Sequence[float], is_positive: Sequence[bool], target_recall: float) -> float:
    """The highest threshold whose recall of the positive class is >= ``target_recall``.

    The highest such threshold gives the fewest false positives for that recall. With k the
    number of positives needed (ceil(target * n_pos)), it is the k-th highest positive score.

    Raises:
        ConfigError: no positive example to choose on, or target out of range.
    """
    if not 0.0 < target_recall <= 1.0:
        raise ConfigError(f"target_recall must be in (0, 1], got {target_recall!r}")
    p = np.asarray(positive_probs, dtype=np.float64)
    y = np.asarray(is_positive, dtype=bool)
    pos = np.sort(p[y])[::-1]
    if len(pos) == 0:
        raise ConfigError("cannot choose a threshold: the validation split has no example of the positive class")
    k = int(math.ceil(target_recall * len(pos) - 1e-9))
    k = min(max(k, 1), len(pos))
    return float(np.clip(pos[k - 1], 0.0, 1.0))

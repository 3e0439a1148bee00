"""The learning floor: did a model learn anything, judged on its test images?

One rule, used by ``train``, ``convert``, ``pipeline`` and ``demo``: a model has learned when its
accuracy beats the majority-class rate (what always answering the most frequent class scores)
by more than chance explains, by a one-sided exact binomial test at ``ALPHA`` = 0.01: the
probability that a model no better than the majority rate gets at least this many test images
right is below 1 %. A model that answers one class for every image, or guesses, fails it.

With very few test images even a perfect score is not significant; the verdict is then
``undetermined`` (said, not failed). Accuracies come with a Wilson 95 % interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

#: Significance level of the one-sided binomial test.
ALPHA = 0.01

LEARNED, NOT_LEARNED, UNDETERMINED = "learned", "did not learn", "undetermined"


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (exact, stable for n in the tens of thousands)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
            for i in range(k, n + 1)]
    top = max(logs)
    return float(min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs)))


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple:
    """Wilson score 95 % interval of a proportion k/n (0, 0 when n is 0)."""
    if n == 0:
        return (0.0, 0.0)
    phat = k / n
    den = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / den
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Verdict:
    """The learning-floor verdict on one model's test predictions."""

    status: str  # LEARNED | NOT_LEARNED | UNDETERMINED
    correct: int
    n: int
    accuracy: float
    accuracy_ci95: tuple
    majority_label: str
    majority_rate: float
    p_value: float
    alpha: float = ALPHA

    @property
    def learned(self) -> bool:
        return self.status == LEARNED

    @property
    def failed(self) -> bool:
        return self.status == NOT_LEARNED

    def sentence(self) -> str:
        """One line: the verdict with its numbers."""
        core = (f"test accuracy {self.accuracy:.4f} ({self.correct}/{self.n}, 95 % CI "
                f"{self.accuracy_ci95[0]:.3f}-{self.accuracy_ci95[1]:.3f}) against the majority-class rate "
                f"{self.majority_rate:.4f} (always '{self.majority_label}'); one-sided binomial p = {self.p_value:.2g}")
        if self.status == LEARNED:
            return f"the model learned: {core} < {self.alpha:g}"
        if self.status == NOT_LEARNED:
            return f"the model did not learn: {core} >= {self.alpha:g}"
        return (f"learning floor undetermined: {core}; with {self.n} test images even a perfect score would not "
                f"be significant at {self.alpha:g}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["accuracy_ci95"] = list(self.accuracy_ci95)
        d["rule"] = (f"accuracy above the majority-class rate, one-sided exact binomial test at p < {self.alpha:g}")
        d["sentence"] = self.sentence()
        return d


def judge(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str],
          class_counts: Optional[Sequence[int]] = None, alpha: float = ALPHA) -> Verdict:
    """The verdict for predictions ``y_pred`` against ``y_true`` (class indices into ``labels``).

    Args:
        class_counts: how often each class occurs where the majority rate is taken (default: in
            ``y_true``, the test images themselves).
    """
    y = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(y_pred, dtype=np.int64)
    n = int(len(y))
    counts = np.bincount(y, minlength=len(labels)) if class_counts is None else np.asarray(class_counts)
    majority = int(np.argmax(counts))
    rate = float(counts[majority] / counts.sum()) if counts.sum() else 0.0
    correct = int((pred == y).sum())
    p = binomial_tail(correct, n, rate)
    best_possible = binomial_tail(n, n, rate)
    if p < alpha:
        status = LEARNED
    elif best_possible >= alpha:
        status = UNDETERMINED
    else:
        status = NOT_LEARNED
    return Verdict(status, correct, n, correct / n if n else 0.0, wilson_interval(correct, n),
                   str(labels[majority]), rate, p, alpha)

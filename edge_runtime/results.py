"""What classifying an image gives: a ``Prediction`` (its classes as ``Category``), a ``Failure``
(an input that could not be used, with a one-line reason) or a ``Refusal`` (the domain gate's no)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np

from .dicom import DicomInfo
from .domain import DomainVerdict


@dataclass(frozen=True)
class Category:
    """One class of a result: its position in the model's output, its name and its score."""

    index: int
    label: str
    score: float

    def to_dict(self) -> dict:
        return {"index": self.index, "label": self.label, "score": self.score}


@dataclass(frozen=True)
class Prediction:
    """One image's result.

    Attributes:
        label: the decision: the model's decision threshold applied when it has one
            (``threshold_applied``), else the most probable class.
        probabilities: every class's probability, ``{label: score}``, in output order.
        index: the decision's position in the model's output.
        categories: the classes by descending score, limited by the classifier's
            ``max_results`` and ``score_threshold`` (MediaPipe's ``ClassifierOptions``).
    """

    label: str
    probabilities: dict
    source: str = ""
    preprocess_ms: float = 0.0
    invoke_ms: float = 0.0
    total_ms: float = 0.0
    threshold_applied: bool = False
    #: what a DICOM file said about itself (no patient data in ``to_dict``); None for other images
    dicom: Optional[DicomInfo] = None
    #: class activation map of the predicted class (h, w) float32, when asked for and the model has one
    heatmap: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    index: int = -1
    categories: Tuple[Category, ...] = ()
    #: the domain gate's verdict (``edge_runtime.domain``); None for a model without a gate.
    #: A prediction with ``domain.in_domain`` False exists only with ``allow_out_of_domain``.
    domain: Optional[DomainVerdict] = None

    @property
    def in_domain(self) -> Optional[bool]:
        return None if self.domain is None else self.domain.in_domain

    @property
    def score(self) -> float:
        """The decision's probability."""
        return float(self.probabilities[self.label])

    def top_k(self, k: int) -> list:
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]

    def to_dict(self, keep_phi: bool = False) -> dict:
        d = {
            "source": self.source,
            "label": self.label,
            "index": self.index,
            "probabilities": self.probabilities,
            "categories": [c.to_dict() for c in self.categories],
            "threshold_applied": self.threshold_applied,
            "timing_ms": {"preprocess": self.preprocess_ms, "invoke": self.invoke_ms, "total": self.total_ms},
        }
        if self.domain is not None:
            d.update(self.domain.to_dict())
        if self.dicom is not None:
            d["sop_instance_uid"] = self.dicom.sop_instance_uid
            d["dicom"] = self.dicom.to_dict(keep_phi=keep_phi)
        return d


@dataclass(frozen=True)
class Failure:
    """An input that could not be classified, with a one-line reason."""

    source: str
    error: str

    def to_dict(self) -> dict:
        return {"source": self.source, "error": self.error}


@dataclass(frozen=True)
class Refusal(Failure):
    """An image the domain gate refused: no class is given for it (``OUT OF DOMAIN``).

    It counts as an input that could not be used (exit code 1), like any ``Failure``.
    ``hidden`` is what the model would have answered, kept for ``evaluate``'s figures on all
    images; interfaces never show it.
    """

    verdict: Optional[DomainVerdict] = None
    hidden: Optional[Prediction] = field(default=None, repr=False, compare=False)
    dicom: Optional[DicomInfo] = None

    def to_dict(self, keep_phi: bool = False) -> dict:
        d = {"source": self.source, **(self.verdict.to_dict() if self.verdict else {"in_domain": False})}
        d["error"] = self.error
        if self.dicom is not None:
            d["sop_instance_uid"] = self.dicom.sop_instance_uid
            d["dicom"] = self.dicom.to_dict(keep_phi=keep_phi)
        return d

"""The domain gate on the device: is this image of the kind the model was built for?

Two stages, each with its own reason, and one verdict (``DomainVerdict``):

1. cheap checks before the model (``check_frame``, ``check_dicom``): a blank, near-constant or
   saturated frame; an image far outside the training images' aspect ratio or too small; a
   DICOM header that says another modality, another body part or a lateral view;
2. the model's own ``domain_score`` output (``convert.domain``: Mahalanobis distance of its
   features to the training images), refused above the file's acceptance threshold.

A refused image gets no class: every interface shows ``OUT OF DOMAIN`` with the reason and the
score against the threshold, and it counts as an input that could not be used (exit code 1).
The record of the gate travels in the model's metadata (``ModelSpec.domain``).

numpy only: this runs on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from .errors import ConfigError

#: The score's method and version, as recorded in the metadata.
METHOD = "mahalanobis-ledoit-wolf"
METHOD_VERSION = 1
#: Name of the score's output tensor.
SCORE_OUTPUT = "domain_score"
#: The validation images' (split-conformal) percentile taken as the acceptance threshold.
PERCENTILE = 99.0

#: A frame whose grey levels have a standard deviation below this (0..255) carries no image.
MIN_PIXEL_STD = 3.0
#: A frame with more than this share of its pixels at 0 or at 255 is saturated (failed exposure),
#: unless the training images reach closer to it (``saturation_limit_from``): CT slices near the
#: lung apex are up to 91 % black background (IQ-OTH/NCCD, measured).
MAX_SATURATED = 0.98
#: An image whose aspect ratio is more than this factor outside the training images' range, and
#: outside ``ASPECT_ALWAYS`` (datasets are often stored resized to squares: their range says
#: nothing about the scanner's images, which are portrait or landscape by up to about 1.6).
ASPECT_FACTOR = 1.5
ASPECT_ALWAYS = (0.5, 2.0)
#: An image whose shorter side is under this many pixels holds too little to judge.
MIN_SIDE = 32
#: The polarity check: an accepted image scoring at least this share of the threshold is scored
#: again with its grey levels inverted (a second invoke), and refused as a negative when the
#: inverse fits the training images better. Inverted images that pass the score sit just under the
#: threshold (measured: X-ray int8 0.6-1.0 of it, CT int8 0.88-1.0), in-domain images mostly far
#: under it (3-5 % of the test splits at 0.7 or more, so the second invoke is rare); the rule
#: refused 1 of 846 in-domain X-rays and caught 41 of the 43 inverted ones the score let through
#: (docs/DOMAIN.md). An upright image's negative scores far higher than it, so the rule needs no
#: threshold of its own.
POLARITY_BAND = 0.7
#: The polarity check is written into a file only when, on the file's own validation images, it
#: refuses at most this share of them (a weakly trained model's features may not tell an image
#: from its negative: the suite's tiny models refused 12 of 120 of their own test images, and real
#: X-rays, as negatives on CI's machine).
POLARITY_MAX_REFUSAL = 0.005
#: The structure check (neighbouring pixels' correlation, ``structure``) refuses below half the
#: training images' 1st percentile, at most this: radiographs and CT slices resized to the model
#: measure 0.79-0.99 (IQ-OTH/NCCD, Kermany), noise about 0. Training images without structure
#: (a floor under ``MIN_STRUCTURE_FLOOR``) turn the check off.
MAX_STRUCTURE_FLOOR = 0.3
MIN_STRUCTURE_FLOOR = 0.05

#: DICOM Body Part Examined values a chest model is for (DICOM PS3.16 CID 4031 and common use).
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_ABDOMEN", "CHESTABDOMEN", "TORSO", "WHOLEBODY")
#: DICOM View Position values of a frontal chest X-ray.
FRONTAL_VIEWS = ("PA", "AP", "")


@dataclass(frozen=True)
class DomainVerdict:
    """Whether an image is in the model's domain, and why not."""

    in_domain: bool
    score: Optional[float] = None
    threshold: Optional[float] = None
    reason: Optional[str] = None
    #: "frame", "dicom", "score" or "polarity": which stage refused it (None when accepted)
    stage: Optional[str] = None

    def to_dict(self) -> dict:
        d = {"in_domain": self.in_domain, "domain_score": self.score, "domain_threshold": self.threshold}
        if not self.in_domain:
            d["domain_reason"] = self.reason
        return d

    def text(self) -> str:
        """``OUT OF DOMAIN: reason (score s > threshold t)`` or the accepted score."""
        against = (f"score {self.score:.3g} vs threshold {self.threshold:.3g}"
                   if self.score is not None and self.threshold is not None else "")
        if self.in_domain:
            return f"in domain ({against})" if against else "in domain"
        if self.stage == "score" or not against:
            return f"OUT OF DOMAIN: {self.reason}"
        return f"OUT OF DOMAIN: {self.reason} ({against})"


@dataclass(frozen=True)
class DomainGate:
    """The gate's record in a model's metadata (``ModelSpec.domain``).

    Attributes:
        threshold: refuse an image whose ``domain_score`` is above this.
        method, version, layer, dimension: how the score is computed (``convert.domain``).
        chosen_on: where the threshold comes from (e.g. "validation split, 782 images, p99 of
            this file's scores", or a site's recalibration).
        aspect_range: (min, max) width/height of the images the statistics were fitted on.
        refusal: measured refusal rates ``{set: share}`` (validation, development sets).
        fit: the fit's details (images, shrinkage, classes) for the model card.
    """

    threshold: float
    method: str = METHOD
    version: int = METHOD_VERSION
    output: str = SCORE_OUTPUT
    layer: str = ""
    dimension: int = 0
    percentile: float = PERCENTILE
    chosen_on: str = "validation"
    aspect_range: Optional[Tuple[float, float]] = None
    #: refuse frames whose ``structure`` is below this (None: no such check)
    structure_floor: Optional[float] = None
    #: refuse frames with more than this share of black or of white pixels (None: ``MAX_SATURATED``)
    saturation_limit: Optional[float] = None
    #: the polarity check (``judge_polarity``) is on (conversion turns it off when it measured
    #: refusing more than ``POLARITY_MAX_REFUSAL`` of the validation images)
    polarity: bool = True
    refusal: dict = None  # type: ignore[assignment]
    fit: dict = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) \
                or not np.isfinite(self.threshold) or self.threshold <= 0:
            raise ConfigError(f"domain threshold must be a positive number, got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        if self.method != METHOD:
            raise ConfigError(f"unknown domain method {self.method!r} (this lungedge reads {METHOD!r})")
        if self.aspect_range is not None:
            lo, hi = (float(x) for x in self.aspect_range)
            if not 0 < lo <= hi:
                raise ConfigError(f"domain aspect_range must be (min, max) with 0 < min <= max, got {self.aspect_range!r}")
            object.__setattr__(self, "aspect_range", (lo, hi))
        if self.structure_floor is not None:
            if not isinstance(self.structure_floor, (int, float)) or isinstance(self.structure_floor, bool) \
                    or not -1.0 <= float(self.structure_floor) <= 1.0:
                raise ConfigError(f"domain structure_floor must be a number from -1 to 1, got {self.structure_floor!r}")
            object.__setattr__(self, "structure_floor", float(self.structure_floor))
        if self.saturation_limit is not None:
            if not isinstance(self.saturation_limit, (int, float)) or isinstance(self.saturation_limit, bool) \
                    or not 0.5 <= float(self.saturation_limit) <= 1.0:
                raise ConfigError(f"domain saturation_limit must be a number from 0.5 to 1, got {self.saturation_limit!r}")
            object.__setattr__(self, "saturation_limit", float(self.saturation_limit))
        if not isinstance(self.polarity, bool):
            raise ConfigError(f"domain polarity must be true or false, got {self.polarity!r}")
        for name in ("refusal", "fit"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, {})
            elif not isinstance(value, dict):
                raise ConfigError(f"domain {name} must be an object, got {type(value).__name__}")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("threshold", "method", "version", "output", "layer", "dimension",
                                           "percentile", "chosen_on", "structure_floor", "saturation_limit",
                                           "polarity", "refusal", "fit")}
        d["aspect_range"] = list(self.aspect_range) if self.aspect_range else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DomainGate":
        from .spec import dataclass_from_dict

        return dataclass_from_dict(cls, d, "domain gate")

    def judge(self, score: float) -> DomainVerdict:
        if score > self.threshold:
            return DomainVerdict(False, float(score), self.threshold,
                                 f"unlike the images the model was trained on (domain score {score:.3g} > "
                                 f"threshold {self.threshold:.3g})", "score")
        return DomainVerdict(True, float(score), self.threshold)

    def needs_polarity_check(self, score: float) -> bool:
        """Whether an accepted ``score`` is close enough to the threshold to check the polarity."""
        return self.polarity and POLARITY_BAND * self.threshold <= score <= self.threshold

    def judge_polarity(self, score: float, inverse_score: float) -> DomainVerdict:
        """The verdict once the image's negative scored ``inverse_score``: a negative that is
        closer to the training images than the image itself means the image is the negative."""
        if is_negative(score, inverse_score):
            return DomainVerdict(False, float(score), self.threshold,
                                 f"looks like a negative (inverted grey levels): inverted back it scores "
                                 f"{inverse_score:.3g}, closer to the training images than its own {score:.3g}",
                                 "polarity")
        return DomainVerdict(True, float(score), self.threshold)


def _grey(pixels: np.ndarray) -> np.ndarray:
    """The frame's grey levels, float32 (the mean of the channels)."""
    if pixels.ndim != 3:
        return pixels.astype(np.float32)
    c = pixels.shape[-1]
    total = pixels[:, :, 0].astype(np.float32)
    for k in range(1, c):  # channel by channel: numpy's mean over a last axis of 3 is 4x slower
        total += pixels[:, :, k]
    return total * np.float32(1.0 / c) if c > 1 else total


def _structure_of(g: np.ndarray) -> float:
    def corr(a, b):
        a, b = a - a.mean(dtype=np.float64), b - b.mean(dtype=np.float64)
        den = np.sqrt(float(np.vdot(a, a)) * float(np.vdot(b, b)))
        return float(np.vdot(a, b)) / den if den > 0 else 1.0

    return min(corr(g[:, :-1], g[:, 1:]), corr(g[:-1], g[1:]))


def structure(pixels: np.ndarray) -> float:
    """How much spatial structure a frame has: the smaller of the correlations of each pixel with
    its right and its lower neighbour (grey levels). About 0 for noise, 0.8-1 for radiographs."""
    return _structure_of(_grey(pixels))


def structure_floor_from(values: Sequence[float]) -> Optional[float]:
    """The structure check's floor from the training images' ``structure`` values (None: off)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return None
    floor = min(MAX_STRUCTURE_FLOOR, 0.5 * float(np.percentile(v, 1)))
    return floor if floor >= MIN_STRUCTURE_FLOOR else None


def saturated_share(pixels: np.ndarray) -> float:
    """The larger of the shares of black (0) and of white (255) pixels of a frame."""
    return max(_saturation_of(_grey(pixels)))


def _saturation_of(g: np.ndarray) -> Tuple[float, float]:
    return float(np.count_nonzero(g <= 0.5)) / g.size, float(np.count_nonzero(g >= 254.5)) / g.size


def saturation_limit_from(values: Sequence[float]) -> float:
    """The saturation check's limit from the training images' ``saturated_share``: at least
    ``MAX_SATURATED``, and above the most saturated training image (its share + 0.015), at most 0.995."""
    v = np.asarray(values, np.float64)
    top = float(v.max()) if len(v) else 0.0
    return float(min(0.995, max(MAX_SATURATED, top + 0.015)))


def check_frame(pixels: np.ndarray, size: Optional[Tuple[int, int]] = None,
                aspect_range: Optional[Tuple[float, float]] = None,
                structure_floor: Optional[float] = None, saturation_limit: Optional[float] = None) -> Optional[str]:
    """The reason a decoded frame is refused before the model, or None.

    Args:
        pixels: the uint8 frame as decoded and resized (H, W, C).
        size: the image's own (width, height) before resizing, when known.
        aspect_range: the training images' (min, max) width/height.
        structure_floor: refuse a frame whose ``structure`` is below this (noise).
        saturation_limit: refuse a frame with more than this share of black or white pixels
            (default ``MAX_SATURATED``).
    """
    grey = _grey(pixels)  # once: every check reads it (about 1 ms for 224 x 224 on one core)
    std = float(grey.std(dtype=np.float64))
    if std < MIN_PIXEL_STD:
        return f"blank or near-constant frame (pixel standard deviation {std:.2f} of 255, under {MIN_PIXEL_STD:g})"
    for share, what in zip(_saturation_of(grey), ("black", "white")):
        if share > (MAX_SATURATED if saturation_limit is None else saturation_limit):
            return f"saturated frame ({100 * share:.0f} % of the pixels {what}; a failed exposure?)"
    if structure_floor is not None:
        r = _structure_of(grey)
        if r < structure_floor:
            return (f"no image structure (neighbouring pixels correlate {r:.2f}, under {structure_floor:.2f}): "
                    "noise or a corrupted frame?")
    if size is not None:
        w, h = size
        if min(w, h) < MIN_SIDE:
            return f"image too small to judge ({w}x{h}, shorter side under {MIN_SIDE} px)"
        if aspect_range is not None:
            aspect = w / h
            lo, hi = aspect_range
            low, high = min(lo / ASPECT_FACTOR, ASPECT_ALWAYS[0]), max(hi * ASPECT_FACTOR, ASPECT_ALWAYS[1])
            if aspect < low or aspect > high:
                return (f"aspect ratio {aspect:.2f} far outside the training images' {lo:.2f}-{hi:.2f} "
                        f"(accepted: {low:.2f}-{high:.2f})")
    return None


def check_dicom(modality: str, body_part: str, view: str, expected: Optional[Sequence[str]],
                chest: bool = True, frontal: bool = False) -> Optional[str]:
    """The reason a DICOM header says the image is not for the model, or None.

    Args:
        modality, body_part, view: the header's Modality, BodyPartExamined, ViewPosition ("" when absent).
        expected: the modalities the model is for (``dicom.expected_modalities``), None: any.
        chest: the model is for the chest (BodyPartExamined must say so when present).
        frontal: the model is for frontal views (a LATERAL ViewPosition is refused).
    """
    if expected and modality and modality.upper() not in expected:
        return f"DICOM modality {modality!r}, the model is for {', '.join(expected)}"
    part = body_part.strip().upper().replace(" ", "")
    if chest and part and part not in CHEST_BODY_PARTS:
        return f"DICOM body part {body_part!r}, the model is for the chest"
    v = view.strip().upper()
    if frontal and v not in FRONTAL_VIEWS:
        return f"DICOM view position {view!r}, the model is for frontal (PA/AP) chest X-rays"
    return None


def polarity_refusals(scores: np.ndarray, inverse_scores: np.ndarray, threshold: float) -> np.ndarray:
    """Which images (``scores``, their negatives' ``inverse_scores``) the polarity check refuses."""
    s, inv = np.asarray(scores, np.float64), np.asarray(inverse_scores, np.float64)
    band = (s >= POLARITY_BAND * threshold) & (s <= threshold)
    return band & is_negative(s, inv)


def is_negative(score, inverse_score):
    """The polarity rule: an image whose negative fits the training images better is the negative."""
    return np.isfinite(inverse_score) & (inverse_score < score)


def threshold_from(scores: np.ndarray, percentile: float = PERCENTILE) -> float:
    """The acceptance threshold from in-domain validation ``scores``: their split-conformal
    ``percentile`` quantile, the ``ceil((n + 1) p)``-th smallest score (the largest when that
    exceeds n). For unseen images exchangeable with them, at most ``1 - p`` are refused in
    expectation, whatever the scores' distribution: with 120 validation images that is their
    largest score, with 780 about their 99.2nd percentile (a plain 99th percentile of a few
    hundred images refuses more than 1 % of new ones)."""
    s = np.sort(np.asarray(scores, np.float64))
    s = s[np.isfinite(s)]
    if not len(s):
        raise ConfigError("no finite domain scores to choose a threshold from")
    k = int(np.ceil((len(s) + 1) * percentile / 100.0))
    return float(s[min(k, len(s)) - 1])


def refused_share(scores: np.ndarray, threshold: float) -> float:
    s = np.asarray(scores, np.float64)
    return float(np.mean(s > threshold)) if len(s) else float("nan")

"""The model metadata record: what a `.tflite` file carries about itself.

One JSON object, stored in the TFLite flatbuffer's metadata table under the name
``lungedge``. It is the contract between training/conversion (which write it) and the
device (which reads it): labels, preprocessing and the decision threshold travel with
the model, never as constants in code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Tuple

from .domain import DomainGate
from .errors import ConfigError

SCHEMA = "lungedge.model/1"
COLOR_MODES = ("rgb", "grayscale")
CONTRAST_METHODS = ("none", "clahe")
RESIZE_METHODS = ("bilinear", "bicubic", "nearest", "lanczos", "box")
OUTPUT_KINDS = ("probabilities", "logits")
#: How a threshold is chosen under the recall target (``edge_runtime.operating_point``): "balanced"
#: (the best balanced accuracy among the thresholds that meet it) or "fewest-false-positives"
#: (the highest threshold that meets it).
THRESHOLD_RULES = ("balanced", "fewest-false-positives")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor.

    The float input is ``(pixel - mean) / std`` per channel, pixels in 0..255.
    MobileNetV2's own ``preprocess_input`` is mean=127.5, std=127.5 (range -1..1).
    ``contrast`` "clahe" equalises the resized image first (``edge_runtime.contrast``, OpenCV's
    CLAHE with ``clahe_clip_limit`` and ``clahe_tiles`` x ``clahe_tiles`` tiles); "none" leaves it.
    """

    height: int = 224
    width: int = 224
    color_mode: str = "rgb"
    resize: str = "bilinear"
    mean: Tuple[float, ...] = (127.5,)
    std: Tuple[float, ...] = (127.5,)
    contrast: str = "none"
    clahe_clip_limit: float = 2.0
    clahe_tiles: int = 8

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 8 <= value <= 4096:
                raise ConfigError(f"preprocessing {name} must be an integer from 8 to 4096, got {value!r}")
        if not isinstance(self.color_mode, str) or self.color_mode not in COLOR_MODES:
            raise ConfigError(f"color_mode must be one of {', '.join(COLOR_MODES)}, got {_short(self.color_mode)}")
        if not isinstance(self.resize, str) or self.resize not in RESIZE_METHODS:
            raise ConfigError(f"resize must be one of {', '.join(RESIZE_METHODS)}, got {_short(self.resize)}")
        object.__setattr__(self, "mean", _floats("mean", self.mean, self.channels))
        object.__setattr__(self, "std", _floats("std", self.std, self.channels))
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be positive, got {self.std!r}")
        if not isinstance(self.contrast, str) or self.contrast not in CONTRAST_METHODS:
            raise ConfigError(f"contrast must be one of {', '.join(CONTRAST_METHODS)}, got {_short(self.contrast)}")
        clip = self.clahe_clip_limit
        if not _is_number(clip) or not 0.0 <= float(clip) <= 256.0:
            raise ConfigError(f"clahe_clip_limit must be a number from 0 to 256, got {_short(clip)}")
        object.__setattr__(self, "clahe_clip_limit", float(clip))
        tiles = self.clahe_tiles
        if not isinstance(tiles, int) or isinstance(tiles, bool) or not 1 <= tiles <= 64 or tiles > min(self.height, self.width):
            raise ConfigError(f"clahe_tiles must be an integer from 1 to 64 and at most the image side, got {_short(tiles)}")

    @property
    def channels(self) -> int:
        return 3 if self.color_mode == "rgb" else 1

    @property
    def size(self) -> Tuple[int, int]:
        """(width, height), Pillow's order."""
        return (self.width, self.height)

    @property
    def contrast_text(self) -> str:
        """The contrast step in words for reports ("" when there is none)."""
        if self.contrast != "clahe":
            return ""
        return f"CLAHE (OpenCV's, clip limit {self.clahe_clip_limit:g}, {self.clahe_tiles}x{self.clahe_tiles} tiles)"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.contrast == "none":  # files without contrast normalisation read as before
            for name in ("contrast", "clahe_clip_limit", "clahe_tiles"):
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return dataclass_from_dict(cls, d, "preprocessing")


@dataclass(frozen=True)
class Threshold:
    """Decision rule: predict ``label`` when its probability is >= ``value``, otherwise
    the most probable of the other classes. Chosen on validation data for a target recall."""

    label: str
    value: float
    target_recall: Optional[float] = None
    chosen_on: str = "validation"
    rule: str = "balanced"

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ConfigError(f"threshold label must be a class name, got {_short(self.label)}")
        if not _is_number(self.value) or not 0.0 <= float(self.value) <= 1.0:
            raise ConfigError(f"threshold value must be in [0, 1], got {_short(self.value)}")
        object.__setattr__(self, "value", float(self.value))
        if self.target_recall is not None and (not _is_number(self.target_recall) or not 0.0 <= float(self.target_recall) <= 1.0):
            raise ConfigError(f"threshold target_recall must be in [0, 1] or null, got {_short(self.target_recall)}")
        if not isinstance(self.chosen_on, str):
            raise ConfigError(f"threshold chosen_on must be text, got {_short(self.chosen_on)}")
        if self.rule not in THRESHOLD_RULES:
            raise ConfigError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}, got {_short(self.rule)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Threshold":
        return dataclass_from_dict(cls, d, "threshold")


@dataclass(frozen=True)
class ModelSpec:
    """Everything a runtime needs to use a classifier correctly.

    ``temperature`` divides the logits before the softmax (for a probability output: the log
    probabilities), as set by site recalibration (``edge_runtime.recalibration``); 1 changes nothing.
    """

    labels: Tuple[str, ...]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    output: str = "probabilities"
    positive_label: Optional[str] = None
    threshold: Optional[Threshold] = None
    recipe: Optional[str] = None
    variant: Optional[str] = None
    versions: dict = field(default_factory=dict)
    training_fingerprint: Optional[str] = None
    source_model_sha256: Optional[str] = None
    extra: dict = field(default_factory=dict)
    temperature: float = 1.0
    #: what the model is for: ``{"modality", "view", "body_part", "population", "site", "note"}``
    #: (written at training from the recipe and the data; shown by ``inspect``, the card, the web page)
    intended: dict = field(default_factory=dict)
    #: the domain gate (``edge_runtime.domain``): None for a file without a ``domain_score`` output
    domain: Optional[DomainGate] = None
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        labels = tuple(self.labels) if isinstance(self.labels, (list, tuple)) else None
        if not labels or not all(isinstance(x, str) and x for x in labels):
            raise ConfigError(f"labels must be a non-empty list of names, got {_short(self.labels)}")
        if len(set(labels)) != len(labels):
            dupes = sorted({x for x in labels if labels.count(x) > 1})
            raise ConfigError(f"labels must be unique; repeated: {dupes[:5]}")
        object.__setattr__(self, "labels", labels)
        if isinstance(self.preprocessing, dict):
            object.__setattr__(self, "preprocessing", Preprocessing.from_dict(self.preprocessing))
        if not isinstance(self.preprocessing, Preprocessing):
            raise ConfigError(f"preprocessing must be an object, got {_short(self.preprocessing)}")
        if isinstance(self.threshold, dict):
            object.__setattr__(self, "threshold", Threshold.from_dict(self.threshold))
        if self.threshold is not None and not isinstance(self.threshold, Threshold):
            raise ConfigError(f"threshold must be an object or null, got {_short(self.threshold)}")
        for name in ("positive_label", "recipe", "variant", "training_fingerprint", "source_model_sha256"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be text or null, got {_short(value)}")
        if isinstance(self.domain, dict):
            object.__setattr__(self, "domain", DomainGate.from_dict(self.domain))
        if self.domain is not None and not isinstance(self.domain, DomainGate):
            raise ConfigError(f"domain must be an object or null, got {_short(self.domain)}")
        for name in ("versions", "extra", "intended"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be an object, got {_short(getattr(self, name))}")
        if not _is_number(self.temperature) or not 0.01 <= float(self.temperature) <= 100.0:
            raise ConfigError(f"temperature must be a number from 0.01 to 100, got {_short(self.temperature)}")
        object.__setattr__(self, "temperature", float(self.temperature))
        if not isinstance(self.output, str) or self.output not in OUTPUT_KINDS:
            raise ConfigError(f"output must be one of {', '.join(OUTPUT_KINDS)}, got {self.output!r}")
        for name, value in (("positive_label", self.positive_label),
                            ("threshold label", self.threshold.label if self.threshold else None)):
            if value is not None and value not in labels:
                raise ConfigError(f"{name} {value!r} is not one of the labels {list(labels)[:20]!r}")
        if not isinstance(self.schema, str) or not self.schema.startswith("lungedge.model/"):
            raise ConfigError(f"unknown metadata schema {self.schema!r}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def replace(self, **changes: Any) -> "ModelSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["labels"] = list(self.labels)
        d["preprocessing"] = self.preprocessing.to_dict()
        d["threshold"] = self.threshold.to_dict() if self.threshold else None
        d["domain"] = self.domain.to_dict() if self.domain else None
        if not self.intended:  # files without them read as before
            del d["intended"]
        if self.domain is None:
            del d["domain"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return dataclass_from_dict(cls, d, "model metadata")

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        return cls.from_dict(json_object(text, "model metadata"))


def json_object(text: str, what: str) -> Any:
    """Parse the JSON of a record (model metadata, a recipe).

    Raises:
        ConfigError: not valid JSON, naming ``what``.
    """
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{what} is not valid JSON ({exc})") from None


def _floats(name: str, values: Sequence[float], channels: int) -> Tuple[float, ...]:
    if _is_number(values):
        values = (values,)
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"{name} must be a number or a list of numbers, got {_short(values)}")
    values = list(values)
    if not all(_is_number(v) for v in values):
        raise ConfigError(f"{name} must be a number or a list of numbers, got {_short(values)}")
    out = tuple(float(v) for v in values)
    if len(out) not in (1, channels) or not all(math.isfinite(v) for v in out):
        raise ConfigError(f"{name} must have 1 or {channels} finite values, got {_short(values)}")
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _short(value: Any) -> str:
    """A value quoted for a one-line message: its repr, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def dataclass_from_dict(cls, d: Any, what: str):
    """Build dataclass ``cls`` from a JSON object, refusing unknown or missing fields in one line."""
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a JSON object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{what} has unknown field(s) {unknown}; known: {sorted(names)}")
    try:
        return cls(**d)
    except TypeError as exc:
        raise ConfigError(f"{what} is incomplete: {exc}") from None

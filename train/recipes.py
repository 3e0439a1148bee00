"""Named training recipes: frozen dataclasses that validate themselves and round-trip through JSON.

The two paper recipes reproduce the published set-ups as closely as the papers state them:

* ``xray-pneumonia``: Kermany chest X-ray NORMAL/PNEUMONIA, random per-class split 75/15/10,
  224x224 RGB, MobileNetV2 ImageNet base frozen, new head (GAP, Dense 128 relu, Dropout 0.5,
  softmax; the X-ray paper does not state its head, so the CT paper's is used), augmentation
  of the training set, Adam 1e-3, 20 epochs, batch 32.
* ``ct-lung-cancer``: IQ-OTH/NCCD normal/benign/malignant, stratified 70/15/15, same head, Adam
  1e-3, batch 32, up to 50 epochs, early stopping on validation accuracy (patience 5).

The ``-plus`` recipes are this project's attempt to beat them honestly: patient-grouped splits
for X-ray, class weights, a fine-tuning phase of the top blocks at a low learning rate, and a
decision threshold chosen on validation data for a high recall of the disease class.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from lungedge.edge_runtime.dicom import MODALITIES
from lungedge.edge_runtime.errors import ConfigError
from lungedge.edge_runtime.spec import COLOR_MODES, CONTRAST_METHODS, THRESHOLD_RULES, dataclass_from_dict, json_object

#: "blocked": groups of ``split_block`` consecutive slice numbers per class stand in for patients
#: (numbered CT slices without patient ids; see ``train.dataset.Dataset.slice_blocks``). The default 16
#: is about two benign IQ-OTH/NCCD patients, and the largest size for which every part of every fold
#: of a 5-fold CV on the 96 benign slices here holds benign slices, for 20 of 20 seeds (18: 11 of 20).
SPLITS = ("random", "grouped", "blocked")
MONITORS = ("val_accuracy", "val_loss")
LR_SCHEDULES = ("constant", "cosine")
#: When augmentation applies: every phase, or only fine-tuning (the head then trains on cached
#: base features, fast, and the augmentation shapes the fine-tuned base).
AUGMENT_PHASES = ("all", "fine_tune")


_build = dataclass_from_dict


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be an integer from {lo} to {hi}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if not _is_number(value) or float(value) <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Augment:
    """Augmentation that suits radiographs: small geometric changes and intensity jitter.

    ``rotation`` is in degrees; ``shift`` and ``zoom`` are fractions of the image size;
    ``brightness`` and ``contrast`` are fractions of the pixel range. Horizontal flip is off by
    default: anatomy is not left-right symmetric (heart, markers), so it is an option only.

    The intensity changes that differ between X-ray machines and sites (all off by default):
    ``gamma``: pixel = 255 * (pixel / 255) ** g with log g uniform in [-gamma, gamma];
    ``blur``: Gaussian blur of a standard deviation uniform in [0, blur] pixels;
    ``noise``: Gaussian noise of a standard deviation uniform in [0, noise] of the pixel range;
    ``crop``: a random crop of at least ``1 - crop`` of each side, resized back.
    """

    rotation: float = 10.0
    shift: float = 0.05
    zoom: float = 0.10
    brightness: float = 0.10
    contrast: float = 0.10
    horizontal_flip: bool = False
    gamma: float = 0.0
    blur: float = 0.0
    noise: float = 0.0
    crop: float = 0.0

    def __post_init__(self) -> None:
        for name, hi in (("rotation", 90.0), ("shift", 0.5), ("zoom", 0.5), ("brightness", 0.5), ("contrast", 0.9),
                         ("gamma", 1.0), ("blur", 5.0), ("noise", 0.2), ("crop", 0.5)):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= float(value) <= hi:
                raise ConfigError(f"augment.{name} must be a number from 0 to {hi}, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.horizontal_flip, bool):
            raise ConfigError(f"augment.horizontal_flip must be true or false, got {self.horizontal_flip!r}")


@dataclass(frozen=True)
class FineTune:
    """Optional second phase: unfreeze the top ``blocks`` inverted-residual blocks (of 16, plus
    the final 1x1 convolution) and train ``epochs`` more at ``learning_rate`` (``lr_schedule``
    "cosine": decayed to 0 over the phase). BatchNorm layers stay frozen (inference mode), the
    usual practice for small datasets. ``early_stopping`` False: the phase runs all its epochs and
    keeps the last weights (in-folder validation loss is a poor guide to other sites: measured in
    train/SELECTION.md). ``ema_epochs`` > 0: the weights kept at the end of the phase are the
    exponential moving average of the weights over the phase's steps (Keras's optimizer EMA), with
    a time constant of that many epochs (momentum 1 - 1 / (ema_epochs x steps per epoch)); it needs
    ``early_stopping`` False, since the average is applied when the phase ends."""

    epochs: int = 0
    blocks: int = 0
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"
    early_stopping: bool = True
    ema_epochs: float = 0.0

    def __post_init__(self) -> None:
        _check_int("fine_tune.epochs", self.epochs, 0, 1000)
        _check_int("fine_tune.blocks", self.blocks, 0, 16)
        _check_positive("fine_tune.learning_rate", self.learning_rate)
        object.__setattr__(self, "learning_rate", float(self.learning_rate))
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"fine_tune.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not isinstance(self.early_stopping, bool):
            raise ConfigError(f"fine_tune.early_stopping must be true or false, got {self.early_stopping!r}")
        if not _is_number(self.ema_epochs) or not 0.0 <= float(self.ema_epochs) <= 1000:
            raise ConfigError(f"fine_tune.ema_epochs must be a number of epochs in [0, 1000], got {self.ema_epochs!r}")
        object.__setattr__(self, "ema_epochs", float(self.ema_epochs))
        if self.ema_epochs and self.early_stopping:
            raise ConfigError("fine_tune.ema_epochs needs fine_tune.early_stopping=false: the average is applied when "
                              "the phase ends, so there is no best epoch to go back to")

    @property
    def enabled(self) -> bool:
        return self.epochs > 0 and self.blocks > 0


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a training run. Every field can be overridden (``replace``)."""

    name: str
    description: str = ""
    #: what the model is for, declared (``edge_runtime.dicom.MODALITIES``: X-ray, CT or generated);
    #: written to the model's record, read by the DICOM checks and the model card. "" = not declared.
    modality: str = ""
    image_size: int = 224
    color_mode: str = "rgb"
    contrast: str = "none"
    split: str = "random"
    split_block: int = 16
    fractions: Tuple[float, float, float] = (0.75, 0.15, 0.10)
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    head_units: int = 128
    dropout: float = 0.5
    label_smoothing: float = 0.0
    augment: Union[bool, Augment] = False
    augment_phases: str = "all"
    class_weights: bool = False
    patience: int = 0
    monitor: str = "val_accuracy"
    fine_tune: FineTune = field(default_factory=FineTune)
    target_recall: Optional[float] = None
    threshold_rule: str = "balanced"
    positive_label: Optional[str] = None
    weights: str = "imagenet"
    alpha: float = 1.0
    #: the base's layers whose pooled outputs the domain score reads (``convert.domain``), chosen
    #: per recipe by ``experiments/domain_layers.py`` (train/SELECTION.md)
    domain_layers: Tuple[str, ...] = ("block_16_project_BN",)
    #: distillation (``train.distill``): the recipe whose run teaches (given as ``--teacher RUN``),
    #: the teacher's weight in the training target and the temperature that softens its answers
    teacher: str = ""
    distill: float = 0.0
    distill_temperature: float = 1.0
    seed: int = 42

    def __post_init__(self) -> None:
        self._check_data()
        self._check_optimisation()
        self._check_augmentation_and_phases()
        self._check_decision_and_model()

    def _check_data(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"recipe name must be a non-empty string, got {self.name!r}")
        if self.modality and (not isinstance(self.modality, str) or self.modality not in MODALITIES):
            raise ConfigError(f"modality must be one of {', '.join(MODALITIES)}, got {self.modality!r}")
        _check_int("image_size", self.image_size, 32, 1024)
        _check_choice("color_mode", self.color_mode, COLOR_MODES)
        if self.color_mode != "rgb" and self.weights == "imagenet":
            raise ConfigError("color_mode 'grayscale' cannot use ImageNet weights (3-channel input); use rgb or weights 'none'")
        _check_choice("contrast", self.contrast, CONTRAST_METHODS)
        _check_choice("split", self.split, SPLITS)
        _check_int("split_block", self.split_block, 1, 1_000_000)
        fr = self.fractions
        if isinstance(fr, (str, bytes)) or not hasattr(fr, "__len__") or len(fr) != 3 or not all(_is_number(x) for x in fr):
            raise ConfigError(f"fractions must be three numbers (train, val, test), got {fr!r}")
        fr = tuple(float(x) for x in fr)
        if any(x <= 0 for x in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
            raise ConfigError(f"fractions must be positive and sum to 1, got {list(fr)!r}")
        object.__setattr__(self, "fractions", fr)

    def _check_optimisation(self) -> None:
        _check_int("epochs", self.epochs, 1, 10000)
        _check_int("batch_size", self.batch_size, 1, 65536)
        _check_positive("learning_rate", self.learning_rate)
        object.__setattr__(self, "learning_rate", float(self.learning_rate))
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_int("head_units", self.head_units, 0, 65536)
        if not _is_number(self.dropout) or not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        if not _is_number(self.label_smoothing) or not 0.0 <= float(self.label_smoothing) < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        object.__setattr__(self, "label_smoothing", float(self.label_smoothing))

    def _check_augmentation_and_phases(self) -> None:
        if isinstance(self.augment, dict):
            object.__setattr__(self, "augment", _build(Augment, self.augment, "augment"))
        elif self.augment is True:
            object.__setattr__(self, "augment", Augment())
        elif self.augment is not False and not isinstance(self.augment, Augment):
            raise ConfigError(f"augment must be true, false or an object of parameters, got {self.augment!r}")
        _check_choice("augment_phases", self.augment_phases, AUGMENT_PHASES)
        if not isinstance(self.class_weights, bool):
            raise ConfigError(f"class_weights must be true or false, got {self.class_weights!r}")
        _check_int("patience", self.patience, 0, 10000)
        _check_choice("monitor", self.monitor, MONITORS)
        if isinstance(self.fine_tune, dict):
            object.__setattr__(self, "fine_tune", _build(FineTune, self.fine_tune, "fine_tune"))
        elif not isinstance(self.fine_tune, FineTune):
            raise ConfigError(f"fine_tune must be an object (epochs, blocks, learning_rate), got {self.fine_tune!r}")

    def _check_decision_and_model(self) -> None:
        if self.target_recall is not None:
            if not _is_number(self.target_recall) or not 0.0 < float(self.target_recall) <= 1.0:
                raise ConfigError(f"target_recall must be in (0, 1] or null, got {self.target_recall!r}")
            object.__setattr__(self, "target_recall", float(self.target_recall))
            if not self.positive_label:
                raise ConfigError("target_recall needs positive_label (the disease class whose recall is targeted)")
        _check_choice("threshold_rule", self.threshold_rule, THRESHOLD_RULES)
        if self.weights is None:
            object.__setattr__(self, "weights", "none")
        if not isinstance(self.weights, str) or not self.weights:
            raise ConfigError(f"weights must be 'imagenet', 'none' or a file path, got {self.weights!r}")
        if not _is_number(self.alpha) or float(self.alpha) not in (0.35, 0.5, 0.75, 1.0, 1.3, 1.4):
            raise ConfigError(f"alpha must be one of 0.35, 0.5, 0.75, 1.0, 1.3, 1.4, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        _check_layers(self.domain_layers)
        object.__setattr__(self, "domain_layers", tuple(self.domain_layers))
        self._check_distillation()
        _check_int("seed", self.seed, 0, 2**31 - 1)

    def _check_distillation(self) -> None:
        if not _is_number(self.distill) or not 0.0 <= float(self.distill) <= 1.0:
            raise ConfigError(f"distill must be in [0, 1] (the teacher's weight in the target), got {self.distill!r}")
        object.__setattr__(self, "distill", float(self.distill))
        _check_positive("distill_temperature", self.distill_temperature)
        object.__setattr__(self, "distill_temperature", float(self.distill_temperature))
        if not isinstance(self.teacher, str):
            raise ConfigError(f"teacher must be a recipe name, got {self.teacher!r}")
        if self.distill and not self.teacher:
            raise ConfigError("distill > 0 needs teacher (the name of the recipe whose run teaches)")

    @property
    def distills(self) -> bool:
        """Trained on a teacher's soft targets (``train.distill``)."""
        return self.distill > 0

    @property
    def from_scratch(self) -> bool:
        """No pretrained weights: the whole network trains (a frozen random base learns nothing)."""
        return self.weights in ("none", "None", "")

    @property
    def augmentation(self) -> Optional[Augment]:
        """The augmentation parameters, or None when augmentation is off."""
        return self.augment if isinstance(self.augment, Augment) else None

    def augmentation_in(self, phase: str) -> Optional[Augment]:
        """The augmentation of training phase ``phase`` ("head" or "fine_tune"), or None."""
        if self.augment_phases == "fine_tune" and phase != "fine_tune":
            return None
        return self.augmentation

    def replace(self, **overrides: Any) -> "Recipe":
        """A new recipe with some fields changed (validated). Unknown fields are refused.

        Nested fields can be given as ``fine_tune={"epochs": 3}`` (merged into the current
        value) or as dotted names through ``apply_overrides``.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown recipe field(s) {unknown}; known: {sorted(names)}")
        changes = dict(overrides)
        if isinstance(changes.get("fine_tune"), dict):
            changes["fine_tune"] = {**dataclasses.asdict(self.fine_tune), **changes["fine_tune"]}
        if isinstance(changes.get("augment"), dict) and self.augmentation is not None:
            changes["augment"] = {**dataclasses.asdict(self.augmentation), **changes["augment"]}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fractions"] = list(self.fractions)
        d["domain_layers"] = list(self.domain_layers)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Recipe":
        return _build(cls, d, "recipe")

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.from_dict(json_object(text, "recipe"))


def _check_layers(layers) -> None:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple)) or not layers \
            or not all(isinstance(x, str) and x for x in layers) or len(set(layers)) != len(layers):
        raise ConfigError(f"domain_layers must be a non-empty list of distinct layer names, got {layers!r}")


def apply_overrides(recipe: Recipe, pairs) -> Recipe:
    """Apply ``field=value`` strings (values parsed as JSON, else taken as text).

    Dotted names reach nested fields: ``fine_tune.epochs=5``, ``augment.rotation=15``.

    Raises:
        ConfigError: a pair without ``=``, an unknown field or an invalid value.
    """
    changes: Dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override must look like field=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        value = _parse_value(raw.strip())
        if "." in key:
            head, sub = key.split(".", 1)
            if head not in ("fine_tune", "augment"):
                raise ConfigError(f"only fine_tune.* and augment.* take dotted names, got {key!r}")
            changes.setdefault(head, {})
            if not isinstance(changes[head], dict):
                raise ConfigError(f"{head} given both whole and by field")
            changes[head][sub] = value
        else:
            changes[key] = value
    if isinstance(changes.get("augment"), dict) and recipe.augmentation is None:
        changes["augment"] = {**dataclasses.asdict(Augment()), **changes["augment"]}
    return recipe.replace(**changes)


def recipe_diff(a: Recipe, b: Recipe) -> List[Tuple[str, Any, Any]]:
    """The fields in which ``b`` differs from ``a``, as (dotted name, value in a, value in b),
    sorted by name; nested fields (``fine_tune.epochs``, ``augment.gamma``) one by one."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    fa, fb = flat(a.to_dict()), flat(b.to_dict())
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def customisations(recipe: Recipe) -> List[Tuple[str, Any, Any]]:
    """How ``recipe`` differs from the named recipe of its name (``recipe_diff``, the description
    left out); empty for an unchanged named recipe or a name that is not one."""
    if recipe.name not in RECIPES:
        return []
    return [d for d in recipe_diff(RECIPES[recipe.name], recipe) if d[0] != "description"]


def customize(recipe: Recipe, fields: Optional[Dict[str, Any]] = None, augment: Optional[bool] = None,
              class_weights: Optional[bool] = None, fine_tune: Optional[Dict[str, Any]] = None,
              sets=()) -> Recipe:
    """``recipe`` with the changes a command line asks for, in this order:

    ``fields`` (plain fields; None values are ignored), ``augment`` (True keeps the recipe's own
    augmentation parameters when it has some; False turns augmentation off), ``class_weights``,
    ``fine_tune`` sub-fields (merged into the recipe's), then ``sets``, ``field=value`` strings
    (``apply_overrides``).

    Raises:
        ConfigError: an unknown field or an invalid value.
    """
    changes = {k: v for k, v in (fields or {}).items() if v is not None}
    if augment is not None and not (augment and recipe.augmentation is not None):
        changes["augment"] = bool(augment)
    if class_weights is not None:
        changes["class_weights"] = class_weights
    ft = {k: v for k, v in (fine_tune or {}).items() if v is not None}
    if ft:
        changes["fine_tune"] = ft
    recipe = recipe.replace(**changes) if changes else recipe
    return apply_overrides(recipe, sets)


def _parse_value(raw: str) -> Any:
    if raw.lower() in ("none", "null"):
        return None
    try:
        v = json.loads(raw)
    except ValueError:
        return raw
    return tuple(v) if isinstance(v, list) else v


#: Augmentation for images from other sites: the geometric defaults plus the intensity changes that
#: differ between X-ray machines (chosen on the external dev set, train/SELECTION.md).
SITE_SHIFT = Augment(rotation=10.0, shift=0.05, zoom=0.10, brightness=0.20, contrast=0.30, gamma=0.30, blur=1.5,
                     noise=0.03, crop=0.15)

_PAPER_XRAY = Recipe(
    name="xray-pneumonia",
    modality="X-ray",
    description="MobileNetV2 X-ray pneumonia paper: random per-class 75/15/10, frozen ImageNet base + "
    "GAP/Dense128/Dropout0.5 head, augmentation, Adam 1e-3, 20 epochs.",
    split="random",
    fractions=(0.75, 0.15, 0.10),
    epochs=20,
    batch_size=32,
    learning_rate=1e-3,
    augment=Augment(),
    class_weights=False,
    patience=0,
    monitor="val_accuracy",
    positive_label="PNEUMONIA",
)

_PAPER_CT = Recipe(
    name="ct-lung-cancer",
    modality="CT",
    description="MobileNetV2 CT lung cancer paper (IQ-OTH/NCCD): stratified 70/15/15, frozen ImageNet base + "
    "GAP/Dense128/Dropout0.5 head, Adam 1e-3, batch 32, up to 50 epochs, early stopping on val accuracy (5).",
    split="random",
    fractions=(0.70, 0.15, 0.15),
    epochs=50,
    batch_size=32,
    learning_rate=1e-3,
    augment=False,
    class_weights=False,
    patience=5,
    monitor="val_accuracy",
    positive_label="malignant",
)

_DEMO = Recipe(
    name="demo",
    modality="generated",
    description="The built-in demo with ImageNet weights: generated radiograph-like images, stratified random "
    "70/15/15, frozen ImageNet base + GAP/Dense128/Dropout0.5 head on cached features, Adam 1e-3, up to 40 "
    "epochs, early stopping on val loss (patience 8).",
    split="random",
    fractions=(0.70, 0.15, 0.15),
    epochs=40,
    patience=8,
    monitor="val_loss",
    positive_label="PNEUMONIA",
)

RECIPES: Dict[str, Recipe] = {
    r.name: r
    for r in (
        _PAPER_XRAY,
        _PAPER_CT,
        _PAPER_XRAY.replace(
            name="xray-pneumonia-plus",
            description="X-ray, chosen for other sites (external dev set, train/SELECTION.md): patient-grouped "
            "75/15/10, class weights, head on cached base features up to 50 epochs (early stopping on val loss, "
            "patience 8), then the whole base (16 blocks, BatchNorm frozen) fine-tuned for 15 epochs at 3e-5 with "
            "cosine decay and site-shift augmentation (geometry, brightness, contrast, gamma, blur, noise, crops), "
            "last epoch kept; threshold: the highest with pneumonia recall >= 0.95 on validation.",
            split="grouped",
            epochs=50,
            augment=SITE_SHIFT,
            augment_phases="fine_tune",
            class_weights=True,
            patience=8,
            monitor="val_loss",
            fine_tune=FineTune(epochs=15, blocks=16, learning_rate=3e-5, lr_schedule="cosine", early_stopping=False),
            target_recall=0.95,
            threshold_rule="fewest-false-positives",
        ),
        _PAPER_CT.replace(
            name="ct-lung-cancer-plus",
            description="CT, improved: stratified 70/15/15 in blocks of 16 consecutive slice numbers per class (a "
            "stand-in for patients, so test slices are not neighbours of training slices), class weights (benign is 11 %), head on cached base "
            "features up to 50 epochs (early stopping on val loss, patience 8), then up to 10 epochs fine-tuning the "
            "top 6 blocks at 1e-5 (early stopping within the phase), threshold for malignant recall >= 0.95 on "
            "validation (train/SELECTION.md).",
            split="blocked",
            epochs=50,
            class_weights=True,
            augment=False,
            patience=8,
            monitor="val_loss",
            fine_tune=FineTune(epochs=10, blocks=6, learning_rate=1e-5),
            target_recall=0.95,
        ),
        _PAPER_XRAY.replace(
            name="xray-pneumonia-micro",
            description="X-ray for a microcontroller (`lungedge convert RUN --variants micro`): MobileNetV2 alpha "
            "0.35 at 112 px (TFLM arena under 400 KiB) trained whole from random initialisation (no ImageNet file "
            "for this width offline; --weights imagenet where Keras can download it), patient-grouped 75/15/10, "
            "class weights, site-shift augmentation, no Dense hidden layer, dropout 0.2, Adam 2e-3 with cosine "
            "decay to 0, batch 32, 40 epochs, last epoch kept (no early stopping); threshold: the highest with "
            "pneumonia recall >= 0.95 on validation. Distillation from an xray-pneumonia-plus run is an option "
            "(--set teacher=xray-pneumonia-plus --set distill=0.7 --teacher RUN), measured no better on the "
            "external dev set (train/SELECTION.md).",
            split="grouped",
            weights="none",
            alpha=0.35,
            image_size=112,
            head_units=0,
            dropout=0.2,
            learning_rate=2e-3,
            lr_schedule="cosine",
            epochs=40,
            augment=SITE_SHIFT,
            class_weights=True,
            patience=0,
            monitor="val_loss",
            target_recall=0.95,
            threshold_rule="fewest-false-positives",
            domain_layers=("block_16_project_BN", "block_2_project_BN", "block_5_project_BN", "block_9_project_BN"),
        ),
        _DEMO,
        _DEMO.replace(
            name="demo-scratch",
            description="The built-in demo without pretrained weights (a fresh machine offline): MobileNetV2 "
            "alpha 0.35 at 64 px trained whole from random initialisation (BatchNorm momentum 0.9), no Dense "
            "hidden layer, dropout 0.2, Adam 2e-3 with cosine decay, batch 32, 10 epochs, early stopping on "
            "validation accuracy (patience 4), best epoch restored. From scratch, data variety decides: the demo "
            "generates 2,000 images per class for it (train/SELECTION.md).",
            weights="none",
            alpha=0.35,
            image_size=64,
            head_units=0,
            dropout=0.2,
            learning_rate=2e-3,
            lr_schedule="cosine",
            epochs=10,
            patience=4,
            monitor="val_accuracy",
        ),
    )
}


def get_recipe(name: str, **overrides: Any) -> Recipe:
    """The named recipe, with optional field overrides.

    Raises:
        ConfigError: unknown name (the message lists the valid ones) or invalid override.
    """
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; valid: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]
    return recipe.replace(**overrides) if overrides else recipe

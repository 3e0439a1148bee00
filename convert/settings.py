"""What a conversion is asked to do: one frozen settings object, each default held once.

``convert.conversion.convert_run`` takes a ``ConvertSettings`` (or its fields as keywords),
``lungedge convert`` and ``lungedge pipeline`` build one from their options, and each option's
default and help text come from the field here (``lungedge.settings_options``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple, Union

from lungedge.edge_runtime.errors import ConfigError

from . import quant_gate
from .calibration import DEFAULT_COUNT
from .variants import DEFAULT_VARIANTS, VARIANTS, parse_variants


def _option(default: Any, help: str) -> Any:
    """A settings field whose ``help`` is the command line's text for the option that sets it."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ConvertSettings:
    """How a training run becomes ``.tflite`` files.

    Attributes:
        variants: names from ``convert.variants.VARIANTS`` (a list or one comma-separated string).
        data_dir: labelled folder to judge on instead of the manifest's test split.
        out_dir: where to write (None: the run folder).
        calibration_count: training images for the integer variants (stratified by class).
        calibration_dir: take calibration images from this labelled folder instead.
        max_accuracy_drop: gate, in percentage points below the Keras model's accuracy.
        max_recall_drop: gate, in points below Keras on the disease class's recall.
        rethreshold: for the integer variants, re-choose the decision threshold on the manifest's
            validation split with the quantised model's own probabilities (stored in its metadata).
        bias_correction: correct the integer variants' biases, layer by layer, for the mean shift
            quantisation causes on the calibration images (``convert.bias_correction``).
        heatmap: give every variant a second signature with class activation maps; such files
            have two subgraphs, which MediaPipe's ImageClassifier refuses.
        domain: give every file the domain gate (``convert.domain``): a ``domain_score`` output
            fitted on the training images, its threshold chosen on the validation split.
        ood_dir: a folder whose subfolders are development out-of-domain sets (e.g. the other
            modality, photos); their refusal rates join the report and the record.
        seed: for the calibration pick.
        learning_floor: refuse a Keras model that did not learn (``edge_runtime.learning_floor``)
            and fail variants that did not; False only records the verdicts (tests of the file
            contract on tiny untrained models).
    """

    variants: Union[str, Tuple[str, ...]] = _option(DEFAULT_VARIANTS,
                                                    f"Comma-separated variants: {', '.join(VARIANTS)}.")
    data_dir: Optional[str] = _option(None, "Labelled folder DATA/<class>/<image> to judge on "
                                            "(default: the run's test split).")
    out_dir: Optional[str] = _option(None, "Output folder (default: RUN_DIR).")
    calibration_count: int = _option(DEFAULT_COUNT, "Training images (stratified by class) to calibrate the "
                                                    "integer variants.")
    calibration_dir: Optional[str] = _option(None, "Take calibration images from this labelled folder instead "
                                                   "of the run's train split.")
    max_accuracy_drop: float = _option(quant_gate.DEFAULT_MAX_ACCURACY_DROP,
                                       "Gate: largest accuracy drop below the Keras model, in percentage points.")
    max_recall_drop: float = _option(quant_gate.DEFAULT_MAX_RECALL_DROP,
                                     "Gate: largest drop of the disease class's recall, in percentage points.")
    rethreshold: bool = _option(False, "Re-choose the decision threshold of integer variants on the validation "
                                       "split.")
    bias_correction: bool = _option(True, "Skip the layer-by-layer bias correction of the integer variants "
                                          "(for comparison).")
    heatmap: bool = _option(False, "Also write a 'heatmap' signature (class activation maps for `classify "
                                   "--heatmap`); such files have two subgraphs, which MediaPipe's "
                                   "ImageClassifier refuses.")
    domain: bool = _option(True, "Convert without the domain gate (no domain_score output: such files answer "
                                 "every image).")
    ood_dir: Optional[str] = _option(None, "Folder whose subfolders are development out-of-domain sets (e.g. "
                                           "ct/, photos/): their refusal rates join the report and each "
                                           "file's record.")
    seed: int = 0
    learning_floor: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.variants, str):
            object.__setattr__(self, "variants", tuple(self.variants))

    def replace(self, **changes: Any) -> "ConvertSettings":
        """A copy with ``changes`` (field names; an unknown one is a TypeError, as for any keyword)."""
        return dataclasses.replace(self, **changes)

    def variant_names(self) -> Tuple[str, ...]:
        """The variants as names, in order (unchecked: ``checked`` says which are unknown)."""
        if isinstance(self.variants, str):
            return tuple(v.strip() for v in self.variants.split(",") if v.strip())
        return tuple(self.variants)

    def checked(self):
        """The variants to convert (``convert.variants.Variant``), after checking every setting.

        Raises:
            ConfigError: an unknown variant, a calibration count below 1, a negative gate limit.
        """
        chosen = parse_variants(self.variants)
        if self.calibration_count < 1:
            raise ConfigError(f"calibration count must be at least 1, got {self.calibration_count!r}")
        for name, value in (("max accuracy drop", self.max_accuracy_drop),
                            ("max recall drop", self.max_recall_drop)):
            if not value >= 0:
                raise ConfigError(f"{name} must be >= 0 percentage points, got {value!r}")
        return chosen

    @property
    def limits(self) -> Tuple[float, float]:
        """The gate's limits: (max accuracy drop, max recall drop), in percentage points."""
        return self.max_accuracy_drop, self.max_recall_drop


def settings_from(settings: Optional[ConvertSettings], fields: dict) -> ConvertSettings:
    """``settings`` (default: all defaults) with keyword ``fields`` applied over it."""
    base = settings if settings is not None else ConvertSettings()
    if not isinstance(base, ConvertSettings):
        raise ConfigError(f"settings must be a ConvertSettings, got {type(base).__name__}")
    return base.replace(**fields) if fields else base


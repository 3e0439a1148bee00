"""How a classifier runs on the device: one frozen settings object, each default held once.

``Classifier`` takes these settings (as keyword arguments or a ``RuntimeSettings``), the command
line builds them from its model options (``lungedge.model_options``: each option's default and
help text come from the field here), and ``bench`` passes them to every model it times.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple, Union

from .backend import BACKENDS
from .errors import ConfigError

#: What ``backend`` may name: ``auto`` (LiteRT, then tflite-runtime) or one backend.
BACKEND_CHOICES = ("auto", *BACKENDS)
#: The normalisation of a model that carries none (MobileNet's: pixels to -1..1).
DEFAULT_MEAN_STD = 127.5


def _option(default: Any, help: str) -> Any:
    """A settings field whose ``help`` is the command line's text for the option that sets it."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RuntimeSettings:
    """What a ``Classifier`` is built with, besides the model file.

    Attributes:
        threads: interpreter threads (None: the backend's default).
        backend: ``auto`` (LiteRT, then tflite-runtime), ``litert`` or ``tflite-runtime``.
        labels: class names in output order, or a path to a text file with one per line;
            overrides the metadata's (their count must match the model's output).
        mean, std: normalisation for a model without metadata (None: its standard record's, else
            ``DEFAULT_MEAN_STD``).
        use_threshold: apply the model's decision threshold when it has one.
        guard: build and run the model once in a child process first (``edge_runtime.load_guard``),
            so that a file that crashes the runtime becomes a ModelError instead of killing
            this process. Turn it off only for files known to load.
        max_results: keep at most this many ``Prediction.categories`` (None: all).
        score_threshold: keep only categories scoring at least this (None: all). Neither
            changes the decision (``Prediction.label``) or ``Prediction.probabilities``.
        domain_gate: refuse images the model was not built for (``edge_runtime.domain``) when
            the file has a gate; False reads the score but never refuses (conversion uses it).
        allow_out_of_domain: answer refused images anyway, their ``Prediction.domain`` marked
            out of domain with the reason.

    Raises:
        ConfigError: ``threads``, ``max_results`` or ``score_threshold`` out of range.
    """

    threads: Optional[int] = _option(None, "Interpreter threads (default: the backend's).")
    backend: str = _option("auto", "Interpreter: LiteRT first, then tflite-runtime.")
    labels: Optional[Union[Tuple[str, ...], str, "os.PathLike[str]"]] = _option(
        None, "Text file, one class name per line (for models without lungedge metadata).")
    mean: Optional[Tuple[float, ...]] = _option(
        None, f"Normalisation mean for models without metadata (repeat per channel; default {DEFAULT_MEAN_STD:g}).")
    std: Optional[Tuple[float, ...]] = _option(
        None, f"Normalisation std for models without metadata (default {DEFAULT_MEAN_STD:g}).")
    use_threshold: bool = _option(True, "Ignore the model's decision threshold; take the most probable class.")
    guard: bool = _option(True, "Skip the isolated first load (a child process that turns a runtime crash on a "
                                "damaged model into an error line); only for files known to load.")
    max_results: Optional[int] = None
    score_threshold: Optional[float] = None
    domain_gate: bool = True
    allow_out_of_domain: bool = _option(
        False, "Answer images the model's domain gate refuses (wrong modality, blank, a photo...) anyway; "
               "each such result is marked OUT OF DOMAIN with its reason.")

    def __post_init__(self) -> None:
        _check_positive("threads", self.threads, "a positive integer")
        _check_positive("max_results", self.max_results, "a positive integer or None")
        s = self.score_threshold
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) <= 1.0):
            raise ConfigError(f"score_threshold must be a number from 0 to 1 or None, got {s!r}")
        if isinstance(self.labels, (list, tuple)):
            object.__setattr__(self, "labels", tuple(self.labels))
        for name in ("mean", "std"):
            object.__setattr__(self, name, _numbers_or_none(name, getattr(self, name)))
        if s is not None:
            object.__setattr__(self, "score_threshold", float(s))
        object.__setattr__(self, "allow_out_of_domain", bool(self.allow_out_of_domain))
        object.__setattr__(self, "domain_gate", bool(self.domain_gate))

    def replace(self, **changes: Any) -> "RuntimeSettings":
        """A copy with ``changes`` (field names; an unknown one is a TypeError, as for any keyword)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name``."""
        return _field(name).default

    @classmethod
    def help(cls, name: str) -> str:
        """The command line's help text for the option that sets field ``name``."""
        return _field(name).metadata["help"]


def _field(name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(RuntimeSettings)}[name]


def _check_positive(name: str, value: Any, what: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"{name} must be {what}, got {value!r}")


def _numbers_or_none(name: str, value: Any) -> Optional[Tuple[float, ...]]:
    """``value`` as a tuple, None when it is None or empty (the model's own normalisation)."""
    if value is None:
        return None
    try:
        values = tuple(value)
    except TypeError:
        raise ConfigError(f"{name} must be a sequence of numbers (one per channel, or one for all), got {value!r}") from None
    return values or None


def settings_from(settings: Optional[RuntimeSettings], options: dict) -> RuntimeSettings:
    """``settings`` (default: all defaults) with keyword ``options`` applied over it."""
    base = settings if settings is not None else RuntimeSettings()
    if not isinstance(base, RuntimeSettings):
        raise ConfigError(f"settings must be a RuntimeSettings, got {type(base).__name__}")
    return base.replace(**options) if options else base



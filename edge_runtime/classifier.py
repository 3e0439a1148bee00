"""Classify images with a TFLite model on the device: LiteRT or tflite-runtime, numpy, Pillow.

``Classifier`` is the public face over small parts: ``edge_runtime.loader`` (the checks and the
interpreter, once), ``edge_runtime.inference`` (one image), ``edge_runtime.batch`` (many, decoded
on a thread pool) and ``edge_runtime.introspect`` (what the model is); its options are
``edge_runtime.settings.RuntimeSettings`` and its results ``edge_runtime.results``.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np

from . import introspect
from .batch import classify_many, default_workers
from .errors import ConfigError
from .inference import Inference
from .loader import LoadedModel, load_model
from .preprocess import ImageSource
from .results import Category, Failure, Prediction, Refusal
from .settings import RuntimeSettings, settings_from

__all__ = ["Classifier", "Category", "Prediction", "Failure", "Refusal", "RuntimeSettings", "default_workers"]


def _from_model(attr: str, doc: str) -> property:
    """A read-only attribute of the classifier that is the loaded model's ``attr``."""
    return property(lambda self: getattr(self._model, attr), doc=doc)


def _from_settings(attr: str, doc: str) -> property:
    """A read-only attribute of the classifier that is its settings' ``attr``."""
    return property(lambda self: getattr(self._settings, attr), doc=doc)


class Classifier:
    """A TFLite image classifier, built once and reused.

    Labels and preprocessing come from the model's own metadata: the ``lungedge`` record, or
    for a file without one (a third-party model) the standard ``TFLITE_METADATA`` record that
    MediaPipe and the Task Library read (labels file, normalisation, colour space). A model
    with neither needs ``labels``; its normalisation is then ``mean``/``std`` (default
    127.5/127.5, i.e. -1..1). The input size always comes from the model. A uint8 input of a
    model without a lungedge record is fed raw pixel values, as MediaPipe and the Task
    Library do.

    Use it as a context manager, or call ``close()``, to free the interpreter::

        with Classifier.from_file("model_int8.tflite") as clf:
            result = clf.classify("xray.jpeg")
            print(result.label, result.score)

    Args:
        model_path: a ``.tflite`` file.
        settings: a ``RuntimeSettings`` (default: its defaults).
        **options: fields of ``RuntimeSettings`` over ``settings``: ``threads``, ``backend``,
            ``labels``, ``mean``, ``std``, ``use_threshold``, ``guard``, ``max_results``,
            ``score_threshold``, ``domain_gate``, ``allow_out_of_domain`` (see there).

    Loading checks, in order (``edge_runtime.loader``): a regular file within
    ``MAX_MODEL_BYTES``; the flatbuffer's structure (``edge_runtime.modelcheck``); the integrity
    record when there is one (``describe()["integrity"]`` says "verified" or "absent"); the
    metadata's types and sizes; then the guarded first load.

    Raises:
        ModelError: the file is missing, not a regular file, too large, not TFLite, malformed,
            changed since conversion, crashes or hangs the runtime, needs operators the runtime
            lacks, or its labels do not match its output. The message names the file.
        InputError: the labels file cannot be used.
        ConfigError: an option out of range, or an unknown backend.
        MissingDependencyError: no interpreter backend installed.
        TypeError: an unknown option.
    """

    def __init__(self, model_path: Union[str, "os.PathLike[str]"], settings: Optional[RuntimeSettings] = None,
                 **options) -> None:
        self._settings = settings_from(settings, options)
        self._model, interpreter = load_model(model_path, self._settings)
        self._engine: Optional[Inference] = Inference(self._model, interpreter, self._settings)

    # ---- what was loaded --------------------------------------------------------------
    model_path = _from_model("path", "The model file, as given.")
    model_sha256 = _from_model("sha256", "SHA-256 of the file's bytes.")
    model_size = _from_model("size", "The file's size in bytes.")
    integrity = _from_model("integrity", 'The integrity record: "verified" or "absent".')
    structure = _from_model("structure", "The flatbuffer's counts (``modelcheck.Structure``).")
    spec = _from_model("spec", "Labels, preprocessing and decision the classifier runs with.")
    has_metadata = _from_model("has_metadata", "The file has a lungedge record.")
    metadata_source = _from_model("metadata_source", 'Where labels came from: "lungedge", "TFLITE_METADATA" or None.')
    standard = _from_model("standard", "The standard TFLITE_METADATA record, or None.")
    standard_error = _from_model("standard_error", "Why the standard record could not be read, or None.")
    backend = _from_model("backend", "The interpreter's backend (``edge_runtime.backend.Backend``).")
    threads = _from_model("threads", "Interpreter threads asked for (None: the backend's default).")
    guarded = _from_model("guarded", "The first load ran in a child process (``edge_runtime.load_guard``).")
    load_ms = _from_model("load_ms", "Interpreter construction and allocation, ms.")
    first_invoke_ms = _from_model("first_invoke_ms", "The first invoke (XNNPACK packs weights there), ms.")
    has_heatmap = _from_model("has_heatmap", "The file has a ``heatmap`` signature.")
    domain = _from_model("domain", "The file's domain gate (None: no gate, every image is answered).")
    max_results = _from_settings("max_results", "Categories kept per prediction (None: all).")
    score_threshold = _from_settings("score_threshold", "Lowest score of a kept category (None: all).")
    allow_out_of_domain = _from_settings("allow_out_of_domain", "Refused images are answered anyway, marked.")

    @property
    def settings(self) -> RuntimeSettings:
        """The runtime settings the classifier was built with."""
        return self._settings

    @property
    def loaded(self) -> LoadedModel:
        """The loaded model (``edge_runtime.loader.LoadedModel``)."""
        return self._model

    @property
    def use_threshold(self) -> bool:
        """The model's decision threshold is applied (asked for, and the model has one)."""
        return self._settings.use_threshold and self._model.spec.threshold is not None

    @property
    def labels(self) -> List[str]:
        return list(self._model.spec.labels)

    @property
    def model_bytes(self) -> bytes:
        """The model file's bytes as read and checked when it was loaded (the interpreter runs these)."""
        return self._model.data

    @property
    def input_details(self) -> dict:
        return dict(self._model.input)

    @property
    def output_details(self) -> dict:
        return dict(self._model.output)

    @property
    def _interpreter(self):
        """The interpreter (None once closed); benchmarks time its ``invoke`` directly."""
        return self._engine.interpreter if self._engine is not None else None

    @property
    def _score_out(self) -> Optional[dict]:
        """The domain score output's tensor details (None without one)."""
        return self._model.score_output

    # ---- life cycle ---------------------------------------------------------------------
    @classmethod
    def from_file(cls, model_path: Union[str, "os.PathLike[str]"], **options) -> "Classifier":
        """Load a ``.tflite`` classifier; ``options`` are the constructor's keyword arguments
        (``threads``, ``labels``, ``max_results``, ``score_threshold``...).

        Raises:
            ModelError, InputError, ConfigError, MissingDependencyError: as the constructor.
        """
        return cls(model_path, **options)

    def close(self) -> None:
        """Free the interpreter. The classifier cannot classify afterwards."""
        self._engine = None

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- introspection ------------------------------------------------------------------
    def describe(self) -> dict:
        """The model's facts (``edge_runtime.introspect.describe``)."""
        gate_on = self._model.domain is not None and self._settings.domain_gate
        return introspect.describe(self._model, self.use_threshold, gate_on)

    def delegate_nodes(self) -> int:
        """How many nodes of the graph a delegate (XNNPACK) took; 0 when none did."""
        return introspect.delegate_nodes(self._interpreter)

    def operators(self) -> List[dict]:
        """The graph's operators: ``{"op", "count", "delegated"}`` (``edge_runtime.introspect.operators``)."""
        return introspect.operators(self._interpreter)

    def tensor_info(self, which: str = "input") -> dict:
        """Name, shape, dtype and quantisation (scale, zero point; None for float) of the input
        or output tensor."""
        return introspect.tensor_info(self._model.input if which == "input" else self._model.output)

    # ---- classifying --------------------------------------------------------------------
    def classify(self, image: ImageSource, *, heatmap: bool = False, name: Optional[str] = None) -> Prediction:
        """Classify one image (path, bytes, Pillow image or uint8 array; DICOM too).

        Returns a ``Prediction``, or a ``Refusal`` (no class, with the reason) when the file's
        domain gate refuses the image and ``allow_out_of_domain`` is off.

        Args:
            image: the image.
            heatmap: also compute the class activation map of the predicted class
                (``Prediction.heatmap``), through the model's ``heatmap`` signature.
            name: how to name the image in results and messages (default: its path).

        Raises:
            ImageError: the image cannot be read (see ``preprocess``), or is a DICOM file of a
                modality the model is not for.
            OutputError: the model's output for it is not finite (NaN or infinity).
            ModelError: a heat map was asked for and the model has none.
        """
        engine = self._open()
        return engine.infer(engine.prepare(image, name), heatmap)

    def classify_many(self, sources: Iterable[ImageSource], progress: bool = False,
                      heatmap: bool = False, workers: Optional[int] = None) -> Iterator[Union[Prediction, Failure]]:
        """Classify many images; each bad one becomes a ``Failure`` and the batch goes on.

        Strings that name folders are expanded to the images inside them. ``heatmap`` as in
        ``classify``. Results come in input order, one per image.

        Args:
            workers: threads that decode and preprocess ahead of the interpreter (Pillow and numpy
                release the GIL, so decoding overlaps ``invoke``), at most ``2 * workers`` images
                in flight. ``None``: ``default_workers()``; 0: one image at a time on this thread.
        """
        engine = self._open()
        yield from classify_many(engine.prepare, engine.infer, sources, progress, heatmap, workers)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities for one already-preprocessed float input (H, W, C)."""
        return self._run(x)

    def predict_with_score(self, x: np.ndarray) -> Tuple[np.ndarray, Optional[float]]:
        """(class probabilities, domain score or None) for one preprocessed float input (H, W, C);
        no check before the model and no refusal (conversion and evaluation read the raw score)."""
        probs = self._run(x)
        return probs, (self._engine.last_score() if self._model.score_output is not None else None)

    def _run(self, x: np.ndarray) -> np.ndarray:
        """Probabilities of one preprocessed float input, left in the input tensor (bench times invoke on it)."""
        return self._engine.run(x)

    def _open(self) -> Inference:
        if self._engine is None:
            raise ConfigError(f"the classifier is closed: {self.model_path!r}")
        return self._engine

"""One image through a loaded model: prepare it, run the interpreter, decide.

``Inference.prepare`` decodes and preprocesses (and runs the domain gate's checks before the
model) without touching the interpreter, so it is safe on worker threads; ``Inference.infer``
runs the interpreter on a prepared input and gives a ``Prediction`` or a ``Refusal`` (the
calling thread owns the interpreter).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .backend import runtime_message
from .decision import apply_threshold, output_probabilities
from .dicom import DicomInfo, check_modality, expected_modalities
from .domain import DomainVerdict, check_dicom, check_frame
from .errors import ImageError, ModelError, OutputError
from .heatmap_runner import HeatmapRunner
from .loader import LoadedModel
from .preprocess import ImageSource, image_size, load_image, normalize
from .quant import dequantize, quantize
from .results import Category, Prediction, Refusal
from .settings import RuntimeSettings
from .timing import now


@dataclass(frozen=True)
class Prepared:
    """One image, decoded and preprocessed: the interpreter's input without the batch axis."""

    source: str
    input: np.ndarray
    dicom: Optional[DicomInfo]
    ms: float
    #: (stage, reason) when a check before the model refused the image
    refused: Optional[Tuple[str, str]] = None
    #: the decoded uint8 pixels (the polarity check inverts them)
    pixels: Optional[np.ndarray] = None


class Inference:
    """The per-image steps of a classifier over one loaded model and its interpreter.

    Args:
        model: the loaded model (``edge_runtime.loader``).
        interpreter: its interpreter, allocated.
        settings: the decision threshold, the domain gate and the categories to keep.
    """

    def __init__(self, model: LoadedModel, interpreter, settings: RuntimeSettings) -> None:
        self.model, self.interpreter, self.spec = model, interpreter, model.spec
        self.labels = list(model.spec.labels)
        self.use_threshold = settings.use_threshold and model.spec.threshold is not None
        self.gate = model.domain if settings.domain_gate else None
        self.settings = settings
        intended = model.spec.intended if model.has_metadata else {}
        self._chest = str(intended.get("body_part", "")).lower() == "chest"
        self._frontal = str(intended.get("view", "")).lower().startswith("frontal")
        self._modalities = expected_modalities(intended)
        self._in_index, self._out_index = model.input["index"], model.output["index"]
        self._in_dtype = np.dtype(model.input["dtype"])
        self._lut = self._input_lut()
        self._heatmap_runner: Optional[HeatmapRunner] = None
        if self.use_threshold:
            th = model.spec.threshold
            self._th_index, self._th_value = self.labels.index(th.label), th.value

    # ---- before the model (no interpreter) ------------------------------------------------
    def prepare(self, image: ImageSource, name: Optional[str]) -> Prepared:
        """Decode and preprocess to the model's input array (no interpreter: safe on worker threads)."""
        t0 = now()
        source = name or (os.fsdecode(image) if isinstance(image, (str, os.PathLike)) else "")
        pixels, dicom = load_image(image, self.spec.preprocessing, name=name)
        reason = None
        if self.gate is not None:
            reason = self._before_model(image, pixels, dicom, name)
        elif dicom is not None:
            check_modality(dicom, self._modalities, source or "<image>")
        # quantised input: pixel -> input value by table (the same numbers as normalise + quantise)
        inp = self._lut[pixels] if self._lut is not None else self.quantize_input(normalize(pixels, self.spec.preprocessing))
        return Prepared(source, inp, dicom, (now() - t0) * 1e3, reason, pixels if self.gate is not None else None)

    def _before_model(self, image, pixels: np.ndarray, dicom: Optional[DicomInfo], name: Optional[str]):
        """(stage, reason) when a cheap check refuses the image before the model, else None."""
        if dicom is not None:
            why = check_dicom(dicom.modality, dicom.body_part, dicom.view_position, self._modalities,
                              chest=self._chest, frontal=self._frontal)
            if why:
                return "dicom", why
        size = None
        if dicom is None and not isinstance(image, np.ndarray):
            try:
                size = image_size(image, name)
            except (ImageError, OSError):
                size = None
        elif isinstance(image, np.ndarray) and image.ndim >= 2:
            size = (int(image.shape[1]), int(image.shape[0]))
        why = check_frame(pixels, size, self.gate.aspect_range, self.gate.structure_floor, self.gate.saturation_limit)
        return ("frame", why) if why else None

    def _input_lut(self) -> Optional[np.ndarray]:
        """For a quantised input with one mean/std for all channels: the input value of each
        pixel value 0..255, computed once by the same normalise-and-quantise steps."""
        pre = self.spec.preprocessing
        if self.model.input_q is None or len(pre.mean) != 1 or len(pre.std) != 1:
            return None
        levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
        return self.quantize_input(normalize(levels, pre)).reshape(256)

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """A float input (H, W, C) as the input tensor's type, through its own scale and zero point."""
        if self.model.input_q is None:
            return x if x.dtype == self._in_dtype else x.astype(self._in_dtype)
        return quantize(x, *self.model.input_q, self._in_dtype)

    # ---- the model ------------------------------------------------------------------------
    def infer(self, prep: Prepared, heatmap: bool) -> Prediction:
        """Run the interpreter on a prepared input and decide: a ``Prediction``, or a ``Refusal``
        when the domain gate refuses the image and out-of-domain answers are off."""
        source = prep.source or "<image>"
        t1 = now()
        probs, cams = self._outputs(prep, heatmap, source)
        t2 = now()
        if not np.all(np.isfinite(probs)):
            raise OutputError(f"the model's output is not finite (NaN or infinity) for this image: {source!r}")
        idx, applied = self._decide(probs)
        if cams is not None and not np.all(np.isfinite(cams)):
            raise OutputError(f"the model's heat map is not finite for this image: {source!r}")
        verdict = self._verdict(prep)
        prediction = Prediction(
            label=self.labels[idx], probabilities={name: float(p) for name, p in zip(self.labels, probs)},
            source=prep.source, preprocess_ms=prep.ms, invoke_ms=(t2 - t1) * 1e3,
            total_ms=prep.ms + (now() - t1) * 1e3, threshold_applied=applied, dicom=prep.dicom,
            heatmap=None if cams is None else np.ascontiguousarray(cams[:, :, idx], dtype=np.float32),
            index=idx, categories=self._categories(probs), domain=verdict)
        if verdict is not None and not verdict.in_domain and not self.settings.allow_out_of_domain:
            return Refusal(prep.source or "<image>", f"{verdict.text()}: {source!r}", verdict,
                           dataclasses.replace(prediction, heatmap=None), prep.dicom)
        return prediction

    def _outputs(self, prep: Prepared, heatmap: bool, source: str):
        """(probabilities, maps or None) of one prepared input; with ``heatmap`` through the
        heat-map signature (and the default one too when the score is needed)."""
        try:
            if heatmap:
                probs, cams = self.heatmap_runner()(prep.input[None, ...])
                if self.model.score_output is not None:  # the score comes from the default signature
                    self.interpreter.set_tensor(self._in_index, prep.input[None, ...])
                    self.interpreter.invoke()
                return probs, cams
            self.interpreter.set_tensor(self._in_index, prep.input[None, ...])
            return self.invoke(), None
        except (RuntimeError, ValueError) as exc:
            raise OutputError(f"the interpreter failed on this image ({runtime_message(exc)}): {source!r}") from None

    def run(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities of one preprocessed float input (H, W, C)."""
        self.interpreter.set_tensor(self._in_index, self.quantize_input(x)[None, ...])
        return self.invoke()

    def invoke(self) -> np.ndarray:
        """Invoke on the input in place: the class probabilities."""
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self._out_index)[0]
        if self.model.output_q is not None:
            y = dequantize(y, *self.model.output_q)
        return output_probabilities(y, self.spec.output, self.spec.temperature)

    def heatmap_runner(self) -> HeatmapRunner:
        """The ``heatmap`` signature's runner, built on first use."""
        if not self.model.has_heatmap:
            raise ModelError(f"model has no heat map (no 'heatmap' signature): convert it with "
                             f"`lungedge convert RUN --heatmap` (its head must be pooling -> Dense layers): "
                             f"{self.model.path!r}")
        if self._heatmap_runner is None:
            self._heatmap_runner = HeatmapRunner(self.model)
        return self._heatmap_runner

    # ---- after the model ------------------------------------------------------------------
    def _decide(self, probs: np.ndarray):
        if self.use_threshold:
            return int(apply_threshold(probs[None, :], self._th_index, self._th_value)[0]), True
        return int(np.argmax(probs)), False

    def _categories(self, probs: np.ndarray) -> Tuple[Category, ...]:
        order = np.argsort(-probs, kind="stable")
        if self.settings.score_threshold is not None:
            order = [i for i in order if probs[i] >= self.settings.score_threshold]
        if self.settings.max_results is not None:
            order = order[: self.settings.max_results]
        return tuple(Category(int(i), self.labels[int(i)], float(probs[i])) for i in order)

    def _verdict(self, prep: Prepared) -> Optional[DomainVerdict]:
        """The domain verdict for the last invoke's score (None without a score output)."""
        if self.model.score_output is None:
            return None
        score = self.last_score()
        gate = self.gate
        if gate is None:  # a score but no gate (being converted, or the gate turned off): never refuses
            return DomainVerdict(True, score, None)
        if prep.refused is not None:
            stage, why = prep.refused
            return DomainVerdict(False, score, gate.threshold, why, stage)
        if not np.isfinite(score):
            return DomainVerdict(False, score, gate.threshold, "the domain score is not finite", "score")
        verdict = gate.judge(score)
        if verdict.in_domain and prep.pixels is not None and gate.needs_polarity_check(score):
            verdict = gate.judge_polarity(score, self._inverse_score(prep.pixels))
        return verdict

    def _inverse_score(self, pixels: np.ndarray) -> float:
        """The domain score of the image with its grey levels inverted (a second invoke)."""
        inverse = 255 - pixels
        x = self._lut[inverse] if self._lut is not None else self.quantize_input(
            normalize(inverse, self.spec.preprocessing))
        self.interpreter.set_tensor(self._in_index, x[None, ...])
        self.interpreter.invoke()
        return self.last_score()

    def last_score(self) -> float:
        """The domain score of the last invoke."""
        y = self.interpreter.get_tensor(self.model.score_output["index"]).reshape(-1)[0]
        if self.model.score_q is not None:
            y = dequantize(np.asarray([y]), *self.model.score_q)[0]
        return float(y)

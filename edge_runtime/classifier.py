"""Classify images with a TFLite model on the device: LiteRT or tflite-runtime, numpy, Pillow."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .backend import Backend, load_backend, quiet_runtime
from .data import expand_inputs
from .dicom import DicomInfo, check_modality, expected_modalities
from .domain import DomainVerdict, check_dicom, check_frame
from .decision import apply_threshold, output_probabilities
from .errors import (ConfigError, ImageError, InputError, LungedgeError, MissingDependencyError, ModelError,
                     OutputError)
from .files import read_regular_file
from .guard import guard_available, trial_load
from .metadata import read_model_bytes, read_spec, read_standard, verify_integrity
from .modelcheck import check_model_structure
from .preprocess import ImageSource, image_size, load_image, normalize
from .quant import dequantize, quantize
from .spec import ModelSpec, Preprocessing, Threshold
from .tflite_metadata import StandardMetadata
from .timing import now


#: Refuse a labels file larger than this (ImageNet's 1,001 labels are 22 kB).
MAX_LABELS_BYTES = 4 * 2**20


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
        threads: interpreter threads (None: the backend's default).
        backend: ``auto`` (LiteRT, then tflite-runtime), ``litert`` or ``tflite-runtime``.
        labels: class names in output order, or a path to a text file with one per line;
            overrides the metadata's (their count must match the model's output).
        mean, std: normalisation for a model without metadata.
        use_threshold: apply the model's decision threshold when it has one.
        guard: build and run the model once in a child process first (``edge_runtime.guard``),
            so that a file that crashes the runtime becomes a ModelError instead of killing
            this process. Turn it off only for files known to load.
        max_results: keep at most this many ``Prediction.categories`` (None: all).
        score_threshold: keep only categories scoring at least this (None: all). Neither
            changes the decision (``Prediction.label``) or ``Prediction.probabilities``.
        domain_gate: refuse images the model was not built for (``edge_runtime.domain``) when
            the file has a gate; False reads the score but never refuses (conversion uses it).
        allow_out_of_domain: answer refused images anyway, their ``Prediction.domain`` marked
            out of domain with the reason.

    Loading checks, in order: a regular file within ``MAX_MODEL_BYTES``; the flatbuffer's
    structure (``edge_runtime.modelcheck``); the integrity record when there is one
    (``describe()["integrity"]`` says "verified" or "absent"); the metadata's types and sizes;
    then the guarded first load.

    Raises:
        ModelError: the file is missing, not a regular file, too large, not TFLite, malformed,
            changed since conversion, crashes or hangs the runtime, needs operators the runtime
            lacks, or its labels do not match its output. The message names the file.
        InputError: the labels file cannot be used.
        MissingDependencyError: no interpreter backend installed.
    """

    def __init__(
        self,
        model_path: Union[str, "os.PathLike[str]"],
        *,
        threads: Optional[int] = None,
        backend: str = "auto",
        labels: Optional[Union[Sequence[str], str]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        use_threshold: bool = True,
        guard: bool = True,
        max_results: Optional[int] = None,
        score_threshold: Optional[float] = None,
        domain_gate: bool = True,
        allow_out_of_domain: bool = False,
    ) -> None:
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ConfigError(f"threads must be a positive integer, got {threads!r}")
        if max_results is not None and (not isinstance(max_results, int) or isinstance(max_results, bool)
                                        or max_results < 1):
            raise ConfigError(f"max_results must be a positive integer or None, got {max_results!r}")
        if score_threshold is not None and (isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float))
                                            or not 0.0 <= float(score_threshold) <= 1.0):
            raise ConfigError(f"score_threshold must be a number from 0 to 1 or None, got {score_threshold!r}")
        self.max_results = max_results
        self.allow_out_of_domain = bool(allow_out_of_domain)
        self._domain_on = bool(domain_gate)
        self.score_threshold = None if score_threshold is None else float(score_threshold)
        self._interpreter = None
        self.model_path = os.fsdecode(model_path) if isinstance(model_path, bytes) else str(model_path)
        try:
            self._load(model_path, threads, backend, labels, mean, std, use_threshold, guard)
        except (ConfigError, MissingDependencyError, InputError):
            raise
        except LungedgeError as exc:
            raise ModelError(_naming(str(exc), self.model_path)) from None
        except MemoryError:
            raise ModelError(f"not enough memory to load the model: {self.model_path!r}") from None
        except Exception as exc:  # whatever a damaged file makes a runtime raise
            raise ModelError(f"model cannot be used ({type(exc).__name__}: {_first_line(exc)}): {self.model_path!r}") from None

    def _load(self, model_path, threads, backend, labels, mean, std, use_threshold, guard) -> None:
        name = self.model_path
        data = read_model_bytes(model_path)
        self.structure = check_model_structure(data, name)
        integrity = verify_integrity(data, name)
        self.model_sha256 = integrity.file_sha256
        self.integrity = integrity.status
        self.model_size = len(data)
        spec = read_spec(data, name)
        self.standard: Optional[StandardMetadata] = None
        self.standard_error: Optional[str] = None
        try:
            self.standard = read_standard(data, name)
        except ModelError as exc:  # only needed for a file without a lungedge record and without labels
            self.standard_error = str(exc)
        self.backend: Backend = load_backend(backend)
        self.threads = threads
        self.guarded = bool(guard) and guard_available()
        if self.guarded:
            trial_load(data, self.backend.interpreter_class, threads, name)
        t0 = now()
        self._interpreter = self._make_interpreter(data, threads)
        self.load_ms = (now() - t0) * 1e3
        inp = self._interpreter.get_input_details()
        out = self._interpreter.get_output_details()
        if len(inp) != 1 or len(out) not in (1, 2):
            raise ModelError(f"expected an image classifier with 1 input and 1 output (2 with a domain score), "
                             f"got {len(inp)} and {len(out)}: {name!r}")
        self._in = inp[0]
        self._out, self._score_out = _split_outputs(out, name)
        shape = tuple(int(x) for x in self._in["shape"])
        if len(shape) != 4 or shape[0] != 1 or shape[3] not in (1, 3):
            raise ModelError(f"expected an input of shape (1, H, W, 1 or 3), got {shape}: {name!r}")
        out_shape = tuple(int(x) for x in self._out["shape"])
        if len(out_shape) != 2 or out_shape[0] != 1 or out_shape[1] < 2:
            raise ModelError(f"expected an output of shape (1, classes>=2), got {out_shape}: {name!r}")
        self.has_metadata = spec is not None  # a lungedge record inside the file
        self.spec = self._resolve_spec(spec, shape, out_shape[1], labels, mean, std)
        self.use_threshold = use_threshold and self.spec.threshold is not None
        self._in_index, self._out_index = self._in["index"], self._out["index"]
        self._score_q = _quant(self._score_out) if self._score_out is not None else None
        #: the file's domain gate (None: no gate, every image is answered)
        self.domain = self.spec.domain if self._score_out is not None and self.has_metadata else None
        if self.spec.domain is not None and self._score_out is None and self.has_metadata:
            raise ModelError(f"metadata describes a domain gate but the model has no '{self.spec.domain.output}' "
                             f"output: {name!r}")
        self._gate = self.domain if self._domain_on else None
        intended = self.spec.intended if self.has_metadata else {}
        self._chest = str(intended.get("body_part", "")).lower() == "chest"
        self._frontal = str(intended.get("view", "")).lower().startswith("frontal")
        self._in_dtype = np.dtype(self._in["dtype"])
        self._in_q = _quant(self._in)
        self._lut = self._input_lut()
        self._out_q = _quant(self._out)
        self._labels = list(self.spec.labels)
        self._modalities = expected_modalities(self.spec.recipe, self.spec.extra) if self.has_metadata else None
        self._model_data = data
        self._heatmap_runner = None
        self.has_heatmap = _has_heatmap_signature(self._interpreter, self.spec.num_classes)
        if self.use_threshold:
            th = self.spec.threshold
            self._th_index, self._th_value = self._labels.index(th.label), th.value
        try:
            t0 = now()
            self._interpreter.invoke()  # first inference: XNNPACK packs weights here
            self.first_invoke_ms = (now() - t0) * 1e3
        except Exception as exc:
            raise ModelError(f"model cannot run in {self.backend.describe()}: {_first_line(exc)}: {name!r}") from None

    # ---- construction helpers -------------------------------------------------------
    def _make_interpreter(self, data: bytes, threads: Optional[int]):
        try:
            with quiet_runtime():
                it = self.backend.interpreter_class(model_content=data, num_threads=threads)
                it.allocate_tensors()
        except Exception as exc:  # RuntimeError/ValueError from the C++ side
            raise ModelError(
                f"model cannot be loaded by {self.backend.describe()}: {_first_line(exc)}: {self.model_path!r}"
            ) from None
        return it

    def _resolve_spec(self, spec, in_shape, n_out, labels, mean, std) -> ModelSpec:
        self.metadata_source = "lungedge" if spec is not None else None
        h, w, c = in_shape[1], in_shape[2], in_shape[3]
        if labels is not None:
            labels = _read_labels(labels)
        if spec is None:
            std_mean, std_std = self._standard_normalisation()
            if labels is None and self.standard is not None and self.standard.labels:
                labels = _disambiguate(list(self.standard.labels))
            if labels is None and self.standard_error:
                raise ModelError(self.standard_error)
            if labels is None:
                raise ModelError(
                    "model has no lungedge metadata and no labels file in standard TFLite metadata, so its labels "
                    f"are unknown: pass labels (--labels FILE): {self.model_path!r}"
                )
            if self.standard is not None:
                self.metadata_source = "TFLITE_METADATA"
            pre = Preprocessing(height=h, width=w, color_mode="rgb" if c == 3 else "grayscale",
                                mean=tuple(mean) if mean else std_mean, std=tuple(std) if std else std_std)
            spec = ModelSpec(labels=tuple(labels), preprocessing=pre)
        else:
            if labels is not None:
                spec = _replace_labels(spec, labels)
            if mean or std:
                spec = spec.replace(preprocessing=Preprocessing(**{**spec.preprocessing.to_dict(),
                                                                  **({"mean": tuple(mean)} if mean else {}),
                                                                  **({"std": tuple(std)} if std else {})}))
            p = spec.preprocessing
            if (p.height, p.width, p.channels) != (h, w, c):
                raise ModelError(
                    f"metadata says input {p.height}x{p.width}x{p.channels} but the model takes {h}x{w}x{c}: {self.model_path!r}"
                )
        if spec.num_classes != n_out:
            raise ModelError(f"{spec.num_classes} labels given but the model has {n_out} outputs: {self.model_path!r}")
        return spec

    def _standard_normalisation(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """mean/std for a model without a lungedge record.

        A quantised uint8 input takes raw pixels in MediaPipe and the Task Library (they ignore
        ``NormalizationOptions`` for it): the tensor's own quantisation is the normalisation.
        A float input uses the standard record's ``NormalizationOptions``; without one, the
        MobileNet default 127.5/127.5.
        """
        if np.dtype(self._in["dtype"]) == np.uint8:
            q = _quant(self._in)
            if q is not None and q[0] > 0:
                return (float(q[1]),), (1.0 / q[0],)
        info = self.standard.inputs[0] if self.standard is not None and self.standard.inputs else None
        if info is not None and info.mean and info.std and len(info.mean) in (1, self._in["shape"][3]) \
                and len(info.std) in (1, self._in["shape"][3]) and all(x > 0 for x in info.std):
            return tuple(info.mean), tuple(info.std)
        return (127.5,), (127.5,)

    # ---- public ---------------------------------------------------------------------
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
        self._interpreter = None

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def labels(self) -> List[str]:
        return list(self._labels)

    @property
    def model_bytes(self) -> bytes:
        """The model file's bytes as read and checked when it was loaded (the interpreter runs these)."""
        return self._model_data

    @property
    def input_details(self) -> dict:
        return dict(self._in)

    @property
    def output_details(self) -> dict:
        return dict(self._out)

    def delegate_nodes(self) -> int:
        """How many nodes of the graph a delegate (XNNPACK) took; 0 when none did."""
        try:
            ops = self._interpreter._get_ops_details()
        except Exception:
            return -1
        return sum(1 for op in ops if "DELEGATE" in str(op.get("op_name", "")).upper())

    def operators(self) -> List[dict]:
        """The graph's operators by name: ``{"op", "count", "delegated"}``, most frequent first.

        ``delegated`` counts the nodes inside a delegate's partitions (XNNPACK on CPU): found by
        walking back from each delegate node's outputs to its inputs through the original
        nodes (``_get_ops_details`` lists both). Empty when the backend cannot list nodes.
        """
        try:
            nodes = self._interpreter._get_ops_details()
        except Exception:
            return []
        original = [n for n in nodes if "DELEGATE" not in str(n["op_name"]).upper()]
        producer = {int(t): n["index"] for n in original for t in n["outputs"]}
        by_index = {n["index"]: n for n in original}
        delegated: set = set()
        for node in nodes:
            if "DELEGATE" not in str(node["op_name"]).upper():
                continue
            boundary = {int(t) for t in node["inputs"]}
            stack = [int(t) for t in node["outputs"]]
            while stack:
                t = stack.pop()
                i = producer.get(t)
                if t in boundary or i is None or i in delegated:
                    continue
                delegated.add(i)
                stack.extend(int(x) for x in by_index[i]["inputs"] if int(x) >= 0)
        counts: dict = {}
        for n in original:
            row = counts.setdefault(str(n["op_name"]), {"op": str(n["op_name"]), "count": 0, "delegated": 0})
            row["count"] += 1
            row["delegated"] += n["index"] in delegated
        return sorted(counts.values(), key=lambda r: (-r["count"], r["op"]))

    def tensor_info(self, which: str = "input") -> dict:
        """Name, shape, dtype and quantisation (scale, zero point; None for float) of the input
        or output tensor."""
        d = self._in if which == "input" else self._out
        q = _quant(d)
        return {"name": str(d["name"]), "shape": [int(x) for x in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                "quantization": None if q is None else {"scale": q[0], "zero_point": q[1]}}

    def describe(self) -> dict:
        return {
            "model": self.model_path,
            "sha256": self.model_sha256,
            "size_bytes": self.model_size,
            "integrity": self.integrity,
            "guarded_load": self.guarded,
            "backend": self.backend.name,
            "backend_version": self.backend.version,
            "threads": self.threads,
            "input_dtype": self._in_dtype.name,
            "output_dtype": np.dtype(self._out["dtype"]).name,
            "input_shape": [int(x) for x in self._in["shape"]],
            "labels": self.labels,
            "has_metadata": self.has_metadata,
            "metadata_source": self.metadata_source,
            "standard_metadata": self.standard is not None,
            "threshold": self.spec.threshold.to_dict() if self.use_threshold else None,
            "variant": self.spec.variant,
            "recipe": self.spec.recipe,
            "heatmap": self.has_heatmap,
            "domain": self.domain.to_dict() if self.domain is not None else None,
            "domain_gate": "on" if self._gate is not None else ("off" if self.domain is not None else "none"),
            "intended": dict(self.spec.intended) if self.has_metadata else {},
        }

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
        if self._interpreter is None:
            raise ConfigError(f"the classifier is closed: {self.model_path!r}")
        return self._infer(self._prepare(image, name), heatmap)

    def _prepare(self, image: ImageSource, name: Optional[str]) -> "_Prepared":
        """Decode and preprocess to the model's input array (no interpreter: safe on worker threads)."""
        t0 = now()
        source = name or (os.fsdecode(image) if isinstance(image, (str, os.PathLike)) else "")
        pixels, dicom = load_image(image, self.spec.preprocessing, name=name)
        reason = None
        if self._gate is not None:
            reason = self._before_model(image, pixels, dicom, name)
        elif dicom is not None:
            check_modality(dicom, self._modalities, source or "<image>")
        # quantised input: pixel -> input value by table (the same numbers as normalise + quantise)
        inp = self._lut[pixels] if self._lut is not None else self._quantize_input(normalize(pixels, self.spec.preprocessing))
        return _Prepared(source, inp, dicom, (now() - t0) * 1e3, reason, pixels if self._gate is not None else None)

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
        why = check_frame(pixels, size, self._gate.aspect_range, self._gate.structure_floor,
                          self._gate.saturation_limit)
        return ("frame", why) if why else None

    def _infer(self, prep: "_Prepared", heatmap: bool) -> Prediction:
        """Run the interpreter on a prepared input and decide (the calling thread owns the interpreter)."""
        source = prep.source or "<image>"
        cams = None
        t1 = now()
        try:
            if heatmap:
                probs, cams = self._run_heatmap(self._heatmap(), prep.input[None, ...])
                if self._score_out is not None:  # the score comes from the default signature
                    self._interpreter.set_tensor(self._in_index, prep.input[None, ...])
                    self._interpreter.invoke()
            else:
                self._interpreter.set_tensor(self._in_index, prep.input[None, ...])
                probs = self._invoke()
        except (RuntimeError, ValueError) as exc:
            raise OutputError(f"the interpreter failed on this image ({_first_line(exc)}): {source!r}") from None
        t2 = now()
        if not np.all(np.isfinite(probs)):
            raise OutputError(f"the model's output is not finite (NaN or infinity) for this image: {source!r}")
        idx, applied = self._decide(probs)
        if cams is not None and not np.all(np.isfinite(cams)):
            raise OutputError(f"the model's heat map is not finite for this image: {source!r}")
        verdict = self._verdict(prep)
        prediction = Prediction(
            label=self._labels[idx],
            probabilities={name: float(p) for name, p in zip(self._labels, probs)},
            source=prep.source,
            preprocess_ms=prep.ms,
            invoke_ms=(t2 - t1) * 1e3,
            total_ms=prep.ms + (now() - t1) * 1e3,
            threshold_applied=applied,
            dicom=prep.dicom,
            heatmap=None if cams is None else np.ascontiguousarray(cams[:, :, idx], dtype=np.float32),
            index=idx,
            categories=self._categories(probs),
            domain=verdict,
        )
        if verdict is not None and not verdict.in_domain and not self.allow_out_of_domain:
            return Refusal(prep.source or "<image>", f"{verdict.text()}: {source!r}", verdict,
                           dataclasses.replace(prediction, heatmap=None), prep.dicom)
        return prediction

    def _verdict(self, prep: "_Prepared") -> Optional[DomainVerdict]:
        """The domain verdict for the last invoke's score (None without a score output)."""
        if self._score_out is None:
            return None
        score = self._last_score()
        gate = self._gate
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
        x = self._lut[inverse] if self._lut is not None else self._quantize_input(
            normalize(inverse, self.spec.preprocessing))
        self._interpreter.set_tensor(self._in_index, x[None, ...])
        self._interpreter.invoke()
        return self._last_score()

    def _last_score(self) -> float:
        y = self._interpreter.get_tensor(self._score_out["index"]).reshape(-1)[0]
        if self._score_q is not None:
            y = dequantize(np.asarray([y]), *self._score_q)[0]
        return float(y)

    def _categories(self, probs: np.ndarray) -> Tuple[Category, ...]:
        order = np.argsort(-probs, kind="stable")
        if self.score_threshold is not None:
            order = [i for i in order if probs[i] >= self.score_threshold]
        if self.max_results is not None:
            order = order[: self.max_results]
        return tuple(Category(int(i), self._labels[int(i)], float(probs[i])) for i in order)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities for one already-preprocessed float input (H, W, C)."""
        return self._run(x)

    def predict_with_score(self, x: np.ndarray) -> Tuple[np.ndarray, Optional[float]]:
        """(class probabilities, domain score or None) for one preprocessed float input (H, W, C);
        no check before the model and no refusal (conversion and evaluation read the raw score)."""
        probs = self._run(x)
        return probs, (self._last_score() if self._score_out is not None else None)

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
        if self._interpreter is None:
            raise ConfigError(f"the classifier is closed: {self.model_path!r}")
        items: list = []
        for s in sources:
            if isinstance(s, (str, os.PathLike)):
                items.extend(expand_inputs([str(s)]))
            else:
                items.append((s, None))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(items), desc="classify", unit="img", leave=False)
        workers = default_workers() if workers is None else workers
        try:
            for (src, _), prepared in zip(items, _prepare_ahead(self._prepare, items, workers)):
                if bar is not None:
                    bar.update()
                if isinstance(prepared, Failure):
                    yield prepared
                    continue
                try:
                    yield self._infer(prepared, heatmap)
                except (ImageError, OutputError) as exc:
                    yield Failure(str(src), str(exc))
        finally:
            if bar is not None:
                bar.close()

    # ---- private steps --------------------------------------------------------------
    def _heatmap(self):
        """The ``heatmap`` signature's runner, on an interpreter of its own (built on first use:
        a signature runner keeps a reference that stops the default interpreter's ``invoke``)."""
        if not self.has_heatmap:
            raise ModelError(f"model has no heat map (no 'heatmap' signature): convert it with "
                             f"`lungedge convert RUN --heatmap` (its head must be pooling -> Dense layers): "
                             f"{self.model_path!r}")
        if self._heatmap_runner is None:
            with quiet_runtime():
                it = self.backend.interpreter_class(model_content=self._model_data, num_threads=self.threads)
            runner = it.get_signature_runner(HEATMAP_SIGNATURE)
            outs = runner.get_output_details()
            self._heatmap_runner = (it, runner, _quant(outs["probabilities"]), _quant(outs["heatmap"]))
        return self._heatmap_runner

    def _run_heatmap(self, runner, inp: np.ndarray):
        _, run, pq, hq = runner
        out = run(image=inp)
        probs = output_probabilities(_dequantize(out["probabilities"][0], pq), self.spec.output, self.spec.temperature)
        cams = _dequantize(out["heatmap"][0], hq)
        del out  # the runner's outputs are views into the interpreter
        return probs, cams

    def _run(self, x: np.ndarray) -> np.ndarray:
        self._interpreter.set_tensor(self._in_index, self._quantize_input(x)[None, ...])
        return self._invoke()

    def _invoke(self) -> np.ndarray:
        self._interpreter.invoke()
        return self._read_output()

    def _input_lut(self) -> Optional[np.ndarray]:
        """For a quantised input with one mean/std for all channels: the input value of each
        pixel value 0..255, computed once by the same normalise-and-quantise steps."""
        pre = self.spec.preprocessing
        if self._in_q is None or len(pre.mean) != 1 or len(pre.std) != 1:
            return None
        levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
        return self._quantize_input(normalize(levels, pre)).reshape(256)

    def _quantize_input(self, x: np.ndarray) -> np.ndarray:
        if self._in_q is None:
            return x if x.dtype == self._in_dtype else x.astype(self._in_dtype)
        return quantize(x, *self._in_q, self._in_dtype)

    def _read_output(self) -> np.ndarray:
        y = self._interpreter.get_tensor(self._out_index)[0]
        if self._out_q is not None:
            y = dequantize(y, *self._out_q)
        return output_probabilities(y, self.spec.output, self.spec.temperature)

    def _decide(self, probs: np.ndarray):
        if self.use_threshold:
            return int(apply_threshold(probs[None, :], self._th_index, self._th_value)[0]), True
        return int(np.argmax(probs)), False


@dataclass(frozen=True)
class _Prepared:
    """One image, decoded and preprocessed: the interpreter's input without the batch axis."""

    source: str
    input: np.ndarray
    dicom: Optional[DicomInfo]
    ms: float
    #: (stage, reason) when a check before the model refused the image
    refused: Optional[Tuple[str, str]] = None
    #: the decoded uint8 pixels (the polarity check inverts them)
    pixels: Optional[np.ndarray] = None


def default_workers() -> int:
    """Decoding threads for folder runs: the usable cores, at most 4 (past that the interpreter,
    not decoding, is the bottleneck for a MobileNet-class model)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _prepare_ahead(prepare, items: Sequence, workers: int) -> Iterator:
    """``prepare(source, None)`` for each (source, problem) item, in input order, as a
    ``_Prepared`` or a ``Failure``; with ``workers`` > 0 on a thread pool, a bounded window ahead."""

    def one(src, problem):
        if problem:
            return Failure(str(src), problem)
        try:
            return prepare(src, None)
        except (ImageError, OutputError) as exc:
            return Failure(str(src), str(exc))

    if workers <= 0:
        for src, problem in items:
            yield one(src, problem)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    window: deque = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lungedge-decode") as pool:
        try:
            for src, problem in items:
                window.append(pool.submit(one, src, problem))
                if len(window) >= 2 * workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:  # the consumer stopped early: drop what is queued, do not decode it
            for f in window:
                f.cancel()


def _quant(details: dict):
    """(scale, zero_point) for a quantised int8/uint8 tensor, else None."""
    dtype = np.dtype(details["dtype"])
    if dtype not in (np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16)):
        return None
    qp = details.get("quantization_parameters") or {}
    scales, zeros = qp.get("scales", []), qp.get("zero_points", [])
    if len(scales):
        return float(scales[0]), int(zeros[0])
    scale, zero = details.get("quantization", (0.0, 0))
    if not scale:
        raise ModelError(f"tensor {details.get('name')!r} is {dtype.name} but has no quantisation scale")
    return float(scale), int(zero)


#: The signature that returns the class activation maps (written by ``convert.heatmap``).
HEATMAP_SIGNATURE = "heatmap"


def _has_heatmap_signature(interpreter, classes: int) -> bool:
    """True when the model has a ``heatmap`` signature: image -> probabilities, heatmap (1, h, w, classes)."""
    try:
        sig = interpreter.get_signature_list().get(HEATMAP_SIGNATURE)
    except Exception:  # tflite-runtime builds without signatures
        return False
    return bool(sig) and sorted(sig.get("outputs", [])) == ["heatmap", "probabilities"] and sig.get("inputs") == ["image"]


def _split_outputs(outputs: list, name: str):
    """(class output, domain score output or None): the score is the (1, 1) output."""
    if len(outputs) == 1:
        return outputs[0], None
    shapes = [tuple(int(x) for x in o["shape"]) for o in outputs]
    scores = [i for i, s in enumerate(shapes) if s == (1, 1)]
    if len(scores) != 1:
        raise ModelError(f"expected a class output and a (1, 1) domain score output, got shapes {shapes}: {name!r}")
    return outputs[1 - scores[0]], outputs[scores[0]]


def _dequantize(y: np.ndarray, q) -> np.ndarray:
    if q is None:
        return np.array(y, dtype=np.float32)
    scale, zero = q
    return (y.astype(np.float32) - zero) * np.float32(scale)


def _read_labels(labels) -> List[str]:
    if isinstance(labels, (str, os.PathLike)):
        name = os.fsdecode(labels)
        data = read_regular_file(labels, what="labels file", max_bytes=MAX_LABELS_BYTES, error=InputError)
        try:
            names = [line.strip() for line in data.decode("utf-8").splitlines()]
        except UnicodeDecodeError:
            raise InputError(f"labels file is not UTF-8 text: {name!r}") from None
        names = [n for n in names if n]
        if not names:
            raise InputError(f"labels file is empty: {name!r}")
        return _disambiguate(names)
    return _disambiguate([str(x) for x in labels])


def _disambiguate(names: List[str]) -> List[str]:
    """Third-party label files repeat names (ImageNet has two 'crane'); keep each distinct."""
    seen: dict = {}
    out = []
    for i, n in enumerate(names):
        out.append(n if n not in seen else f"{n} [{i}]")
        seen[n] = True
    return out


def _replace_labels(spec: ModelSpec, labels: List[str]) -> ModelSpec:
    threshold, positive = spec.threshold, spec.positive_label
    if threshold and threshold.label not in labels:
        threshold = None
    if positive and positive not in labels:
        positive = None
    return spec.replace(labels=tuple(labels), threshold=threshold, positive_label=positive)


def _naming(message: str, path: str) -> str:
    """``message``, ending with the file it is about if it does not name it already."""
    return message if repr(path) in message else f"{message}: {path!r}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.replace("; See instructions", "\nSee instructions").splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("See instructions", "Node number"))] or lines
    # the C++ side often prints a generic line last; the specific one is usually first
    return "; ".join(lines[:2])[:300]

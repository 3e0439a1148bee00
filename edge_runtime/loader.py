"""Loading a ``.tflite`` classifier: every check on the file, then the interpreter, once.

``load_model`` returns a frozen ``LoadedModel`` (the file's bytes and facts, the resolved spec, the
tensors' details) and the interpreter built from it, allocated and run once. The checks, in order:
a regular file within ``MAX_MODEL_BYTES``; the flatbuffer's structure (``edge_runtime.modelcheck``);
the integrity record when there is one; the metadata's types and sizes; the guarded first load
(``edge_runtime.load_guard``); the tensors an image classifier has; the labels against the output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

from .backend import Backend, load_backend, quiet_runtime, runtime_message
from .domain import DomainGate
from .errors import ConfigError, InputError, LungedgeError, MissingDependencyError, ModelError
from .load_guard import guard_available, trial_load
from .heatmap_runner import has_heatmap_signature
from .metadata import read_model_bytes, read_spec, read_standard, verify_integrity
from .modelcheck import Structure, check_model_structure
from .quant import tensor_quantization
from .resolve import resolve_spec
from .settings import RuntimeSettings
from .spec import ModelSpec
from .tflite_metadata import StandardMetadata
from .timing import now

Quantization = Optional[Tuple[float, int]]


@dataclass(frozen=True)
class LoadedModel:
    """A model file as loaded and checked: what it is, what it runs with, its tensors.

    Attributes:
        path: the file, as the caller named it.
        data: its bytes as read and checked (the interpreter runs these).
        structure: the flatbuffer's counts (``modelcheck.Structure``).
        sha256, integrity: the file's digest and its integrity record's status ("verified", "absent").
        spec: labels and preprocessing to run with (``edge_runtime.resolve``).
        metadata_source: where they came from: "lungedge", "TFLITE_METADATA" or None (the caller).
        has_metadata: the file has a lungedge record.
        standard, standard_error: its standard ``TFLITE_METADATA`` record, or why it could not be read.
        backend, threads, guarded: the interpreter's backend, threads asked for, and whether the
            first load ran in a child process.
        input, output, score_output: the interpreter's tensor details (score: the domain score, or None).
        input_q, output_q, score_q: their (scale, zero point), None for float tensors.
        has_heatmap: the file has a ``heatmap`` signature.
        load_ms, first_invoke_ms: interpreter construction and allocation; the first ``invoke``.
    """

    path: str
    data: bytes = field(repr=False)
    structure: Structure
    sha256: str
    integrity: str
    spec: ModelSpec
    metadata_source: Optional[str]
    has_metadata: bool
    standard: Optional[StandardMetadata]
    standard_error: Optional[str]
    backend: Backend
    threads: Optional[int]
    guarded: bool
    input: dict = field(repr=False)
    output: dict = field(repr=False)
    score_output: Optional[dict] = field(repr=False)
    input_q: Quantization
    output_q: Quantization
    score_q: Quantization
    has_heatmap: bool
    load_ms: float
    first_invoke_ms: float

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def domain(self) -> Optional[DomainGate]:
        """The file's domain gate (None: no gate, every image is answered)."""
        return self.spec.domain if self.score_output is not None and self.has_metadata else None


@dataclass(frozen=True)
class _FileFacts:
    """What the bytes say before any interpreter runs them."""

    data: bytes
    structure: Structure
    sha256: str
    integrity: str
    spec: Optional[ModelSpec]
    standard: Optional[StandardMetadata]
    standard_error: Optional[str]


def load_model(model_path: Any, settings: RuntimeSettings) -> Tuple[LoadedModel, Any]:
    """Read, check and load a classifier: ``(LoadedModel, interpreter)``.

    The interpreter is allocated and has run once (XNNPACK packs weights on the first
    ``invoke``); it is the one mutable part, owned by the caller.

    Raises:
        ModelError: the file cannot be used (the message names it).
        InputError: the labels file cannot be used.
        ConfigError, MissingDependencyError: an unknown or missing backend.
    """
    name = os.fsdecode(model_path) if isinstance(model_path, bytes) else str(model_path)
    try:
        return _load(model_path, name, settings)
    except (ConfigError, MissingDependencyError, InputError):
        raise
    except LungedgeError as exc:
        raise ModelError(_naming(str(exc), name)) from None
    except MemoryError:
        raise ModelError(f"not enough memory to load the model: {name!r}") from None
    except Exception as exc:  # whatever a damaged file makes a runtime raise
        raise ModelError(f"model cannot be used ({type(exc).__name__}: {runtime_message(exc)}): {name!r}") from None


def _load(model_path: Any, name: str, settings: RuntimeSettings) -> Tuple[LoadedModel, Any]:
    facts = _read_file(model_path, name)
    backend = load_backend(settings.backend)
    guarded = bool(settings.guard) and guard_available()
    if guarded:
        trial_load(facts.data, backend.interpreter_class, settings.threads, name)
    t0 = now()
    interpreter = _make_interpreter(backend, facts.data, settings.threads, name)
    load_ms = (now() - t0) * 1e3
    inp, out, score = _classifier_tensors(interpreter, name)
    spec, source = resolve_spec(facts.spec, facts.standard, facts.standard_error, inp, int(out["shape"][1]),
                                settings, name)
    if spec.domain is not None and score is None and facts.spec is not None:
        raise ModelError(f"metadata describes a domain gate but the model has no '{spec.domain.output}' "
                         f"output: {name!r}")
    score_q = tensor_quantization(score) if score is not None else None
    input_q, output_q = tensor_quantization(inp), tensor_quantization(out)
    has_heatmap = has_heatmap_signature(interpreter, spec.num_classes)
    first_invoke_ms = _first_invoke(interpreter, backend, name)
    model = LoadedModel(
        path=name, data=facts.data, structure=facts.structure, sha256=facts.sha256, integrity=facts.integrity,
        spec=spec, metadata_source=source, has_metadata=facts.spec is not None, standard=facts.standard,
        standard_error=facts.standard_error, backend=backend, threads=settings.threads, guarded=guarded,
        input=inp, output=out, score_output=score, input_q=input_q, output_q=output_q, score_q=score_q,
        has_heatmap=has_heatmap, load_ms=load_ms, first_invoke_ms=first_invoke_ms)
    return model, interpreter


def _read_file(model_path: Any, name: str) -> _FileFacts:
    """The file's bytes, structure, integrity and records (the standard one may be unreadable:
    it is only needed for a file without a lungedge record and without labels)."""
    data = read_model_bytes(model_path)
    structure = check_model_structure(data, name)
    integrity = verify_integrity(data, name)
    spec = read_spec(data, name)
    standard, standard_error = None, None
    try:
        standard = read_standard(data, name)
    except ModelError as exc:
        standard_error = str(exc)
    return _FileFacts(data, structure, integrity.file_sha256, integrity.status, spec, standard, standard_error)


def _make_interpreter(backend: Backend, data: bytes, threads: Optional[int], name: str):
    try:
        with quiet_runtime():
            it = backend.interpreter_class(model_content=data, num_threads=threads)
            it.allocate_tensors()
    except Exception as exc:  # RuntimeError/ValueError from the C++ side
        raise ModelError(f"model cannot be loaded by {backend.describe()}: {runtime_message(exc)}: {name!r}") from None
    return it


def _classifier_tensors(interpreter, name: str) -> Tuple[dict, dict, Optional[dict]]:
    """(input, class output, domain score output or None), checked to be an image classifier's."""
    inp = interpreter.get_input_details()
    out = interpreter.get_output_details()
    if len(inp) != 1 or len(out) not in (1, 2):
        raise ModelError(f"expected an image classifier with 1 input and 1 output (2 with a domain score), "
                         f"got {len(inp)} and {len(out)}: {name!r}")
    classes, score = split_outputs(out, name)
    shape = tuple(int(x) for x in inp[0]["shape"])
    if len(shape) != 4 or shape[0] != 1 or shape[3] not in (1, 3):
        raise ModelError(f"expected an input of shape (1, H, W, 1 or 3), got {shape}: {name!r}")
    out_shape = tuple(int(x) for x in classes["shape"])
    if len(out_shape) != 2 or out_shape[0] != 1 or out_shape[1] < 2:
        raise ModelError(f"expected an output of shape (1, classes>=2), got {out_shape}: {name!r}")
    return inp[0], classes, score


def split_outputs(outputs: list, name: str):
    """(class output, domain score output or None): the score is the (1, 1) output."""
    if len(outputs) == 1:
        return outputs[0], None
    shapes = [tuple(int(x) for x in o["shape"]) for o in outputs]
    scores = [i for i, s in enumerate(shapes) if s == (1, 1)]
    if len(scores) != 1:
        raise ModelError(f"expected a class output and a (1, 1) domain score output, got shapes {shapes}: {name!r}")
    return outputs[1 - scores[0]], outputs[scores[0]]


def _first_invoke(interpreter, backend: Backend, name: str) -> float:
    """Run the model once (XNNPACK packs weights here): its time in ms."""
    try:
        t0 = now()
        interpreter.invoke()
        return (now() - t0) * 1e3
    except Exception as exc:
        raise ModelError(f"model cannot run in {backend.describe()}: {runtime_message(exc)}: {name!r}") from None


def _naming(message: str, path: str) -> str:
    """``message``, ending with the file it is about if it does not name it already."""
    return message if repr(path) in message else f"{message}: {path!r}"

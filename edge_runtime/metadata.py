"""Read and write the ``lungedge`` metadata record inside a ``.tflite`` flatbuffer.

Reading needs only the ``flatbuffers`` package (a few table look-ups, no TensorFlow, no
schema code), so it works with LiteRT and with tflite-runtime alike. Writing uses the TFLite
schema's object API shipped by ``ai_edge_litert`` and is done at conversion time.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

from .errors import ConfigError, ModelError
from .files import read_regular_file
from .spec import ModelSpec
from .tflite_metadata import (CALIBRATION_FILE, LABELS_FILE, STANDARD_NAME, StandardMetadata, append_associated_files,
                              build_standard_metadata, parse_standard_metadata)

METADATA_NAME = "lungedge"
#: The integrity record: a sha256 of every byte of the file except this record's own bytes.
INTEGRITY_NAME = "lungedge.integrity"
INTEGRITY_SCHEMA = "lungedge.integrity/1"
_TFLITE_IDENTIFIER = b"TFL3"

#: Refuse model files larger than this (MobileNetV2 1.0/224 float32 is 14 MB).
MAX_MODEL_BYTES = 256 * 2**20
#: Refuse a lungedge record larger than this (a real one is about 2 kB; 1,000 labels about 30 kB).
MAX_RECORD_BYTES = 1 * 2**20
#: Refuse a metadata table with more entries than this (converters write two or three).
MAX_METADATA_ENTRIES = 10_000

# Field slots of the TFLite schema tables we read (schema.fbs field order).
_MODEL_BUFFERS, _MODEL_METADATA = 4, 6
_METADATA_NAME, _METADATA_BUFFER = 0, 1
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2

PathLike = Union[str, "os.PathLike[str]"]


def read_model_bytes(path: PathLike) -> bytes:
    """Read a model file, checking that it is a regular file of at most ``MAX_MODEL_BYTES``
    holding a TFLite flatbuffer.

    Raises:
        ModelError: missing, a folder, a device or pipe, unreadable, empty, too large or not a
            TFLite file; the message names the file.
    """
    name = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    data = read_regular_file(path, what="model file", max_bytes=MAX_MODEL_BYTES, error=ModelError)
    check_tflite_bytes(data, name)
    return data


def check_tflite_bytes(data: bytes, name: str = "<bytes>") -> None:
    """Raise ModelError unless ``data`` looks like a TFLite flatbuffer."""
    if not data:
        raise ModelError(f"model file is empty: {name!r}")
    if len(data) < 8 or data[4:8] != _TFLITE_IDENTIFIER:
        head = data[:4]
        hint = ""
        if data[:4] == b"PK\x03\x04":
            hint = " (it is a zip archive: a .keras model? convert it first with `lungedge convert`)"
        elif data[:8] == b"\x89HDF\r\n\x1a\n":
            hint = " (it is an HDF5 file: Keras weights, not a TFLite model)"
        raise ModelError(f"not a TFLite model (no TFL3 identifier): {name!r}{hint}; first bytes {head!r}")


def metadata_spans(data: bytes, names: Optional[Sequence[str]] = None, name: str = "<bytes>") -> Dict[str, Tuple[int, int]]:
    """Where each metadata entry's bytes are in ``data``: ``{entry name: (start, end)}``.

    Nothing is copied, so a table of thousands of entries costs only their names. With
    ``names``, only those entries are returned (the first of each name).

    Raises:
        ModelError: the table is damaged, points outside the file, or has more than
            ``MAX_METADATA_ENTRIES`` entries.
    """
    import flatbuffers
    from flatbuffers import number_types as N
    from flatbuffers.table import Table

    wanted = set(names) if names is not None else None
    try:
        pos = flatbuffers.encode.Get(flatbuffers.packer.uoffset, data, 0)
        model = Table(data, pos)
        spans: Dict[str, Tuple[int, int]] = {}
        meta_vec = _vector(model, _MODEL_METADATA)
        buf_vec = _vector(model, _MODEL_BUFFERS)
        if meta_vec is None:
            return spans
        start, count = meta_vec
        if count > MAX_METADATA_ENTRIES:
            raise ModelError(f"model metadata table has {count} entries (limit {MAX_METADATA_ENTRIES}): {name!r}")
        for i in range(count):
            meta = Table(model.Bytes, model.Indirect(start + 4 * i))
            name_off = meta.Offset(4 + 2 * _METADATA_NAME)
            entry = meta.String(name_off + meta.Pos).decode("utf-8", "replace") if name_off else ""
            if entry in spans or (wanted is not None and entry not in wanted):
                continue
            buf_off = meta.Offset(4 + 2 * _METADATA_BUFFER)
            buf_index = meta.Get(N.Uint32Flags, buf_off + meta.Pos) if buf_off else 0
            spans[entry] = _buffer_span(model, buf_vec, buf_index, len(data), name)
        return spans
    except ModelError:
        raise
    except Exception as exc:  # a damaged flatbuffer can fail in many ways
        raise ModelError(f"model file is damaged: cannot read its metadata table ({type(exc).__name__}): {name!r}") from None


def read_metadata_entries(data: bytes, names: Optional[Sequence[str]] = None, name: str = "<bytes>") -> Dict[str, bytes]:
    """The entries of the flatbuffer's metadata table as ``{name: bytes}`` (only ``names`` if given)."""
    return {k: bytes(data[a:b]) for k, (a, b) in metadata_spans(data, names, name).items()}


def _vector(table, slot: int):
    off = table.Offset(4 + 2 * slot)
    if not off:
        return None
    return table.Vector(off), table.VectorLen(off)


def _buffer_span(model, buf_vec, index: int, size: int, name: str) -> Tuple[int, int]:
    from flatbuffers import number_types as N
    from flatbuffers.table import Table

    if buf_vec is None or index >= buf_vec[1]:
        raise ModelError(f"model metadata points at buffer {index}, which does not exist: {name!r}")
    buf = Table(model.Bytes, model.Indirect(buf_vec[0] + 4 * index))
    off = buf.Offset(4 + 2 * _BUFFER_DATA)
    if off:
        start, length = buf.Vector(off), buf.VectorLen(off)
    else:
        off_o, off_s = buf.Offset(4 + 2 * _BUFFER_OFFSET), buf.Offset(4 + 2 * _BUFFER_SIZE)
        if not (off_o and off_s):
            return (0, 0)
        start = buf.Get(N.Uint64Flags, off_o + buf.Pos)  # large models keep buffers after the flatbuffer
        length = buf.Get(N.Uint64Flags, off_s + buf.Pos)
    if start < 0 or start + length > size:
        raise ModelError(f"model metadata points outside the file: {name!r}")
    return (start, start + length)


def read_spec(data: bytes, name: str = "<bytes>") -> Optional[ModelSpec]:
    """The model's ``lungedge`` record, or None for a model without one (third-party).

    Only that entry is read; it is checked for size, encoding, JSON nesting and every field's
    type and value.

    Raises:
        ModelError: the record is damaged or invalid (the message names the file).
    """
    spans = metadata_spans(data, (METADATA_NAME,), name)
    if METADATA_NAME not in spans:
        return None
    a, b = spans[METADATA_NAME]
    if b - a > MAX_RECORD_BYTES:
        raise ModelError(f"the model's lungedge metadata is too large ({(b - a) / 2**20:.1f} MiB, limit "
                         f"{MAX_RECORD_BYTES / 2**20:.0f} MiB): {name!r}")
    try:
        text = bytes(data[a:b]).decode("utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"the model's lungedge metadata is not UTF-8 text: {name!r}") from None
    try:
        return ModelSpec.from_json(text)
    except ConfigError as exc:
        raise ModelError(f"the model's lungedge metadata is invalid ({exc}): {name!r}") from None
    except RecursionError:
        raise ModelError(f"the model's lungedge metadata is invalid (JSON nested too deeply): {name!r}") from None


def read_spec_from_file(path: PathLike) -> Optional[ModelSpec]:
    return read_spec(read_model_bytes(path), str(path))


@dataclass(frozen=True)
class Integrity:
    """The outcome of checking a file's integrity record.

    ``status`` is ``"verified"`` (the record matches every other byte of the file) or
    ``"absent"`` (no record: converted before records existed, or by another tool).
    ``file_sha256`` is the sha256 of the whole file, computed in the same pass.
    """

    status: str
    file_sha256: str
    digest: Optional[str] = None


def verify_integrity(data: bytes, name: str = "<bytes>") -> Integrity:
    """Check the ``lungedge.integrity`` record of ``data``, if it has one.

    One pass of sha256 over the file gives both the record's digest (every byte except the
    record's own) and the whole file's hash.

    Raises:
        ModelError: the record is damaged, or the file does not match it (changed after
            conversion: a damaged card, an edit); the message names the file.
    """
    spans = metadata_spans(data, (INTEGRITY_NAME,), name)
    view = memoryview(data)
    if INTEGRITY_NAME not in spans:
        return Integrity("absent", hashlib.sha256(view).hexdigest())
    a, b = spans[INTEGRITY_NAME]
    record = _parse_integrity(bytes(view[a:b]), name)
    h = hashlib.sha256(view[:a])
    whole = h.copy()
    whole.update(view[a:b])
    whole.update(view[b:])
    h.update(view[b:])
    if h.hexdigest() != record:
        raise ModelError(f"model file does not match its integrity record (changed or damaged since conversion): {name!r}")
    return Integrity("verified", whole.hexdigest(), record)


def _parse_integrity(payload: bytes, name: str) -> str:
    try:
        if len(payload) > 4096:
            raise ValueError("too large")
        rec = json.loads(payload.decode("utf-8"))
        if not isinstance(rec, dict) or rec.get("algorithm") != "sha256" or rec.get("schema") != INTEGRITY_SCHEMA:
            raise ValueError("unknown record")
        digest = rec.get("digest")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError("bad digest")
        return digest
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ModelError(f"the model's integrity record is damaged: {name!r}") from None


def _integrity_payload(digest: str) -> bytes:
    return json.dumps({"algorithm": "sha256", "covers": "every byte of the file except this record",
                       "digest": digest, "schema": INTEGRITY_SCHEMA}, sort_keys=True).encode("ascii")


def embed_spec(data: bytes, spec: ModelSpec) -> bytes:
    """Return a copy of the TFLite model ``data`` with ``spec`` stored as its metadata twice
    over, and an integrity record.

    - ``lungedge``: the project's own JSON record (``spec``);
    - ``TFLITE_METADATA``: the standard ``ModelMetadata`` that MediaPipe Tasks and the TFLite
      Task Library read (``edge_runtime.tflite_metadata``): image input with its colour space
      and normalisation, output with a labels file, description, version, author, licence with
      a not-a-medical-device note. The labels file is packed, as tflite-support does, in an
      uncompressed zip appended to the flatbuffer;
    - ``lungedge.integrity``: a sha256 of every byte of the result (appended zip included)
      except the record itself, so weights, graph, quantisation and both records are covered.

    Existing entries of those three names are replaced (their buffers are emptied) and an
    appended zip is dropped; the converter's own entries (``min_runtime_version``,
    ``CONVERSION_METADATA``) are kept. Identical numeric vectors are written once
    (``_sharing_builder``). Call it last: any later change to the bytes makes the file fail
    the check.
    """
    check_tflite_bytes(data)
    flatbuffers, np, schema = _writer_modules()
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    _drop_records(model, schema, (METADATA_NAME, INTEGRITY_NAME, STANDARD_NAME))
    payload = spec.to_json().encode("utf-8")
    standard = _standard_record(spec, model, schema)
    placeholder = np.frombuffer(_integrity_payload("0" * 64), np.uint8).copy()
    for entry_name, content in ((STANDARD_NAME, np.frombuffer(standard, np.uint8).copy()),
                                (METADATA_NAME, np.frombuffer(payload, np.uint8).copy()), (INTEGRITY_NAME, placeholder)):
        _add_record(model, schema, entry_name, content)
    builder = _sharing_builder(flatbuffers)(len(data) + len(payload) + len(standard) + 1024)
    # written first, the record lands at the end of the flatbuffer, just before the packed files
    builder.CreateNumpyVector(placeholder)
    builder.Finish(model.Pack(builder), file_identifier=_TFLITE_IDENTIFIER)
    out = _sealed(append_associated_files(bytes(builder.Output()), _associated_files(spec)))
    _check_round_trip(out, spec)
    return out


def _writer_modules():
    """(flatbuffers, numpy, the TFLite schema) for writing a model; MissingDependencyError without LiteRT."""
    try:
        import flatbuffers
        import numpy as np
        from ai_edge_litert import schema_py_generated as schema
    except ImportError as exc:  # pragma: no cover - depends on the install
        from .errors import MissingDependencyError

        raise MissingDependencyError(
            f"writing model metadata needs ai-edge-litert (pip install 'lungedge[edge]'): {exc}"
        ) from None
    return flatbuffers, np, schema


def _drop_records(model, schema, names: Sequence[str]) -> None:
    """Remove the metadata entries called ``names``; their buffers are emptied, indices kept."""
    old = [m for m in (model.metadata or []) if _name(m.name) in names]
    model.metadata = [m for m in (model.metadata or []) if _name(m.name) not in names]
    used = {t.buffer for g in (model.subgraphs or []) for t in (g.tensors or [])} | {m.buffer for m in model.metadata}
    for m in old:
        if m.buffer not in used and 0 < m.buffer < len(model.buffers):
            model.buffers[m.buffer] = schema.BufferT()


def _add_record(model, schema, name: str, content) -> None:
    """A metadata entry ``name`` holding ``content`` (uint8 array) in a new buffer."""
    buffer = schema.BufferT()
    buffer.data = content
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)


def _associated_files(spec: ModelSpec) -> Dict[str, bytes]:
    """The files packed after the flatbuffer: the labels, and the score calibration when there is one."""
    packed = {LABELS_FILE: ("\n".join(spec.labels) + "\n").encode("utf-8")}
    calibration = score_calibration_text(spec)
    if calibration is not None:
        packed[CALIBRATION_FILE] = calibration.encode("ascii")
    return packed


def _sealed(data: bytes) -> bytes:
    """``data`` with its integrity record's placeholder replaced by the digest of every other byte."""
    out = bytearray(data)
    a, b = metadata_spans(out, (INTEGRITY_NAME,))[INTEGRITY_NAME]
    view = memoryview(out)
    h = hashlib.sha256(view[:a])
    h.update(view[b:])
    record = _integrity_payload(h.hexdigest())
    if len(record) != b - a:  # pragma: no cover - the payload has a fixed length
        raise ModelError("integrity record changed length")
    del view
    out[a:b] = record
    return bytes(out)


def _check_round_trip(out: bytes, spec: ModelSpec) -> None:
    """Never write a file whose records cannot be read back."""
    if read_spec(out) != spec:
        raise ModelError("metadata did not survive the round trip through the flatbuffer")
    verify_integrity(out)
    standard_back = read_standard(out)
    if standard_back is None or standard_back.labels != spec.labels:
        raise ModelError("standard metadata did not survive the round trip through the flatbuffer")


#: The licence text of the standard record: what a third-party app shows about the model.
STANDARD_LICENSE = ("lungedge code: Apache-2.0; the weights carry the licences of their training data and "
                    "pretrained weights (see the model card). NOT A MEDICAL DEVICE: for research and "
                    "engineering only, not for diagnosis, screening or treatment.")


def _standard_record(spec: ModelSpec, model, schema) -> bytes:
    """The ``TFLITE_METADATA`` flatbuffer for ``spec`` and the model's input tensor type."""
    graph = model.subgraphs[0]
    tensor = graph.tensors[graph.inputs[0]]
    p = spec.preprocessing
    types = schema.TensorType
    if tensor.type == types.UINT8:
        input_range = (0.0, 255.0)
    elif tensor.type == types.INT8:
        input_range = (-128.0, 127.0)
    else:
        input_range = ((0.0 - p.mean[0]) / p.std[0], (255.0 - p.mean[0]) / p.std[0])
    threshold = spec.threshold
    decision = (f" lungedge applies a decision threshold ({threshold.label} if p >= {threshold.value:.4f}); "
                "readers of this record see the scores only." if threshold else "")
    if p.contrast_text:
        decision += f" Apply {p.contrast_text} to the resized image before the model, as lungedge does."
    if spec.domain is not None:
        decision += (f" Out of domain (no class should be given) when output domain_score > "
                     f"{spec.domain.threshold:.4g}.")
    version = spec.versions.get("lungedge") if isinstance(spec.versions, dict) else None
    return build_standard_metadata(
        name=f"lungedge {spec.recipe or 'image'} classifier",
        description=(f"Image classifier ({', '.join(spec.labels)[:400]}); recipe {spec.recipe or 'unknown'}, "
                     f"variant {spec.variant or 'unknown'}.{decision} Not a medical device."),
        version=(f"variant {spec.variant or 'unknown'}; source model sha256 {(spec.source_model_sha256 or 'unknown')[:16]}; "
                 f"lungedge {version or 'unknown'}"),
        author="lungedge",
        license=STANDARD_LICENSE,
        color_space="RGB" if p.color_mode == "rgb" else "GRAYSCALE",
        mean=p.mean, std=p.std, input_range=input_range,
        output_range=(0.0, 1.0) if spec.output == "probabilities" else None,
        score_calibration=score_calibration_text(spec) is not None,
        extra_outputs=[("domain_score", _DOMAIN_DESCRIPTION)] if len(graph.outputs) == 2 else [],
    )


#: The standard record's words for the domain score output (``edge_runtime.domain``).
_DOMAIN_DESCRIPTION = ("Domain score: how unlike the training images the input is (Mahalanobis distance of the "
                       "model's features, about 1 for training-like images). lungedge refuses an image whose score "
                       "is above the threshold in the lungedge record; apps should too.")


def score_calibration_text(spec: ModelSpec) -> Optional[str]:
    """The standard record's score calibration file for a two-class file whose output is centred
    logits (``extra["conversion"]["logits"] == "centred"``, written by ``convert``), else None.

    Centred, the two logits are +d/2 and -d/2 with d the log-odds, so each class's probability,
    softmax(z / T), is the sigmoid of its own score alone: ``1 / (1 + exp(-(2 / T) * z_c))``, one
    line ``scale,slope,offset`` = ``1,2/T,0`` per class. MediaPipe Tasks and the Task Library then
    report the probabilities lungedge computes, temperature (site recalibration) included.
    """
    conversion = spec.extra.get("conversion") if isinstance(spec.extra, dict) else None
    if (spec.output != "logits" or spec.num_classes != 2 or not isinstance(conversion, dict)
            or conversion.get("logits") != "centred"):
        return None
    # one line per class and no trailing newline: MediaPipe counts an empty last line as a class
    return "\n".join(f"1.0,{2.0 / spec.temperature!r},0.0" for _ in spec.labels)


def read_standard(data: bytes, name: str = "<bytes>") -> Optional[StandardMetadata]:
    """The model's standard ``TFLITE_METADATA`` record with its packed labels, or None.

    Raises:
        ModelError: the record or its labels file is damaged (the message names the file).
    """
    spans = metadata_spans(data, (STANDARD_NAME,), name)
    if STANDARD_NAME not in spans:
        return None
    a, b = spans[STANDARD_NAME]
    return parse_standard_metadata(bytes(data[a:b]), data, name)


def _sharing_builder(flatbuffers):
    """A flatbuffers ``Builder`` that writes each distinct numeric vector once.

    Flatbuffer tables refer to vectors by offset, so identical vectors can be shared. A
    per-channel int8 model has two all-zero zero-point vectors (int64) per layer, one for the
    weights and one for the bias: shared, they stop costing 16 bytes per channel (about 0.27 MB
    of a MobileNetV2). Readers see the same values.
    """

    class SharingBuilder(flatbuffers.Builder):
        def __init__(self, size: int):
            super().__init__(size)
            self._shared: Dict[tuple, int] = {}

        def CreateNumpyVector(self, x):  # noqa: N802 - flatbuffers' name
            key = (x.dtype.str, x.shape, x.tobytes())
            if key not in self._shared:
                self._shared[key] = super().CreateNumpyVector(x)
            return self._shared[key]

    return SharingBuilder


def _name(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else (value or "")

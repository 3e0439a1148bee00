"""Read and write the ``lungedge`` metadata record inside a ``.tflite`` flatbuffer.

Reading needs only the ``flatbuffers`` package (a few table look-ups, no TensorFlow, no
schema code), so it works with LiteRT and with tflite-runtime alike. Writing uses the TFLite
schema's object API shipped by ``ai_edge_litert`` and is done at conversion time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Union

from .errors import ModelError
from .spec import ModelSpec

METADATA_NAME = "lungedge"
_TFLITE_IDENTIFIER = b"TFL3"

# Field slots of the TFLite schema tables we read (schema.fbs field order).
_MODEL_BUFFERS, _MODEL_METADATA = 4, 6
_METADATA_NAME, _METADATA_BUFFER = 0, 1
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2

PathLike = Union[str, "os.PathLike[str]"]


def read_model_bytes(path: PathLike) -> bytes:
    """Read a model file, checking that it is a TFLite flatbuffer.

    Raises:
        ModelError: missing, unreadable, empty or not a TFLite file.
    """
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file not found: {str(p)!r}")
    if p.is_dir():
        raise ModelError(f"model path is a folder, expected a .tflite file: {str(p)!r}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model file {str(p)!r}: {exc.strerror or exc}") from None
    check_tflite_bytes(data, str(p))
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


def read_metadata_entries(data: bytes) -> Dict[str, bytes]:
    """Return every entry of the flatbuffer's metadata table as ``{name: bytes}``."""
    import flatbuffers
    from flatbuffers import number_types as N
    from flatbuffers.table import Table

    try:
        pos = flatbuffers.encode.Get(flatbuffers.packer.uoffset, data, 0)
        model = Table(data if isinstance(data, bytearray) else bytearray(data), pos)
        entries: Dict[str, bytes] = {}
        meta_vec = _vector(model, _MODEL_METADATA)
        buf_vec = _vector(model, _MODEL_BUFFERS)
        if meta_vec is None:
            return entries
        start, count = meta_vec
        for i in range(count):
            meta = Table(model.Bytes, model.Indirect(start + 4 * i))
            name_off = meta.Offset(4 + 2 * _METADATA_NAME)
            name = meta.String(name_off + meta.Pos).decode("utf-8") if name_off else ""
            buf_off = meta.Offset(4 + 2 * _METADATA_BUFFER)
            buf_index = meta.Get(N.Uint32Flags, buf_off + meta.Pos) if buf_off else 0
            entries[name] = _buffer_bytes(model, buf_vec, buf_index, data)
        return entries
    except ModelError:
        raise
    except Exception as exc:  # a damaged flatbuffer can fail in many ways
        raise ModelError(f"model file is damaged: cannot read its metadata table ({type(exc).__name__})") from None


def _vector(table, slot: int):
    off = table.Offset(4 + 2 * slot)
    if not off:
        return None
    return table.Vector(off), table.VectorLen(off)


def _buffer_bytes(model, buf_vec, index: int, data: bytes) -> bytes:
    from flatbuffers import number_types as N
    from flatbuffers.table import Table

    if buf_vec is None or index >= buf_vec[1]:
        raise ModelError(f"model metadata points at buffer {index}, which does not exist")
    buf = Table(model.Bytes, model.Indirect(buf_vec[0] + 4 * index))
    off = buf.Offset(4 + 2 * _BUFFER_DATA)
    if off:
        start, length = buf.Vector(off), buf.VectorLen(off)
        return bytes(model.Bytes[start:start + length])
    off_o, off_s = buf.Offset(4 + 2 * _BUFFER_OFFSET), buf.Offset(4 + 2 * _BUFFER_SIZE)
    if off_o and off_s:  # large models keep buffers after the flatbuffer
        o = buf.Get(N.Uint64Flags, off_o + buf.Pos)
        s = buf.Get(N.Uint64Flags, off_s + buf.Pos)
        return bytes(data[o:o + s])
    return b""


def read_spec(data: bytes) -> Optional[ModelSpec]:
    """The model's ``lungedge`` record, or None for a model without one (third-party)."""
    raw = read_metadata_entries(data).get(METADATA_NAME)
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelError("the model's lungedge metadata is not UTF-8 text") from None
    return ModelSpec.from_json(text)


def read_spec_from_file(path: PathLike) -> Optional[ModelSpec]:
    return read_spec(read_model_bytes(path))


def embed_spec(data: bytes, spec: ModelSpec) -> bytes:
    """Return a copy of the TFLite model ``data`` with ``spec`` stored as its metadata.

    An existing ``lungedge`` entry is replaced; the converter's own entries
    (``min_runtime_version``, ``CONVERSION_METADATA``) are kept.
    """
    check_tflite_bytes(data)
    try:
        import flatbuffers
        from ai_edge_litert import schema_py_generated as schema
    except ImportError as exc:  # pragma: no cover - depends on the install
        from .errors import MissingDependencyError

        raise MissingDependencyError(
            f"writing model metadata needs ai-edge-litert (pip install 'lungedge[edge]'): {exc}"
        ) from None
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    payload = spec.to_json().encode("utf-8")
    model.metadata = [m for m in (model.metadata or []) if _name(m.name) != METADATA_NAME]
    buffer = schema.BufferT()
    buffer.data = list(payload)  # object API packs lists of ints into a uint8 vector
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)
    builder = _sharing_builder(flatbuffers)(len(data) + len(payload) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=_TFLITE_IDENTIFIER)
    out = bytes(builder.Output())
    if read_spec(out) != spec:  # never write a file whose record cannot be read back
        raise ModelError("metadata did not survive the round trip through the flatbuffer")
    return out


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

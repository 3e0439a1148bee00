"""The standard TFLite metadata (``TFLITE_METADATA``): written at conversion, read on the device.

MediaPipe Tasks, the TFLite Task Library and Android Studio's model binding read an image
classifier's labels and normalisation from a ``ModelMetadata`` flatbuffer (file identifier
``M001``, schema ``metadata_schema.fbs`` of tflite-support) stored in the model's metadata
table under ``TFLITE_METADATA``, and its associated files (the labels) from a zip archive
appended to the model file. This module writes and reads both with the ``flatbuffers``
package and ``zipfile`` only: no tflite-support (whose writer re-packs the model without
sharing identical vectors, so an int8 file grows by about 15 %), no TensorFlow.

Only the part of the schema an image classifier uses is written: model name, description,
version, author, licence; the input's ``ImageProperties`` (colour space), a
``NormalizationOptions`` process unit and value ``Stats``; the output's ``FeatureProperties``,
``Stats`` and a ``TENSOR_AXIS_LABELS`` file. All of it exists since metadata parser 1.0.0.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import ModelError

STANDARD_NAME = "TFLITE_METADATA"
FILE_IDENTIFIER = b"M001"
MIN_PARSER_VERSION = "1.0.0"
LABELS_FILE = "labels.txt"
#: The score calibration parameters of a binary logits output (``TENSOR_AXIS_SCORE_CALIBRATION``).
CALIBRATION_FILE = "score_calibration.txt"
#: Refuse a standard metadata buffer or an associated labels file larger than this.
MAX_STANDARD_BYTES = 4 * 2**20
MAX_LABELS = 100_000

# enums of metadata_schema.fbs
_COLOR_SPACES = {0: "UNKNOWN", 1: "RGB", 2: "GRAYSCALE"}
_FILE_TYPES = {0: "UNKNOWN", 1: "DESCRIPTIONS", 2: "TENSOR_AXIS_LABELS", 3: "TENSOR_VALUE_LABELS",
               4: "TENSOR_AXIS_SCORE_CALIBRATION", 5: "VOCABULARY", 6: "SCANN_INDEX_FILE"}
_TENSOR_AXIS_LABELS = 2
_CONTENT_FEATURE, _CONTENT_IMAGE = 1, 2
_UNIT_NORMALIZATION, _UNIT_SCORE_CALIBRATION = 1, 2
_TENSOR_AXIS_SCORE_CALIBRATION = 4
_SCORE_IDENTITY = 0

# field slots (declaration order in metadata_schema.fbs)
_MM_NAME, _MM_DESCRIPTION, _MM_VERSION, _MM_SUBGRAPHS, _MM_AUTHOR, _MM_LICENSE, _MM_FILES, _MM_MIN_PARSER = range(8)
_SG_INPUTS, _SG_OUTPUTS = 2, 3
_TM_NAME, _TM_DESCRIPTION, _TM_CONTENT, _TM_UNITS, _TM_STATS, _TM_FILES = 0, 1, 3, 4, 5, 6
_CT_TYPE, _CT_PROPS = 0, 1
_PU_TYPE, _PU_OPTIONS = 0, 1
_AF_NAME, _AF_DESCRIPTION, _AF_TYPE = 0, 1, 2


@dataclass(frozen=True)
class AssociatedFile:
    name: str
    type: str
    description: str = ""


@dataclass(frozen=True)
class TensorInfo:
    """What the standard metadata says about one tensor."""

    name: str = ""
    description: str = ""
    color_space: Optional[str] = None          # input images: RGB, GRAYSCALE or UNKNOWN
    mean: Optional[Tuple[float, ...]] = None   # NormalizationOptions
    std: Optional[Tuple[float, ...]] = None
    stats_min: Tuple[float, ...] = ()
    stats_max: Tuple[float, ...] = ()
    files: Tuple[AssociatedFile, ...] = ()

    def labels_file(self) -> Optional[str]:
        return next((f.name for f in self.files if f.type == "TENSOR_AXIS_LABELS"), None)


@dataclass(frozen=True)
class StandardMetadata:
    """The parts of a ``TFLITE_METADATA`` record an image classifier needs.

    ``labels`` are read from the output's ``TENSOR_AXIS_LABELS`` file inside the model's
    appended zip (None when there is none); ``packed_files`` lists that zip's members.
    """

    name: str = ""
    description: str = ""
    version: str = ""
    author: str = ""
    license: str = ""
    min_parser_version: str = ""
    inputs: Tuple[TensorInfo, ...] = ()
    outputs: Tuple[TensorInfo, ...] = ()
    labels: Optional[Tuple[str, ...]] = None
    packed_files: Tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["labels"] = list(self.labels) if self.labels is not None else None
        return d


# ---- writing ---------------------------------------------------------------------------
def build_standard_metadata(*, name: str, description: str, version: str, author: str, license: str,
                            color_space: str, mean: Sequence[float], std: Sequence[float],
                            input_range: Tuple[float, float], output_range: Optional[Tuple[float, float]],
                            labels_file: str = LABELS_FILE, input_name: str = "image",
                            output_name: str = "probability", score_calibration: bool = False,
                            extra_outputs: Sequence[Tuple[str, str]] = ()) -> bytes:
    """A ``ModelMetadata`` flatbuffer (identifier ``M001``) for a one-input image classifier.

    Args:
        color_space: ``RGB`` or ``GRAYSCALE``.
        mean, std: the input's normalisation, ``(pixel - mean) / std``.
        input_range, output_range: (min, max) of the tensors' values (``Stats``; none for an
            output of logits).
        labels_file: name of the ``TENSOR_AXIS_LABELS`` file of the output (packed separately
            with ``append_associated_files``).
        score_calibration: the output is a score that readers turn into a probability with the
            ``ScoreCalibrationOptions`` process unit (identity transform) and the per-class
            ``scale,slope,offset`` lines of ``CALIBRATION_FILE`` (``TENSOR_AXIS_SCORE_CALIBRATION``,
            packed separately): MediaPipe Tasks and the Task Library then report
            ``scale / (1 + exp(-(slope * score + offset)))``.
        extra_outputs: (name, description) of each output after the classes (a feature without
            labels: MediaPipe reports it as a further classification head), e.g. ``domain_score``.
    """
    color = {v: k for k, v in _COLOR_SPACES.items()}[color_space]
    w = _Writer()
    in_tensor = _input_tensor(w, color, mean, std, input_range, input_name)
    out_tensor = _output_tensor(w, output_range, labels_file, output_name, score_calibration)
    more = [_feature_tensor(w, extra_name, extra_desc) for extra_name, extra_desc in extra_outputs]
    ins, outs = w.tables([in_tensor]), w.tables([out_tensor] + more)
    subgraph = w.table(10, ("off", _SG_INPUTS, ins), ("off", _SG_OUTPUTS, outs))  # SubGraphMetadata
    subgraphs = w.tables([subgraph])
    fields = [w.string(x) for x in (name, description, version, author, license, MIN_PARSER_VERSION)]
    slots = (_MM_NAME, _MM_DESCRIPTION, _MM_VERSION, _MM_AUTHOR, _MM_LICENSE, _MM_MIN_PARSER)
    root = w.table(8, *[("off", slot, off) for slot, off in zip(slots, fields)],  # ModelMetadata
                   ("off", _MM_SUBGRAPHS, subgraphs))
    w.builder.Finish(root, file_identifier=FILE_IDENTIFIER)
    return bytes(w.builder.Output())


class _Writer:
    """A flatbuffers builder with the few shapes the metadata schema needs. Objects are written
    children first; the order of calls is the order of the bytes."""

    _PREPEND = {"off": ("PrependUOffsetTRelativeSlot", 0), "u8": ("PrependUint8Slot", 0),
                "i8": ("PrependInt8Slot", 0), "f32": ("PrependFloat32Slot", 0.0)}

    def __init__(self, size: int = 1024):
        import flatbuffers

        self.builder = flatbuffers.Builder(size)

    def string(self, text: str) -> int:
        return self.builder.CreateString(text)

    def floats(self, values) -> int:
        b = self.builder
        b.StartVector(4, len(values), 4)
        for v in reversed(list(values)):
            b.PrependFloat32(float(v))
        return b.EndVector()

    def tables(self, offsets) -> int:
        b = self.builder
        b.StartVector(4, len(offsets), 4)
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()

    def table(self, slots: int, *fields) -> int:
        """An object of ``slots`` fields; each field ``(kind, slot, value)`` with kind "off"
        (a child's offset), "u8", "i8" or "f32", written in the order given."""
        b = self.builder
        b.StartObject(slots)
        for kind, slot, value in fields:
            method, default = self._PREPEND[kind]
            getattr(b, method)(slot, value, default)
        return b.EndObject()

    def stats(self, lo: float, hi: float) -> int:
        mx, mn = self.floats([hi]), self.floats([lo])
        return self.table(2, ("off", 0, mx), ("off", 1, mn))

    def associated_file(self, name: str, description: str, file_type: int) -> int:
        f_name, f_desc = self.string(name), self.string(description)
        return self.table(5, ("off", _AF_NAME, f_name), ("off", _AF_DESCRIPTION, f_desc), ("i8", _AF_TYPE, file_type))

    def feature_content(self) -> int:
        feature = self.table(0)  # FeatureProperties
        return self.table(3, ("u8", _CT_TYPE, _CONTENT_FEATURE), ("off", _CT_PROPS, feature))


def _input_tensor(w: _Writer, color: int, mean, std, input_range, input_name: str) -> int:
    """The input's TensorMetadata: ImageProperties, NormalizationOptions, Stats."""
    image_props = w.table(2, ("i8", 0, color))
    content = w.table(3, ("u8", _CT_TYPE, _CONTENT_IMAGE), ("off", _CT_PROPS, image_props))
    m_vec, s_vec = w.floats(mean), w.floats(std)
    norm = w.table(2, ("off", 0, m_vec), ("off", 1, s_vec))  # NormalizationOptions
    unit = w.table(2, ("u8", _PU_TYPE, _UNIT_NORMALIZATION), ("off", _PU_OPTIONS, norm))  # ProcessUnit
    units = w.tables([unit])
    in_stats = w.stats(*input_range)
    in_name, in_desc = w.string(input_name), w.string("Input image to be classified.")
    return w.table(7, ("off", _TM_NAME, in_name), ("off", _TM_DESCRIPTION, in_desc), ("off", _TM_CONTENT, content),
                   ("off", _TM_UNITS, units), ("off", _TM_STATS, in_stats))


def _output_tensor(w: _Writer, output_range, labels_file: str, output_name: str, score_calibration: bool) -> int:
    """The class output's TensorMetadata: FeatureProperties, Stats, the labels file (and the
    score calibration file and unit when asked)."""
    content = w.feature_content()
    out_stats = w.stats(*output_range) if output_range else None
    out_files = [w.associated_file(labels_file, "Labels for the classes the model can recognize.", _TENSOR_AXIS_LABELS)]
    out_units = None
    if score_calibration:
        out_files.append(w.associated_file(CALIBRATION_FILE, "Per class scale,slope,offset: the sigmoid that turns "
                                           "the output score into the class probability.", _TENSOR_AXIS_SCORE_CALIBRATION))
        calibration = w.table(2, ("i8", 0, _SCORE_IDENTITY), ("f32", 1, 0.0))  # ScoreCalibrationOptions
        out_units = w.tables([w.table(2, ("u8", _PU_TYPE, _UNIT_SCORE_CALIBRATION), ("off", _PU_OPTIONS, calibration))])
    files = w.tables(out_files)
    out_name = w.string(output_name)
    out_desc = w.string("Scores of the labels (centred logits); the score calibration turns them into probabilities."
                        if score_calibration else "Probabilities of the labels respectively.")
    fields = [("off", _TM_NAME, out_name), ("off", _TM_DESCRIPTION, out_desc), ("off", _TM_CONTENT, content)]
    if out_units is not None:
        fields.append(("off", _TM_UNITS, out_units))
    if out_stats is not None:
        fields.append(("off", _TM_STATS, out_stats))
    fields.append(("off", _TM_FILES, files))
    return w.table(7, *fields)


def _feature_tensor(w: _Writer, name: str, description: str) -> int:
    """An output after the classes: a feature without labels (e.g. ``domain_score``)."""
    content = w.feature_content()
    n_off, d_off = w.string(name), w.string(description)
    return w.table(7, ("off", _TM_NAME, n_off), ("off", _TM_DESCRIPTION, d_off), ("off", _TM_CONTENT, content))


def append_associated_files(model: bytes, files: Dict[str, bytes]) -> bytes:
    """``model`` with ``files`` appended as an uncompressed zip archive, the way tflite-support's
    ``MetadataPopulator`` packs associated files (readers open the model file as a zip).

    Entries carry a fixed timestamp so that the same model gives the same bytes.
    """
    buf = io.BytesIO(model)
    buf.seek(0, io.SEEK_END)
    with zipfile.ZipFile(buf, "a", compression=zipfile.ZIP_STORED) as zf:
        for name, content in files.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, content)
    return buf.getvalue()


# ---- reading ---------------------------------------------------------------------------
def parse_standard_metadata(buf: bytes, model: bytes = b"", name: str = "<bytes>") -> StandardMetadata:
    """Read a ``TFLITE_METADATA`` buffer; the labels come from ``model``'s appended zip.

    Raises:
        ModelError: the buffer is not a ``ModelMetadata`` flatbuffer, is damaged, or its labels
            file is missing from the model or unreadable; the message names the file.
    """
    if len(buf) > MAX_STANDARD_BYTES:
        raise ModelError(f"the model's {STANDARD_NAME} is too large ({len(buf)} bytes): {name!r}")
    if len(buf) < 8 or buf[4:8] != FILE_IDENTIFIER:
        raise ModelError(f"the model's {STANDARD_NAME} is not a metadata flatbuffer (no M001 identifier): {name!r}")
    try:
        meta = _parse(bytes(buf))
    except ModelError:
        raise
    except Exception as exc:  # a damaged flatbuffer can fail in many ways
        raise ModelError(f"the model's {STANDARD_NAME} is damaged ({type(exc).__name__}): {name!r}") from None
    packed = packed_files(model)
    labels = None
    label_file = meta.outputs[0].labels_file() if meta.outputs else None
    if label_file is not None:
        if label_file not in packed:
            raise ModelError(f"the model's {STANDARD_NAME} names the labels file {label_file!r}, which is not "
                             f"packed in the model: {name!r}")
        labels = tuple(_labels_from_zip(model, label_file, name))
    return dataclasses.replace(meta, labels=labels, packed_files=tuple(packed))


def packed_files(model: bytes) -> List[str]:
    """Names of the files packed in the zip appended to ``model`` (empty when there is none)."""
    if not model or b"PK\x05\x06" not in model[-(1 << 16) - 22:]:
        return []
    try:
        with zipfile.ZipFile(io.BytesIO(model)) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return []


def _labels_from_zip(model: bytes, member: str, name: str) -> List[str]:
    try:
        with zipfile.ZipFile(io.BytesIO(model)) as zf:
            info = zf.getinfo(member)
            if info.file_size > MAX_STANDARD_BYTES:
                raise ModelError(f"the model's labels file {member!r} is too large ({info.file_size} bytes): {name!r}")
            text = zf.read(member).decode("utf-8")
    except ModelError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError, NotImplementedError, RuntimeError):
        raise ModelError(f"the model's labels file {member!r} cannot be read from its packed files: {name!r}") from None
    labels = [line.strip() for line in text.splitlines()]
    labels = [x for x in labels if x]
    if not labels or len(labels) > MAX_LABELS:
        raise ModelError(f"the model's labels file {member!r} has {len(labels)} labels: {name!r}")
    return labels


def _parse(buf: bytes) -> StandardMetadata:
    r = _Reader()
    root = r.root(buf)
    subgraphs = r.tables(root, _MM_SUBGRAPHS)
    inputs = tuple(_tensor_info(r, t) for t in r.tables(subgraphs[0], _SG_INPUTS)) if subgraphs else ()
    outputs = tuple(_tensor_info(r, t) for t in r.tables(subgraphs[0], _SG_OUTPUTS)) if subgraphs else ()
    return StandardMetadata(r.text(root, _MM_NAME), r.text(root, _MM_DESCRIPTION), r.text(root, _MM_VERSION),
                            r.text(root, _MM_AUTHOR), r.text(root, _MM_LICENSE), r.text(root, _MM_MIN_PARSER),
                            inputs, outputs)


class _Reader:
    """Fields of flatbuffers tables by slot, with limits on vector lengths."""

    def __init__(self):
        import flatbuffers
        from flatbuffers import number_types
        from flatbuffers.table import Table

        self._flatbuffers, self.N, self._Table = flatbuffers, number_types, Table

    def root(self, buf: bytes):
        """The buffer's root table."""
        return self._Table(buf, self._flatbuffers.encode.Get(self._flatbuffers.packer.uoffset, buf, 0))

    @staticmethod
    def off(t, slot: int) -> int:
        return t.Offset(4 + 2 * slot)

    def text(self, t, slot: int) -> str:
        o = self.off(t, slot)
        return t.String(o + t.Pos).decode("utf-8", "replace") if o else ""

    def scalar(self, t, slot: int, flags, default=0):
        o = self.off(t, slot)
        return t.Get(flags, o + t.Pos) if o else default

    def table(self, t, slot: int):
        o = self.off(t, slot)
        return self._Table(t.Bytes, t.Indirect(o + t.Pos)) if o else None

    def tables(self, t, slot: int, limit: int = 1000) -> list:
        o = self.off(t, slot)
        if not o:
            return []
        start, n = t.Vector(o), t.VectorLen(o)
        if n > limit:
            raise ModelError(f"{n} entries in a metadata vector")
        return [self._Table(t.Bytes, t.Indirect(start + 4 * i)) for i in range(n)]

    def floats(self, t, slot: int, limit: int = 4096) -> Tuple[float, ...]:
        o = self.off(t, slot)
        if not o:
            return ()
        start, n = t.Vector(o), t.VectorLen(o)
        if n > limit:
            raise ModelError(f"{n} values in a metadata vector")
        return tuple(float(t.Get(self.N.Float32Flags, start + 4 * i)) for i in range(n))


def _tensor_info(r: _Reader, t) -> TensorInfo:
    """One TensorMetadata: colour space (images), normalisation, stats, associated files."""
    N = r.N
    color = None
    content = r.table(t, _TM_CONTENT)
    if content is not None and r.scalar(content, _CT_TYPE, N.Uint8Flags) == _CONTENT_IMAGE:
        props = r.table(content, _CT_PROPS)
        color = _COLOR_SPACES.get(r.scalar(props, 0, N.Int8Flags), "UNKNOWN") if props is not None else "UNKNOWN"
    mean = std = None
    for unit in r.tables(t, _TM_UNITS):
        if r.scalar(unit, _PU_TYPE, N.Uint8Flags) == _UNIT_NORMALIZATION:
            opts = r.table(unit, _PU_OPTIONS)
            if opts is not None:
                mean, std = r.floats(opts, 0), r.floats(opts, 1)
    stats = r.table(t, _TM_STATS)
    smax, smin = (r.floats(stats, 0), r.floats(stats, 1)) if stats is not None else ((), ())
    files = tuple(AssociatedFile(r.text(f, _AF_NAME), _FILE_TYPES.get(r.scalar(f, _AF_TYPE, N.Int8Flags), "UNKNOWN"),
                                 r.text(f, _AF_DESCRIPTION)) for f in r.tables(t, _TM_FILES))
    return TensorInfo(r.text(t, _TM_NAME), r.text(t, _TM_DESCRIPTION), color, mean, std, smin, smax, files)

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
    import flatbuffers

    color = {v: k for k, v in _COLOR_SPACES.items()}[color_space]
    b = flatbuffers.Builder(1024)

    def string(text):
        return b.CreateString(text)

    def floats(values):
        b.StartVector(4, len(values), 4)
        for v in reversed(list(values)):
            b.PrependFloat32(float(v))
        return b.EndVector()

    def tables(offsets):
        b.StartVector(4, len(offsets), 4)
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()

    def stats(lo, hi):
        mx, mn = floats([hi]), floats([lo])
        b.StartObject(2)
        b.PrependUOffsetTRelativeSlot(0, mx, 0)
        b.PrependUOffsetTRelativeSlot(1, mn, 0)
        return b.EndObject()

    # input tensor: ImageProperties + NormalizationOptions + Stats
    b.StartObject(2)  # ImageProperties
    b.PrependInt8Slot(0, color, 0)
    image_props = b.EndObject()
    b.StartObject(3)  # Content
    b.PrependUint8Slot(_CT_TYPE, _CONTENT_IMAGE, 0)
    b.PrependUOffsetTRelativeSlot(_CT_PROPS, image_props, 0)
    in_content = b.EndObject()
    m_vec, s_vec = floats(mean), floats(std)
    b.StartObject(2)  # NormalizationOptions
    b.PrependUOffsetTRelativeSlot(0, m_vec, 0)
    b.PrependUOffsetTRelativeSlot(1, s_vec, 0)
    norm = b.EndObject()
    b.StartObject(2)  # ProcessUnit
    b.PrependUint8Slot(_PU_TYPE, _UNIT_NORMALIZATION, 0)
    b.PrependUOffsetTRelativeSlot(_PU_OPTIONS, norm, 0)
    unit = b.EndObject()
    units = tables([unit])
    in_stats = stats(*input_range)
    in_name, in_desc = string(input_name), string("Input image to be classified.")
    b.StartObject(7)  # TensorMetadata
    b.PrependUOffsetTRelativeSlot(_TM_NAME, in_name, 0)
    b.PrependUOffsetTRelativeSlot(_TM_DESCRIPTION, in_desc, 0)
    b.PrependUOffsetTRelativeSlot(_TM_CONTENT, in_content, 0)
    b.PrependUOffsetTRelativeSlot(_TM_UNITS, units, 0)
    b.PrependUOffsetTRelativeSlot(_TM_STATS, in_stats, 0)
    in_tensor = b.EndObject()

    # output tensor: FeatureProperties + Stats + labels file
    b.StartObject(0)  # FeatureProperties
    feature = b.EndObject()
    b.StartObject(3)
    b.PrependUint8Slot(_CT_TYPE, _CONTENT_FEATURE, 0)
    b.PrependUOffsetTRelativeSlot(_CT_PROPS, feature, 0)
    out_content = b.EndObject()
    out_stats = stats(*output_range) if output_range else None
    f_name, f_desc = string(labels_file), string("Labels for the classes the model can recognize.")
    b.StartObject(5)  # AssociatedFile
    b.PrependUOffsetTRelativeSlot(_AF_NAME, f_name, 0)
    b.PrependUOffsetTRelativeSlot(_AF_DESCRIPTION, f_desc, 0)
    b.PrependInt8Slot(_AF_TYPE, _TENSOR_AXIS_LABELS, 0)
    label_file = b.EndObject()
    out_files, out_units = [label_file], None
    if score_calibration:
        c_name, c_desc = string(CALIBRATION_FILE), string("Per class scale,slope,offset: the sigmoid that turns "
                                                          "the output score into the class probability.")
        b.StartObject(5)
        b.PrependUOffsetTRelativeSlot(_AF_NAME, c_name, 0)
        b.PrependUOffsetTRelativeSlot(_AF_DESCRIPTION, c_desc, 0)
        b.PrependInt8Slot(_AF_TYPE, _TENSOR_AXIS_SCORE_CALIBRATION, 0)
        out_files.append(b.EndObject())
        b.StartObject(2)  # ScoreCalibrationOptions
        b.PrependInt8Slot(0, _SCORE_IDENTITY, 0)
        b.PrependFloat32Slot(1, 0.0, 0.0)
        calibration = b.EndObject()
        b.StartObject(2)  # ProcessUnit
        b.PrependUint8Slot(_PU_TYPE, _UNIT_SCORE_CALIBRATION, 0)
        b.PrependUOffsetTRelativeSlot(_PU_OPTIONS, calibration, 0)
        out_units = tables([b.EndObject()])
    files = tables(out_files)
    out_name = string(output_name)
    out_desc = string("Scores of the labels (centred logits); the score calibration turns them into probabilities."
                      if score_calibration else "Probabilities of the labels respectively.")
    b.StartObject(7)
    b.PrependUOffsetTRelativeSlot(_TM_NAME, out_name, 0)
    b.PrependUOffsetTRelativeSlot(_TM_DESCRIPTION, out_desc, 0)
    b.PrependUOffsetTRelativeSlot(_TM_CONTENT, out_content, 0)
    if out_units is not None:
        b.PrependUOffsetTRelativeSlot(_TM_UNITS, out_units, 0)
    if out_stats is not None:
        b.PrependUOffsetTRelativeSlot(_TM_STATS, out_stats, 0)
    b.PrependUOffsetTRelativeSlot(_TM_FILES, files, 0)
    out_tensor = b.EndObject()

    more = []
    for extra_name, extra_desc in extra_outputs:
        b.StartObject(0)
        props = b.EndObject()
        b.StartObject(3)
        b.PrependUint8Slot(_CT_TYPE, _CONTENT_FEATURE, 0)
        b.PrependUOffsetTRelativeSlot(_CT_PROPS, props, 0)
        content = b.EndObject()
        n_off, d_off = string(extra_name), string(extra_desc)
        b.StartObject(7)
        b.PrependUOffsetTRelativeSlot(_TM_NAME, n_off, 0)
        b.PrependUOffsetTRelativeSlot(_TM_DESCRIPTION, d_off, 0)
        b.PrependUOffsetTRelativeSlot(_TM_CONTENT, content, 0)
        more.append(b.EndObject())
    ins, outs = tables([in_tensor]), tables([out_tensor] + more)
    b.StartObject(10)  # SubGraphMetadata
    b.PrependUOffsetTRelativeSlot(_SG_INPUTS, ins, 0)
    b.PrependUOffsetTRelativeSlot(_SG_OUTPUTS, outs, 0)
    subgraph = b.EndObject()
    subgraphs = tables([subgraph])
    fields = [string(x) for x in (name, description, version, author, license, MIN_PARSER_VERSION)]
    b.StartObject(8)  # ModelMetadata
    for slot, off in zip((_MM_NAME, _MM_DESCRIPTION, _MM_VERSION, _MM_AUTHOR, _MM_LICENSE, _MM_MIN_PARSER), fields):
        b.PrependUOffsetTRelativeSlot(slot, off, 0)
    b.PrependUOffsetTRelativeSlot(_MM_SUBGRAPHS, subgraphs, 0)
    root = b.EndObject()
    b.Finish(root, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


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
    import flatbuffers
    from flatbuffers import number_types as N
    from flatbuffers.table import Table

    root = Table(buf, flatbuffers.encode.Get(flatbuffers.packer.uoffset, buf, 0))

    def off(t, slot):
        return t.Offset(4 + 2 * slot)

    def text(t, slot) -> str:
        o = off(t, slot)
        return t.String(o + t.Pos).decode("utf-8", "replace") if o else ""

    def scalar(t, slot, flags, default=0):
        o = off(t, slot)
        return t.Get(flags, o + t.Pos) if o else default

    def table(t, slot):
        o = off(t, slot)
        return Table(t.Bytes, t.Indirect(o + t.Pos)) if o else None

    def tables(t, slot, limit=1000):
        o = off(t, slot)
        if not o:
            return []
        start, n = t.Vector(o), t.VectorLen(o)
        if n > limit:
            raise ModelError(f"{n} entries in a metadata vector")
        return [Table(t.Bytes, t.Indirect(start + 4 * i)) for i in range(n)]

    def float_vec(t, slot, limit=4096) -> Tuple[float, ...]:
        o = off(t, slot)
        if not o:
            return ()
        start, n = t.Vector(o), t.VectorLen(o)
        if n > limit:
            raise ModelError(f"{n} values in a metadata vector")
        return tuple(float(t.Get(N.Float32Flags, start + 4 * i)) for i in range(n))

    def tensor(t) -> TensorInfo:
        color = None
        content = table(t, _TM_CONTENT)
        if content is not None and scalar(content, _CT_TYPE, N.Uint8Flags) == _CONTENT_IMAGE:
            props = table(content, _CT_PROPS)
            color = _COLOR_SPACES.get(scalar(props, 0, N.Int8Flags), "UNKNOWN") if props is not None else "UNKNOWN"
        mean = std = None
        for unit in tables(t, _TM_UNITS):
            if scalar(unit, _PU_TYPE, N.Uint8Flags) == _UNIT_NORMALIZATION:
                opts = table(unit, _PU_OPTIONS)
                if opts is not None:
                    mean, std = float_vec(opts, 0), float_vec(opts, 1)
        stats = table(t, _TM_STATS)
        smax, smin = (float_vec(stats, 0), float_vec(stats, 1)) if stats is not None else ((), ())
        files = tuple(AssociatedFile(text(f, _AF_NAME), _FILE_TYPES.get(scalar(f, _AF_TYPE, N.Int8Flags), "UNKNOWN"),
                                     text(f, _AF_DESCRIPTION)) for f in tables(t, _TM_FILES))
        return TensorInfo(text(t, _TM_NAME), text(t, _TM_DESCRIPTION), color, mean, std, smin, smax, files)

    subgraphs = tables(root, _MM_SUBGRAPHS)
    inputs = tuple(tensor(t) for t in tables(subgraphs[0], _SG_INPUTS)) if subgraphs else ()
    outputs = tuple(tensor(t) for t in tables(subgraphs[0], _SG_OUTPUTS)) if subgraphs else ()
    return StandardMetadata(text(root, _MM_NAME), text(root, _MM_DESCRIPTION), text(root, _MM_VERSION),
                            text(root, _MM_AUTHOR), text(root, _MM_LICENSE), text(root, _MM_MIN_PARSER),
                            inputs, outputs)

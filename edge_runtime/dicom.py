"""DICOM images in the one preprocessing path: pydicom (optional, the ``dicom`` extra) to pixels.

A file is DICOM when its content says so: the ``DICM`` marker at byte 128 of the Part 10 file
format (never its name; clinics' files often have none). The stored values go through the
display pipeline of DICOM PS3.3 C.11 that a reading station applies, so the model sees what a
reader sees:

1. the modality LUT (Rescale Slope/Intercept, or a Modality LUT Sequence);
2. the VOI transform: the first Window Center/Width (LINEAR, LINEAR_EXACT or SIGMOID), or a VOI
   LUT Sequence; without either, 8-bit data is shown as stored and deeper data from its own
   minimum to maximum (what viewers do by default);
3. MONOCHROME1 (and an INVERSE Presentation LUT Shape): inverted, so bone is bright as in
   MONOCHROME2 and in the JPEGs the models were trained on;

to 8-bit grey (or RGB for 8-bit colour data), which then goes through the same colour-mode and
resize steps as every other image (``edge_runtime.preprocess``).

Bad files are refused with one line: no pixel data, a transfer syntax with no decoder
installed, several frames, a size over the decode budget, an unsupported photometric
interpretation. Patient identifiers are read only into ``DicomInfo.phi`` and are left out of
``DicomInfo.to_dict()`` unless asked for (``keep_phi``); results name the file and the SOP
Instance UID. No TensorFlow; pydicom and its pixel-data handlers are imported only when a
DICOM file is met.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np

from .errors import ImageError

#: Offset and value of the DICOM Part 10 marker.
DICM_OFFSET, DICM_MAGIC = 128, b"DICM"

#: Modalities an X-ray model accepts (computed/digital radiography, radiographic imaging), and a CT model.
XRAY_MODALITIES = ("CR", "DX", "RG", "DR", "PX")
CT_MODALITIES = ("CT",)

#: What a model can be declared for (``Recipe.modality``, written to the record's
#: ``intended["modality"]``) -> the DICOM Modality values it takes. ``generated``: the demo's
#: radiograph-like images, standing in for an X-ray model.
MODALITIES = {"X-ray": XRAY_MODALITIES, "CT": CT_MODALITIES, "generated": XRAY_MODALITIES}
#: How records written before the declared values named them.
_RECORDED_AS = {"X-ray (CR/DX)": "X-ray", "generated images (the offline demo)": "generated"}

#: Attributes that identify a patient or a visit: never printed or written unless asked for.
PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "OtherPatientIDs",
                "AccessionNumber", "StudyDate", "StudyTime", "StudyID", "InstitutionName", "ReferringPhysicianName",
                "StudyInstanceUID", "SeriesInstanceUID")

INSTALL_HINT = "pip install 'lungedge[dicom]'"


def is_dicom(head: bytes) -> bool:
    """True when ``head`` (the first 132 or more bytes of a file) carries the DICOM Part 10 marker."""
    return len(head) >= DICM_OFFSET + 4 and head[DICM_OFFSET:DICM_OFFSET + 4] == DICM_MAGIC


@dataclass(frozen=True)
class DicomInfo:
    """What a result may say about a DICOM file (no patient data unless asked for)."""

    sop_instance_uid: str = ""
    modality: str = ""
    photometric: str = ""
    bits_stored: int = 0
    transfer_syntax: str = ""
    voi: str = ""  # how the grey levels were chosen: "window C/W", "VOI LUT", "as stored", "min-max"
    body_part: str = ""  # BodyPartExamined
    view_position: str = ""  # ViewPosition (PA, AP, LATERAL...)
    phi: dict = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self, keep_phi: bool = False) -> dict:
        d = {"sop_instance_uid": self.sop_instance_uid, "modality": self.modality,
             "photometric": self.photometric, "bits_stored": self.bits_stored,
             "transfer_syntax": self.transfer_syntax, "voi": self.voi, "body_part": self.body_part,
             "view_position": self.view_position}
        if keep_phi:
            d["phi"] = dict(self.phi)
        return d


def expected_modalities(intended: Optional[dict]) -> Optional[Tuple[str, ...]]:
    """The DICOM modalities a model is for, from the modality its record declares
    (``intended["modality"]``, one of ``MODALITIES``); None when it declares none (no check)."""
    given = (intended or {}).get("modality")
    if not isinstance(given, str):
        return None
    return MODALITIES.get(_RECORDED_AS.get(given, given))


def check_modality(info: DicomInfo, expected: Optional[Sequence[str]], name: str) -> None:
    """Raise ImageError when the file's Modality is not one the model is for.

    A file without a Modality attribute passes (secondary captures often lack one).
    """
    if not expected or not info.modality:
        return
    if info.modality.upper() not in expected:
        kind = "an X-ray" if tuple(expected) == XRAY_MODALITIES else "a CT" if tuple(expected) == CT_MODALITIES else "this"
        raise ImageError(f"DICOM modality {info.modality!r} is not what {kind} model is for "
                         f"(expects {', '.join(expected)}): {name!r}")


def read_dicom(fp: io.BufferedIOBase, name: str, max_pixels: int, max_decoded_bytes: int) -> Tuple[np.ndarray, DicomInfo]:
    """Decode one DICOM image to display pixels.

    Args:
        fp: the file, positioned at its start.
        name: how to name it in messages.
        max_pixels, max_decoded_bytes: the decode budget, checked on the header before any
            pixel data is decoded.

    Returns:
        (uint8 array (H, W) grey or (H, W, 3) RGB, DicomInfo).

    Raises:
        ImageError: pydicom is not installed, or the file cannot be used (one line naming it).
    """
    with warnings.catch_warnings():
        # pydicom warns about odd values by quoting them, and the values may be a patient's name
        warnings.simplefilter("ignore")
        return _read_dataset(_dcmread(fp, name), name, max_pixels, max_decoded_bytes)


def _dcmread(fp: io.BufferedIOBase, name: str, **kwargs):
    """``pydicom.dcmread`` with pydicom's own logging silenced and its errors as one ImageError line.

    Raises:
        ImageError: pydicom is not installed, or the file is not readable DICOM.
    """
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        raise ImageError(f"DICOM file, but pydicom is not installed ({INSTALL_HINT}): {name!r}") from None
    _quiet_pydicom()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(fp, **kwargs)
        except InvalidDicomError as exc:
            raise ImageError(f"not a readable DICOM file ({_first(exc)}): {name!r}") from None


def read_dicom_size(fp: io.BufferedIOBase, name: str) -> Tuple[int, int]:
    """(width, height) from a DICOM header, without decoding pixel data.

    Raises:
        ImageError: pydicom is not installed, or the header cannot be read.
    """
    ds = _dcmread(fp, name, stop_before_pixels=True)
    return _int(ds.get("Columns", 0)), _int(ds.get("Rows", 0))


def _quiet_pydicom() -> None:
    """pydicom's log lines can quote element values (patient data): keep them off the console."""
    log = logging.getLogger("pydicom")
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())
    log.propagate = False


def _read_dataset(ds, name: str, max_pixels: int, max_decoded_bytes: int) -> Tuple[np.ndarray, DicomInfo]:
    info = _info(ds)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError(f"DICOM file has no pixel data (a report, structured document or presentation "
                         f"state, not an image): {name!r}")
    frames = _int(ds.get("NumberOfFrames", 1), 1)
    if frames > 1:
        raise ImageError(f"multi-frame DICOM ({frames} frames); give a single-frame image: {name!r}")
    rows, cols = _int(ds.get("Rows", 0)), _int(ds.get("Columns", 0))
    samples = _int(ds.get("SamplesPerPixel", 1), 1)
    bits_alloc = _int(ds.get("BitsAllocated", 8), 8)
    if rows < 1 or cols < 1:
        raise ImageError(f"DICOM image has no pixels ({cols}x{rows}): {name!r}")
    if rows * cols > max_pixels:
        raise ImageError(f"DICOM image too large ({cols}x{rows}, limit {max_pixels / 1e6:.0f} MP): {name!r}")
    need = rows * cols * samples * max(bits_alloc, 8) // 8 * (2 if bits_alloc < 32 else 1)  # + float copy
    if need > max_decoded_bytes:
        raise ImageError(f"DICOM image too large to decode ({cols}x{rows}x{samples}, {bits_alloc}-bit, "
                         f"{need / 2**20:.0f} MiB, limit {max_decoded_bytes / 2**20:.0f} MiB): {name!r}")
    photometric = info.photometric
    if samples == 1 and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(f"DICOM photometric interpretation {photometric or 'missing'!r} is not supported "
                         f"(MONOCHROME1, MONOCHROME2 or RGB): {name!r}")
    if samples == 3 and bits_alloc != 8:
        raise ImageError(f"DICOM colour image with {bits_alloc}-bit samples is not supported: {name!r}")
    if samples not in (1, 3):
        raise ImageError(f"DICOM image with {samples} samples per pixel is not supported: {name!r}")
    _check_decoder(ds, name)
    try:
        stored = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        raise ImageError(f"cannot decode the DICOM pixel data ({info.transfer_syntax}: {_first(exc)}): {name!r}") from None
    if samples == 3:
        if stored.ndim != 3 or stored.shape[2] != 3:
            raise ImageError(f"DICOM colour image has shape {stored.shape}: {name!r}")
        return np.ascontiguousarray(stored, dtype=np.uint8), dataclasses.replace(info, voi="as stored")
    if stored.ndim != 2:
        raise ImageError(f"DICOM image has shape {stored.shape}, expected one grey frame: {name!r}")
    pixels, voi = _to_display(stored, ds)
    invert = photometric == "MONOCHROME1"
    if str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        invert = not invert
    if invert:
        pixels = 255 - pixels
    return pixels, dataclasses.replace(info, voi=voi)


def _info(ds) -> DicomInfo:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID", "") if meta is not None else ""
    ts_name = getattr(ts, "name", str(ts)) if ts else "unknown transfer syntax"
    phi = {}
    for kw in PHI_KEYWORDS:
        if kw in ds:
            phi[kw] = str(ds.get(kw, ""))
    return DicomInfo(sop_instance_uid=str(ds.get("SOPInstanceUID", "") or (meta.get("MediaStorageSOPInstanceUID", "")
                                                                            if meta is not None else "")),
                     modality=str(ds.get("Modality", "") or ""),
                     photometric=str(ds.get("PhotometricInterpretation", "") or "").strip().upper(),
                     bits_stored=_int(ds.get("BitsStored", ds.get("BitsAllocated", 0))),
                     transfer_syntax=ts_name, phi=phi, body_part=str(ds.get("BodyPartExamined", "") or ""),
                     view_position=str(ds.get("ViewPosition", "") or ""))


def _check_decoder(ds, name: str) -> None:
    """One line when the transfer syntax has no decoder here, naming what to install."""
    from pydicom.pixels import get_decoder

    uid = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
    if uid is None:
        return  # pydicom assumes implicit little endian
    label = f"{getattr(uid, 'name', uid)} ({uid})"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise ImageError(f"DICOM transfer syntax {label} is not supported (no pixel-data decoder exists for "
                         f"it in pydicom): {name!r}") from None
    if not decoder.is_available:
        raise ImageError(f"DICOM transfer syntax {label} needs a pixel-data handler that is not installed "
                         f"({INSTALL_HINT} brings the JPEG, JPEG-LS and JPEG 2000 ones): {name!r}")


def _to_display(stored: np.ndarray, ds) -> Tuple[np.ndarray, str]:
    """Modality LUT then VOI (window or LUT, else as stored / min-max) to uint8 grey."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(stored, ds)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        bits = _int(item.LUTDescriptor[2], 16) if "LUTDescriptor" in item else 16
        out = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float64)
        top = float(2 ** max(1, min(bits, 16)) - 1)
        return _to_uint8(out * (255.0 / top)), "VOI LUT"
    window = _window(ds)
    if window is not None:
        center, width, function = window
        return _to_uint8(_apply_window(values, center, width, function)), f"window {center:g}/{width:g}"
    bits = _int(ds.get("BitsStored", 8), 8)
    rescaled = any(k in ds for k in ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence"))
    if bits <= 8 and not rescaled and _int(ds.get("PixelRepresentation", 0)) == 0 and values.dtype.kind in "ui":
        return np.asarray(values, dtype=np.uint8).copy(), "as stored"
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.uint8), "min-max"
    return _to_uint8((values - lo) * (255.0 / (hi - lo))), "min-max"


def _window(ds) -> Optional[Tuple[float, float, str]]:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = _first_value(ds.WindowCenter), _first_value(ds.WindowWidth)
    if center is None or width is None or not np.isfinite(center) or not np.isfinite(width) or width <= 0:
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function == "LINEAR" and width < 1:
        return None  # PS3.3 C.11.2.1.2: a LINEAR width must be >= 1
    return float(center), float(width), function


def _apply_window(x: np.ndarray, c: float, w: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 and C.11.2.1.3, to the output range 0..255 (float)."""
    x = np.asarray(x, dtype=np.float64)
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if function == "LINEAR_EXACT":
        return np.clip(((x - c) / w + 0.5) * 255.0, 0.0, 255.0)
    return np.clip(((x - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0, 0.0, 255.0)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _first_value(v) -> Optional[float]:
    try:
        if isinstance(v, (list, tuple)) or (hasattr(v, "__len__") and not isinstance(v, (str, bytes))):
            v = v[0] if len(v) else None
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _int(v, default: int = 0) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def _first(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text[:120] or type(exc).__name__

"""DICOM files for tests, built with pydicom from 8-bit grey pixels.

Each file encodes the same picture in a different way (8 or 12-bit stored, MONOCHROME1 or 2,
a window, a rescale, a compressed transfer syntax) such that a correct display pipeline gives
back the original 8-bit pixels exactly; the tests then compare predictions with the JPEG's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

#: Made-up patient data; a test checks none of it reaches the output unless --keep-phi.
FAKE_PATIENT = {"PatientName": "Testperson^Alice", "PatientID": "PID-73519", "PatientBirthDate": "19700101",
                "AccessionNumber": "ACC-99120"}


def make_dicom(pixels: np.ndarray, path: Path, *, photometric: str = "MONOCHROME2", bits: int = 8,
               syntax: Optional[str] = None, modality: str = "DX", window: bool = True,
               rescale_intercept: float = 0.0, pixel_data: bool = True, frames: int = 1,
               uid_suffix: str = "1") -> Path:
    """Write ``pixels`` (uint8 H x W) as a DICOM file; returns ``path``.

    bits=8 stores the values; bits=12 stores value*16 (+ ``-rescale_intercept``) in 16-bit words
    with a LINEAR window (centre 2040.5, width 4081) that maps them back to 0..255 exactly.
    MONOCHROME1 stores the inverted values. ``syntax`` is a transfer syntax UID (default
    Explicit VR Little Endian); a compressed one is encoded by pydicom (RLE natively, JPEG 2000
    through pylibjpeg-openjpeg).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UID, generate_uid

    pixels = np.asarray(pixels, np.uint8)
    v = pixels.astype(np.int32)
    if photometric == "MONOCHROME1":
        v = 255 - v
    if bits == 8:
        stored = v.astype(np.uint8)
    else:
        stored = (v * 16 - int(rescale_intercept)).astype(np.uint16)
    sop_uid = f"1.2.826.0.1.3680043.10.1234.{uid_suffix}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    for k, val in FAKE_PATIENT.items():
        setattr(ds, k, val)
    if pixel_data:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.PixelRepresentation = 0
        ds.BitsAllocated = 8 if bits == 8 else 16
        ds.BitsStored = 8 if bits == 8 else 16 if rescale_intercept else 12
        ds.HighBit = ds.BitsStored - 1
        if frames > 1:
            ds.NumberOfFrames = frames
            stored = np.stack([stored] * frames)
        if bits != 8:
            if rescale_intercept:
                ds.RescaleIntercept = rescale_intercept
                ds.RescaleSlope = 1
            if window:
                ds.WindowCenter = 2040.5
                ds.WindowWidth = 4081
        ds.PixelData = stored.tobytes()
    if syntax and pixel_data and UID(syntax).is_compressed:
        try:
            ds.compress(UID(syntax), generate_instance_uid=False)
        except NotImplementedError:  # a syntax pydicom cannot write (MPEG2...): an opaque fragment
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([b"\0" * 64])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = UID(syntax)
    elif syntax:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path

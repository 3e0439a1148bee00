"""``lungedge listen --send-to AE@HOST:PORT``: each result back to a PACS as a DICOM Basic Text
SR that references the image it is about (same patient and study, a new series)."""

from __future__ import annotations

import io
import re
from typing import Optional

from lungedge.edge_runtime.classifier import Prediction, Refusal
from lungedge.results_report import NOT_A_DEVICE

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
#: attributes copied from the image so the report files with its patient and study
COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
          "StudyID", "AccessionNumber", "ReferringPhysicianName")


class ResultSender:
    def __init__(self, ae_title: str, peer_ae: str, host: str, port: int):
        self.ae_title, self.peer_ae, self.host, self.port = ae_title, peer_ae, host, port

    @classmethod
    def parse(cls, text: str, ae_title: str) -> "ResultSender":
        """From ``AE@HOST:PORT``.

        Raises:
            ConfigError: not of that form.
        """
        from lungedge.edge_runtime.errors import ConfigError

        m = re.fullmatch(r"([^@]{1,16})@(\[[^\]]+\]|[^:]+):(\d{1,5})", text or "")
        if not m or not 0 < int(m.group(3)) < 65536:
            raise ConfigError(f"--send-to must be AE@HOST:PORT (AE title up to 16 characters), got {text!r}")
        return cls(ae_title, m.group(1), m.group(2).strip("[]"), int(m.group(3)))

    def send(self, image: bytes, entry, facts: dict) -> Optional[str]:
        """C-STORE the report on ``entry`` (the result for ``image``); None when sent, else why not."""
        from pynetdicom import AE

        report = report_dataset(image, entry, facts)
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(BASIC_TEXT_SR)
        assoc = ae.associate(self.host, self.port, ae_title=self.peer_ae)
        if not assoc.is_established:
            return f"no association with {self.peer_ae}@{self.host}:{self.port}"
        try:
            status = assoc.send_c_store(report)
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        return None if code == 0 else f"{self.peer_ae} answered status {code if code is None else hex(code)}"


def report_text(entry, facts: dict) -> str:
    r = entry.result
    if isinstance(r, Prediction):
        what = f"{r.label} (p = {r.score:.3f}; decision: {facts['decision']})"
    elif isinstance(r, Refusal):
        what = f"OUT OF DOMAIN, no class given: {r.verdict.reason if r.verdict else r.error}"
    else:
        what = f"not classified: {r.error}"
    return (f"lungedge result: {what}. Model {facts['model']} ({facts['variant']}, sha256 {facts['sha256']}). "
            f"{NOT_A_DEVICE}")


def report_dataset(image: bytes, entry, facts: dict):
    """The Basic Text SR on ``entry``, in the image's patient and study, referencing the image."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    src = dcmread(io.BytesIO(image), stop_before_pixels=True, force=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for k in COPIED:
        if k in src:
            setattr(ds, k, src.data_element(k).value)
    ds.SOPClassUID, ds.SOPInstanceUID = BASIC_TEXT_SR, generate_uid()
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "SR", generate_uid(), 999, 1
    ds.Manufacturer, ds.SeriesDescription = "lungedge", "lungedge result (not a medical device)"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic imaging report")]
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = src.SOPClassUID, src.SOPInstanceUID
    text = Dataset()
    text.RelationshipType, text.ValueType, text.TextValue = "CONTAINS", "TEXT", report_text(entry, facts)[:1024]
    text.ConceptNameCodeSequence = [_code("121071", "DCM", "Finding")]
    image_item = Dataset()
    image_item.RelationshipType, image_item.ValueType = "CONTAINS", "IMAGE"
    image_item.ConceptNameCodeSequence = [_code("121080", "DCM", "Best illustration of finding")]
    image_item.ReferencedSOPSequence = [ref]
    ds.ContentSequence = [text, image_item]
    series = Dataset()
    series.SeriesInstanceUID = src.get("SeriesInstanceUID", generate_uid())
    series.ReferencedSOPSequence = [ref]
    study = Dataset()
    study.StudyInstanceUID = src.get("StudyInstanceUID", "")
    study.ReferencedSeriesSequence = [series]
    ds.CurrentRequestedProcedureEvidenceSequence = [study]
    return ds


def _code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c

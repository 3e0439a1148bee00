"""``lungedge listen``: a DICOM Storage SCP that classifies each image on arrival.

pynetdicom (the ``dicom`` extra) answers associations; each C-STORE goes through the same
path as an upload (``intake.classify_bytes``: the DICOM decoding, preprocessing and domain gate
of ``classify``) on one worker thread fed by a bounded queue. The sender always learns what
happened to an image: success once it is classified (an out-of-domain refusal is a result),
0x0122 for a storage class the model is not for, 0xA700 when the queue is full (send again
later), 0xC000 when the dataset cannot be decoded. Every outcome, and every refused
association or presentation context, is one audit line when an audit log is kept.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence

from lungedge.edge_runtime.classifier import Failure
from lungedge.edge_runtime.dicom import CT_MODALITIES, XRAY_MODALITIES, expected_modalities
from lungedge.intake import classify_bytes

#: storage SOP classes per kind of model: CR, DX for presentation and for processing; CT
XRAY_CLASSES = ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1")
CT_CLASSES = ("1.2.840.10008.5.1.4.1.1.2",)
#: images waiting to be classified; one more is answered 0xA700 (out of resources)
QUEUE = 32
#: longest a sender waits for its image's result before the listener answers 0xA700
WAIT_S = 120.0

LOG = logging.getLogger("lungedge.listen")

SUCCESS, NOT_SUPPORTED, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0x0122, 0xA700, 0xC000


def model_classes(clf) -> tuple:
    """The storage SOP classes ``clf`` is for, from its declared modality (both kinds if unknown)."""
    modalities = set(expected_modalities(clf.spec.intended) or ()) if clf.has_metadata else set()
    out = ()
    if not modalities or modalities & set(XRAY_MODALITIES):
        out += XRAY_CLASSES
    if not modalities or modalities & set(CT_MODALITIES):
        out += CT_CLASSES
    return out


def decodable_syntaxes() -> list:
    """The transfer syntaxes whose pixel data the installed ``dicom`` extra decodes."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    out = []
    for uid in AllTransferSyntaxes:
        try:
            if get_decoder(uid).is_available:
                out.append(uid)
        except NotImplementedError:
            continue
    return out


@dataclass
class Job:
    data: bytes
    uid: str
    calling_ae: str
    done: threading.Event = field(default_factory=threading.Event)
    status: int = OUT_OF_RESOURCES
    comment: str = "not classified in time"


class Listener:
    """The Storage SCP around one Classifier; results go to ``worklist`` and ``audit``."""

    def __init__(self, clf, lock: threading.Lock, *, ae_title: str = "LUNGEDGE", allow_ae: Sequence[str] = (),
                 audit=None, worklist=None, queue_size: int = QUEUE, send_to=None):
        self.clf, self.lock, self.audit, self.worklist, self.send_to = clf, lock, audit, worklist, send_to
        self.ae_title, self.allow_ae = ae_title, tuple(allow_ae)
        self.classes = model_classes(clf)
        self.kind = "/".join(k for k, c in (("CR/DX", XRAY_CLASSES), ("CT", CT_CLASSES)) if set(c) <= set(self.classes))
        from lungedge.results_report import model_facts

        self.facts = model_facts(clf)
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=queue_size)
        self._server = None
        self._worker = threading.Thread(target=self._work, name="lungedge-classify", daemon=True)

    def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port.

        Raises:
            ConfigError: the address cannot be bound.
        """
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        from lungedge.edge_runtime.errors import ConfigError

        ae = AE(ae_title=self.ae_title)
        ae.require_calling_aet = list(self.allow_ae)
        syntaxes = decodable_syntaxes()
        for uid in self._negotiable():
            ae.add_supported_context(uid, syntaxes)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_ACCEPTED, self._on_accepted)]
        self._worker.start()
        try:
            self._server = ae.start_server((host, port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise ConfigError(f"cannot listen for DICOM on {host}:{port} ({exc.strerror or exc})") from None
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        self.jobs.put(None)
        self._worker.join(timeout=WAIT_S)

    def _negotiable(self) -> list:
        """Every storage class is negotiated, so an image the model is not for gets a C-STORE
        status with its reason (0x0122) rather than a silent refusal of its context."""
        from pynetdicom import StoragePresentationContexts

        return [cx.abstract_syntax for cx in StoragePresentationContexts]

    def _on_store(self, event):
        calling = event.assoc.requestor.ae_title.strip()
        sop_class = str(event.request.AffectedSOPClassUID)
        uid = str(event.request.AffectedSOPInstanceUID)
        if sop_class not in self.classes:
            return self._refuse(NOT_SUPPORTED, f"{_class_name(sop_class)} is not a storage class this model is "
                                f"for (accepts {', '.join(_class_name(c) for c in self.classes)})", uid, calling,
                                comment=f"SOP class not accepted: the model is for {self.kind}")
        job = Job(event.encoded_dataset(), uid, calling)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            return self._refuse(OUT_OF_RESOURCES, f"{self.jobs.maxsize} images already wait; send again later",
                                uid, calling)
        if not job.done.wait(WAIT_S):
            return self._refuse(OUT_OF_RESOURCES, "not classified in time; send again later", uid, calling)
        return _status(job.status, job.comment)

    def _refuse(self, status: int, reason: str, uid: str, calling: str, comment: str = ""):
        """The failure status for one C-STORE (``comment``: the reason in 64 characters), logged."""
        self._log("listen", reason, status=f"0x{status:04X}", sop_instance_uid=uid, calling_ae=calling)
        return _status(status, comment or reason)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                self._classify(job)
            except Exception as exc:  # a bug or an unwritable audit log: the sender hears it, the listener goes on
                job.status, job.comment = OUT_OF_RESOURCES, f"{type(exc).__name__}: {exc}"
            finally:
                job.done.set()

    def _classify(self, job: Job) -> None:
        entry = classify_bytes(self.clf, self.lock, job.data, job.uid, self.audit, source="listen",
                               sop_instance_uid=job.uid, calling_ae=job.calling_ae)
        if self.worklist is not None:
            self.worklist.add(entry)
        failed = isinstance(entry.result, Failure) and getattr(entry.result, "verdict", None) is None
        job.status, job.comment = (CANNOT_UNDERSTAND, entry.result.error) if failed else (SUCCESS, "")
        if self.send_to is not None and not failed:
            self._send(job, entry)

    def _send(self, job: Job, entry) -> None:
        """The result back to the PACS; a failure to send is logged, the image stays classified."""
        try:
            why = self.send_to.send(job.data, entry, self.facts)
        except Exception as exc:  # the network or the peer: logged, never lost silently
            why = f"{type(exc).__name__}: {exc}"
        if why:
            self._log("send-to", f"result not sent: {why}", sop_instance_uid=job.uid)

    def _log(self, source: str, reason: str, **details) -> None:
        """A refusal to the audit log when there is one, and to the service's log (stderr)."""
        LOG.warning("lungedge listen: %s (%s)", reason, ", ".join(f"{k} {v}" for k, v in details.items()))
        if self.audit is not None:
            self.audit.record_refusal(source, reason, **details)

    def _on_rejected(self, event) -> None:
        calling = event.assoc.requestor.ae_title.strip()
        reason = (f"calling AE title {calling!r} is not on the allow list" if self.allow_ae and calling not in
                  self.allow_ae else "association rejected (too many at once, or the called AE title)")
        self._log("listen", reason, calling_ae=calling)

    def _on_accepted(self, event) -> None:
        calling = event.assoc.requestor.ae_title.strip()
        for cx in event.assoc.rejected_contexts:
            reason = (f"presentation context {_class_name(cx.abstract_syntax)} refused "
                      f"({cx.status}): no transfer syntax offered that this device decodes")
            self._log("listen", reason, calling_ae=calling)


def _class_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid


def _status(status: int, comment: str):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment[:64]  # LO: at most 64 characters
    return ds

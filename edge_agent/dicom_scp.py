"""DICOM ingest: a C-STORE SCP (pynetdicom) that diagnoses every image on arrival.

Only calling AE titles on the allow-list may associate; any other is rejected at association
(A-ASSOCIATE-RJ, rejected-permanent, service user, "calling AE title not recognised"). A received
image goes through the same :class:`~edge_agent.serving.DiagnosisService` as an HTTP upload:
checked, de-identified into the local store, diagnosed, audited (caller ``dicom:<AE title>``);
the result is read back through the API (``GET /v1/studies?source=dicom``, ``GET /v1/studies/{id}``).

A study that arrives before the box has a model (or while earlier such studies still wait) is
kept all the same: checked, de-identified, stored, audited ``stored``, answered 0x0000, and
diagnosed in arrival order once a model is served (:mod:`edge_agent.serving.pending`); only the
diagnosis waits for the model, never the study.

C-STORE statuses: 0x0000 success; 0xA700 out of resources (queue full);
0xC000 cannot understand, with the refusal reason in Error Comment (no pixel data, modality or
size refused, transfer syntax with no decoder, truncated pixel data); 0xC001 for anything else.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from edge_agent.serving import FAILURES, DiagnosisService
from edge_agent.serving.pending import PendingDiagnoses
from protocol.errors import FedscanError, Reason

log = logging.getLogger("fedscan.agent.dicom")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0xC001


def dicom_status(err: FedscanError) -> int:
    """Return the C-STORE status that answers a refusal: the one mapping (its reason goes in the Error Comment).

    The box busy or without a model → out of resources; its own failure → processing failure;
    anything about the object → cannot understand.
    """
    if err.reason in (Reason.OVERLOADED, Reason.NOT_READY):
        return STATUS_OUT_OF_RESOURCES
    if err.reason in FAILURES:
        return STATUS_PROCESSING_FAILURE
    return STATUS_CANNOT_UNDERSTAND


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


class DicomSCP:
    """The C-STORE listener: allowed calling AE titles only, every study through the diagnosis path."""

    def __init__(
        self,
        service: DiagnosisService,
        allowed_calling_aets: Sequence[str],
        *,
        ae_title: str = "FEDSCAN",
        host: str = "127.0.0.1",
        port: int = 11112,
    ) -> None:
        """Accept C-STOREs from ``allowed_calling_aets`` only, on ``host``:``port`` (refused when the list is empty)."""
        allowed = [a.strip() for a in allowed_calling_aets if a.strip()]
        if not allowed:
            raise ValueError("a DICOM SCP needs an allow-list of calling AE titles (none given)")
        self.service = service
        self.allowed = allowed
        self.host, self.port = host, port
        self.ae = AE(ae_title=ae_title)
        self.ae.require_calling_aet = allowed
        for cx in StoragePresentationContexts:
            if cx.abstract_syntax is not None:
                self.ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.pending = PendingDiagnoses(service)
        self._server: ThreadedAssociationServer | None = None
        self.stored = 0
        self.refused = 0
        # a C-STORE's bytes are counted while they arrive: past the profile's limit (plus room for the
        # command set) the association is aborted before the dataset is in memory
        self.max_message_bytes = service.accept.max_bytes + 64 * 1024
        self._receiving: dict[int, int] = {}
        self._lock = threading.Lock()

    def start(self) -> int:
        """Listen in the background; returns the bound port (``port=0`` picks a free one)."""
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected),
                               (evt.EVT_DATA_RECV, self._on_data), (evt.EVT_CONN_CLOSE, self._on_close)]
        server = self.ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        if server is None:  # only when block=True
            raise RuntimeError("pynetdicom did not return a server")
        self._server = server
        self.pending.start()
        self.port = int(server.server_address[1])
        log.info("DICOM SCP %s listening on %s:%d for %s", self.ae.ae_title, self.host, self.port, self.allowed)
        return self.port

    def stop(self) -> None:
        """Stop listening and stop the worker for kept studies (they stay on disk)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.pending.stop()

    def _refuse(self, exc: FedscanError, caller: str) -> Dataset:
        """Answer and audit a refusal, whatever its cause (the reason goes in the Error Comment)."""
        self.refused += 1
        code = dicom_status(exc)
        self.service.audit_refusal(exc, caller, "dicom", code)
        if code == STATUS_PROCESSING_FAILURE:
            log.warning("C-STORE from %s failed: %s (request %s)", caller, exc.reason, exc.detail.get("request_id"))
        else:
            log.info("C-STORE from %s refused: %s", caller, exc.reason)
        return _status(code, exc.reason)

    def _keep(self, data: bytes, caller: str) -> Dataset:
        """Keep a study no model can diagnose yet (or that queues behind such studies)."""
        try:
            study_id = self.service.keep_for_later(data, "application/dicom", caller=caller, source="dicom")
        except FedscanError as exc:
            return self._refuse(exc, caller)
        self.stored += 1
        self.pending.wake()
        log.info("C-STORE from %s: study %s kept, diagnosed once a model is served", caller, study_id)
        return _status(STATUS_SUCCESS)

    def _on_data(self, event: evt.Event) -> None:
        """Count the P-DATA bytes of the message being received; abort past the size limit."""
        data: bytes = event.data
        if data[:1] != b"\x04":  # P-DATA-TF only (associate, release, abort PDUs are small)
            return
        key = id(event.assoc)
        with self._lock:
            total = self._receiving.get(key, 0)
            if total < 0:
                return  # already aborting
            total += len(data)
            self._receiving[key] = total if total <= self.max_message_bytes else -1
        if total <= self.max_message_bytes:
            return
        caller = f"dicom:{event.assoc.requestor.ae_title}"
        self.refused += 1
        err = FedscanError(f"the C-STORE passed {self.max_message_bytes} bytes while being received",
                           reason=Reason.TOO_LARGE)
        self.service.audit_refusal(err, caller, "dicom", None)
        log.warning("C-STORE from %s aborted: more than %d bytes", caller, self.max_message_bytes)
        threading.Thread(target=event.assoc.abort, name="dicom-abort", daemon=True).start()  # not on the reader

    def _on_close(self, event: evt.Event) -> None:
        with self._lock:
            self._receiving.pop(id(event.assoc), None)

    def _on_rejected(self, event: evt.Event) -> None:
        log.warning("DICOM association from %r at %s refused: calling AE title not on the allow-list",
                    event.assoc.requestor.ae_title, event.assoc.requestor.address)

    def _on_store(self, event: evt.Event) -> Dataset:
        caller = f"dicom:{event.assoc.requestor.ae_title}"
        with self._lock:
            self._receiving.pop(id(event.assoc), None)  # the message is complete: the next one counts anew
        try:
            data = bytes(event.encoded_dataset(include_meta=True))
        except Exception:
            log.exception("cannot encode the received dataset")
            return _status(STATUS_PROCESSING_FAILURE, "cannot read the received dataset")
        if not self.service.served.ready or self.pending.waiting():
            return self._keep(data, caller)
        try:
            diag = self.service.diagnose(data, "application/dicom", caller=caller, source="dicom")
        except FedscanError as exc:
            self.refused += 1
            return self._refuse(exc, caller)
        self.stored += 1
        log.info("C-STORE from %s: study %s diagnosed by %s", caller, diag.study_id, diag.model_version)
        return _status(STATUS_SUCCESS)

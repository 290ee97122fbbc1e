"""DICOM ingest: a C-STORE SCP (pynetdicom) that diagnoses every image on arrival.

Only calling AE titles on the allow-list may associate; any other is rejected at association
(A-ASSOCIATE-RJ, rejected-permanent, service user, "calling AE title not recognised"). A received
image goes through the same :class:`~edge_agent.serving.DiagnosisService` as an HTTP upload:
checked, de-identified into the local store, diagnosed, audited (caller ``dicom:<AE title>``);
the result is read back through the API (``GET /v1/studies?source=dicom``, ``GET /v1/studies/{id}``).

C-STORE statuses: 0x0000 success; 0xA700 out of resources (queue full, no model yet);
0xC000 cannot understand, with the refusal reason in Error Comment (no pixel data, modality or
size refused, transfer syntax with no decoder, truncated pixel data); 0xC001 for anything else.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from edge_agent.serving import DiagnosisService, InferenceFailed, NotReady, Overloaded
from learning.dicom import ImageRejected

log = logging.getLogger("fedscan.agent.dicom")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0xC001


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


class DicomSCP:
    def __init__(
        self,
        service: DiagnosisService,
        allowed_calling_aets: Sequence[str],
        *,
        ae_title: str = "FEDSCAN",
        host: str = "127.0.0.1",
        port: int = 11112,
    ) -> None:
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
        self._server: ThreadedAssociationServer | None = None
        self.stored = 0
        self.refused = 0

    def start(self) -> int:
        """Listen in the background; returns the bound port (``port=0`` picks a free one)."""
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected)]
        server = self.ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        if server is None:  # only when block=True
            raise RuntimeError("pynetdicom did not return a server")
        self._server = server
        self.port = int(server.server_address[1])
        log.info("DICOM SCP %s listening on %s:%d for %s", self.ae.ae_title, self.host, self.port, self.allowed)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_rejected(self, event: evt.Event) -> None:
        log.warning("DICOM association from %r at %s refused: calling AE title not on the allow-list",
                    event.assoc.requestor.ae_title, event.assoc.requestor.address)

    def _on_store(self, event: evt.Event) -> Dataset:
        caller = f"dicom:{event.assoc.requestor.ae_title}"
        try:
            data = bytes(event.encoded_dataset(include_meta=True))
        except Exception:
            log.exception("cannot encode the received dataset")
            return _status(STATUS_PROCESSING_FAILURE, "cannot read the received dataset")
        try:
            diag = self.service.diagnose(data, "application/dicom", caller=caller, source="dicom")
        except ImageRejected as exc:
            self.refused += 1
            log.info("C-STORE from %s refused: %s", caller, exc.reason)
            return _status(STATUS_CANNOT_UNDERSTAND, exc.reason)
        except (Overloaded, NotReady) as exc:
            self.refused += 1
            return _status(STATUS_OUT_OF_RESOURCES, "overloaded" if isinstance(exc, Overloaded) else "not_ready")
        except (InferenceFailed, TimeoutError) as exc:
            self.refused += 1
            log.warning("C-STORE from %s failed: %s", caller, type(exc).__name__)
            return _status(STATUS_PROCESSING_FAILURE, "inference_failed")
        self.stored += 1
        log.info("C-STORE from %s: study %s diagnosed by %s", caller, diag.study_id, diag.model_version)
        return _status(STATUS_SUCCESS)

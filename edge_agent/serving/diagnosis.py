"""The diagnosis path shared by the HTTP API and the DICOM listener.

decode → preprocess → micro-batched inference → calibrate → store (de-identified) → audit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from edge_agent.audit import AuditLog, AuditRecord
from edge_agent.serving.batcher import InferenceResult, MicroBatcher
from edge_agent.serving.model import FAILURES, LoadedModel, ServedModel, ServingError
from edge_agent.store import LocalStore
from firmware.profile import InputSection
from learning.calibration import softmax
from learning.dicom import Image, ImageRejected, decode
from protocol.errors import FedscanError, Reason

log = logging.getLogger("fedscan.agent.serving")


@dataclass
class StageTimings:
    """Where the time of one diagnosis went, in milliseconds."""

    decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    queue_ms: float = 0.0
    infer_ms: float = 0.0
    store_ms: float = 0.0
    total_ms: float = 0.0
    batch_size: int = 0


@dataclass
class Diagnosis:
    """The result of one diagnosis, as the API and the audit report it."""

    study_id: str
    label: str
    probabilities: dict[str, float]
    confidence: float
    calibrated: bool
    temperature: float
    model_version: str
    engine: str
    source: str
    timings: StageTimings


InferenceHook = Callable[[], None]
ResultHook = Callable[[float, str], None]  # (latency_s, outcome: ok | rejected | error)


class DiagnosisService:
    """decode → preprocess → micro-batched inference → calibrate → store → audit.

    ``on_inference_request`` callbacks run at the start of every diagnosis (the trainer pauses
    on them, issue 8); ``on_result`` callbacks get ``(latency_s, outcome)`` at its end, outcome
    ``ok``, ``rejected`` (bad input, overloaded, not ready) or ``error`` (the shape of
    ``AgentMetrics.observe_inference``). A failing callback is logged, never fails the request.
    """

    def __init__(
        self,
        served: ServedModel,
        batcher: MicroBatcher,
        store: LocalStore,
        audit: AuditLog,
        accept: InputSection,
        *,
        on_inference_request: list[InferenceHook] | None = None,
        on_result: list[ResultHook] | None = None,
        timeout_s: float = 30.0,
        inline_bytes: int = 64 * 1024,
        inline_pixels: int = 512 * 512,
        max_decoding: int = 4,
        decode_wait_s: float = 2.0,
        retry_after_s: int = 1,
    ) -> None:
        """Diagnose with ``served`` through ``batcher``; keep studies in ``store``; audit to ``audit``."""
        self.served = served
        self.batcher = batcher
        self.store = store
        self.audit = audit
        self.accept = accept
        self.on_inference_request: list[InferenceHook] = on_inference_request if on_inference_request is not None else []
        self.on_result: list[ResultHook] = on_result if on_result is not None else []
        self.timeout_s = timeout_s
        # a small PNG (bytes and header-declared pixels) is decoded on the event loop: cheaper
        # than a thread hop; anything else (JPEG, DICOM, big or bomb-like PNG) goes to a thread
        self.inline_bytes = inline_bytes
        self.inline_pixels = inline_pixels
        # decoded images live in memory until they are preprocessed: at most ``max_decoding`` at a
        # time; a request that cannot start within ``decode_wait_s`` is refused as overloaded (503)
        self._decoding = threading.BoundedSemaphore(max_decoding)
        self.decode_wait_s, self.retry_after_s = decode_wait_s, retry_after_s

    # stages
    def _notify(self) -> None:
        for fn in list(self.on_inference_request):
            try:
                fn()
            except Exception:
                log.exception("on_inference_request callback failed")

    def _prepare(self, data: bytes, content_type: str | None, wait: bool = True
                 ) -> tuple[LoadedModel, Image, np.ndarray, StageTimings]:
        model = self.served.current()  # taken once: this request is served by this model
        if not self._decoding.acquire(timeout=self.decode_wait_s if wait else 0.0):
            raise self._busy()
        try:
            t0 = time.perf_counter()
            img = decode_or_refuse(data, content_type, self.accept)
            t1 = time.perf_counter()
            x = model.preprocess(img)
            t2 = time.perf_counter()
        finally:
            self._decoding.release()
        return model, img, x, StageTimings(decode_ms=(t1 - t0) * 1e3, preprocess_ms=(t2 - t1) * 1e3)

    def _finish(
        self, model: LoadedModel, img: Image, x: np.ndarray, res: InferenceResult, timings: StageTimings,
        caller: str, source: str, content_type: str, request_id: str,
    ) -> Diagnosis:
        probs = softmax(res.logits[None], model.temperature)[0]
        k = int(np.argmax(probs))
        probabilities = {c: float(p) for c, p in zip(model.classes, probs, strict=True)}
        t0 = time.perf_counter()
        study_id = self.store.ingest(  # removes its own partial folder when it fails
            source=source, content_type=content_type, model_input=x, modality=img.modality,
            dataset=img.dataset, pixels=None if img.dataset is not None else img.pixels,
        )
        try:
            self.store.record_diagnosis(
                study_id, model_version=model.version, engine=model.engine.name, label=model.classes[k],
                confidence=float(probs[k]), probabilities=probabilities,
            )
            timings.store_ms = (time.perf_counter() - t0) * 1e3
            timings.queue_ms, timings.infer_ms, timings.batch_size = res.queue_ms, res.infer_ms, res.batch_size
            diag = Diagnosis(
                study_id=study_id, label=model.classes[k], probabilities=probabilities, confidence=float(probs[k]),
                calibrated=model.calibrated, temperature=model.temperature, model_version=model.version,
                engine=model.engine.name, source=source, timings=timings,
            )
            self.audit.append(AuditRecord(
                event="diagnosis", caller=caller, study_id=study_id, model_version=model.version,
                engine=model.engine.name, label=diag.label, confidence=diag.confidence,
                probabilities=probabilities, source=source, request_id=request_id,
            ))
        except BaseException:
            self.store.delete(study_id)  # no partial study: all of it or nothing
            raise
        return diag

    def _inline_ok(self, data: bytes) -> bool:
        if len(data) > self.inline_bytes or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
            return False
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return width * height <= self.inline_pixels

    def _report(self, start: float, outcome: str) -> None:
        latency = time.perf_counter() - start
        for fn in list(self.on_result):
            try:
                fn(latency, outcome)
            except Exception:
                log.exception("on_result callback failed")

    def _busy(self) -> ServingError:
        return ServingError("every decoder is busy", reason=Reason.OVERLOADED,
                            detail={"retry_after_s": self.retry_after_s})

    def audit_refusal(self, err: FedscanError, caller: str, source: str, status_code: int | None,
                      request_id: str | None = None) -> None:
        """Audit a refused request with the status the edge that answered it gave.

        The edge is the HTTP API or the DICOM listener, so the mapping from reason to answer lives
        there alone.
        """
        m = self.served._current
        self.audit.append(AuditRecord(
            event="rejected", caller=caller, source=source, reason=err.reason, status_code=status_code,
            model_version=m.version if m else None, engine=m.engine.name if m else None,
            request_id=request_id or err.detail.get("request_id"),
        ))

    # entry points: one request path, awaited (HTTP) or blocking (the DICOM SCP)
    @contextlib.contextmanager
    def _request(self, caller: str, source: str, request_id: str) -> Iterator[_Request]:
        """Book-keeping around one diagnosis.

        Wakes the gate controller, tells the batcher a request is on its way until it is submitted,
        counts a refusal and stamps the total time of a success. Every failure leaves as a
        :class:`~protocol.errors.FedscanError` carrying ``detail["request_id"]``, so the edge that
        answers can audit it whatever its cause: a timeout becomes ``inference_timeout``, anything
        unexpected (a full disk, a bug) ``internal_error``, logged here with the request id and
        never described to the client.
        """
        req = _Request(start=time.perf_counter(), batcher=self.batcher)
        self._notify()
        self.batcher.expect(1)
        try:
            yield req
        except TimeoutError as exc:
            self._report(req.start, "error")
            raise ServingError("inference took longer than the request timeout", reason=Reason.INFERENCE_TIMEOUT,
                               detail={"request_id": request_id}) from exc
        except FedscanError as exc:
            if exc.reason is Reason.INFERENCE_FAILED:
                log.error("request %s: inference failed: %s", request_id, exc)
            exc.detail.setdefault("request_id", request_id)
            self._report(req.start, "error" if exc.reason in FAILURES else "rejected")
            raise
        except Exception as exc:
            log.exception("request %s from %s: unexpected failure", request_id, caller)
            self._report(req.start, "error")
            raise ServingError("the box failed; its log has the details", reason=Reason.INTERNAL_ERROR,
                               detail={"request_id": request_id}) from exc
        finally:
            if req.expected:
                self.batcher.expect(-1)
        assert req.diagnosis is not None
        req.diagnosis.timings.total_ms = (time.perf_counter() - req.start) * 1e3
        self._report(req.start, "ok")

    async def diagnose_async(self, data: bytes, content_type: str | None, caller: str, source: str = "http",
                             request_id: str | None = None) -> Diagnosis:
        """Diagnose one image from an event loop (the HTTP API); refusals raise (see the module doc)."""
        loop = asyncio.get_running_loop()
        rid = request_id or new_request_id()
        with self._request(caller, source, rid) as req:
            inline = self._inline_ok(data)
            if inline:  # never blocks the loop: a busy box refuses at once
                model, img, x, timings = self._prepare(data, content_type, wait=False)
            else:
                model, img, x, timings = await loop.run_in_executor(None, self._prepare, data, content_type)
            res = await asyncio.wait_for(asyncio.wrap_future(req.submit(model, x)), self.timeout_s)
            finish = (model, img, x, res, timings, caller, source, _base_type(content_type), rid)
            req.diagnosis = self._finish(*finish) if inline else await loop.run_in_executor(None, self._finish, *finish)
        return req.diagnosis

    def diagnose(self, data: bytes, content_type: str | None, caller: str, source: str = "dicom",
                 request_id: str | None = None) -> Diagnosis:
        """Blocking variant for threads that are not an event loop (the DICOM SCP)."""
        rid = request_id or new_request_id()
        with self._request(caller, source, rid) as req:
            model, img, x, timings = self._prepare(data, content_type)
            res = req.submit(model, x).result(timeout=self.timeout_s)
            req.diagnosis = self._finish(model, img, x, res, timings, caller, source, _base_type(content_type), rid)
        return req.diagnosis


    # studies that arrive before any model: kept, diagnosed later in arrival order (serving/pending.py)
    def keep_for_later(self, data: bytes, content_type: str | None, caller: str, source: str = "dicom",
                       request_id: str | None = None) -> str:
        """Check, de-identify and keep a DICOM study that no model can diagnose yet; return its study id.

        Refusals (not DICOM, modality, size, decoder, overloaded, internal) are raised as for a
        diagnosis; the caller (the DICOM listener) answers and audits them.
        """
        rid = request_id or new_request_id()
        try:
            if not self._decoding.acquire(timeout=self.decode_wait_s):
                raise self._busy()
            try:
                img = decode_or_refuse(data, content_type, self.accept)  # only valid studies are kept
            finally:
                self._decoding.release()
            if img.dataset is None:
                raise ImageRejected("only DICOM studies wait for a model", reason=Reason.NOT_DICOM)
            study_id = self.store.ingest(source=source, content_type=_base_type(content_type), model_input=None,
                                         modality=img.modality, dataset=img.dataset, pending_caller=caller)
        except FedscanError as exc:
            exc.detail.setdefault("request_id", rid)
            raise
        except Exception as exc:
            log.exception("request %s from %s: unexpected failure keeping a study", rid, caller)
            raise ServingError("the box failed; its log has the details", reason=Reason.INTERNAL_ERROR,
                               detail={"request_id": rid}) from exc
        self.audit.append(AuditRecord(event="stored", caller=caller, study_id=study_id, source=source,
                                      request_id=rid))
        return study_id

    def diagnose_kept(self, study_id: str, caller: str, source: str = "dicom") -> Diagnosis | None:
        """Diagnose a kept study with the model served now (``None``: the model refuses it, audited)."""
        rid = new_request_id()
        model = self.served.current()
        try:
            img = decode_or_refuse(self.store.source_bytes(study_id), "application/dicom", self.accept)
            x = model.preprocess(img)
            res = self.batcher.submit(model, x).result(timeout=self.timeout_s)
        except (ImageRejected, ServingError, TimeoutError) as exc:
            if isinstance(exc, ServingError) and exc.reason is Reason.OVERLOADED:
                raise  # the worker tries again shortly
            err = exc if isinstance(exc, FedscanError) else ServingError(
                "inference took longer than the request timeout", reason=Reason.INFERENCE_TIMEOUT)
            log.warning("kept study %s refused by model %s: %s", study_id, model.version, err.reason)
            self.audit_refusal(err, caller, source, None, request_id=rid)
            self.store.complete_pending(study_id, None)
            return None
        probs = softmax(res.logits[None], model.temperature)[0]
        k = int(np.argmax(probs))
        probabilities = {c: float(p) for c, p in zip(model.classes, probs, strict=True)}
        self.store.record_diagnosis(study_id, model_version=model.version, engine=model.engine.name,
                                    label=model.classes[k], confidence=float(probs[k]), probabilities=probabilities)
        self.store.complete_pending(study_id, x)  # last: a study stops waiting once its result is written
        self.audit.append(AuditRecord(
            event="diagnosis", caller=caller, study_id=study_id, model_version=model.version, engine=model.engine.name,
            label=model.classes[k], confidence=float(probs[k]), probabilities=probabilities, source=source,
            request_id=rid,
        ))
        return Diagnosis(study_id=study_id, label=model.classes[k], probabilities=probabilities,
                         confidence=float(probs[k]), calibrated=model.calibrated, temperature=model.temperature,
                         model_version=model.version, engine=model.engine.name, source=source,
                         timings=StageTimings(queue_ms=res.queue_ms, infer_ms=res.infer_ms, batch_size=res.batch_size))


@dataclass
class _Request:
    start: float
    batcher: MicroBatcher
    expected: bool = True  # counted in the batcher's expectations until submitted
    diagnosis: Diagnosis | None = None

    def submit(self, model: LoadedModel, x: np.ndarray) -> concurrent.futures.Future[InferenceResult]:
        self.batcher.expect(-1)  # before submit: the worker must not wait for this one
        self.expected = False
        return self.batcher.submit(model, x)


def new_request_id() -> str:
    """Return a fresh request id (names a request in the log, the audit and the answer)."""
    return uuid.uuid4().hex


def decode_or_refuse(data: bytes, content_type: str | None, accept: InputSection) -> Image:
    """Decode, turning any unexpected decoder failure into a refusal of the image (``corrupt_image``)."""
    try:
        return decode(data, content_type, accept)
    except ImageRejected:
        raise
    except Exception as exc:  # a decoder's own bug or an input it chokes on: the image is refused, not the box
        log.warning("decoder failed on a %s image: %s", _base_type(content_type) or "untyped", type(exc).__name__)
        raise ImageRejected("the image cannot be decoded", reason=Reason.CORRUPT_IMAGE) from exc


def _base_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()

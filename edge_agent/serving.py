"""Serving: the model the box serves (atomically swappable) and the micro-batcher in front of it.

- :class:`ServedModel` holds one :class:`LoadedModel` (version, engine, classes, temperature,
  preprocessing pipeline, input spec). ``swap`` replaces the reference under a lock; a request
  takes the reference once when it starts and uses that model for preprocessing, inference and
  its answer, so a swap in the middle of a request neither fails it nor mixes two models. The
  old engine lives until its last request lets go of it; the installer keeps it for rollback.
- :class:`MicroBatcher` runs inference on one worker thread: it waits for the first request,
  then gathers more for at most ``max_wait_ms`` or until ``max_batch``, stacks them and calls
  ``engine.predict`` once. Only requests for the same model share a batch. The queue is bounded:
  when it is full ``submit`` raises :class:`Overloaded` at once (the API answers 503 with
  ``Retry-After``) rather than letting latency grow without bound.
- Calibrated confidence: ``softmax(logits / T)``, T fitted on the coordinator's validation split
  and shipped in the manifest (``calibration.temperature``); T = 1 when the manifest has none.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edge_agent.audit import AuditLog, AuditRecord
from edge_agent.store import LocalStore
from learning.dicom import Image, ImageRejected, decode
from learning.transforms import Pipeline, build_pipeline
from protocol.manifest import InputSpec, Manifest
from protocol.profile import InputSection, PreprocessStep, ServingSection

log = logging.getLogger("fedscan.agent.serving")


class InferenceEngine(Protocol):
    """Same shape as ``export.engines.InferenceEngine``: float32 NCHW → float32 logits (N, classes)."""

    name: str

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


class NotReady(RuntimeError):
    """No verified model is loaded yet."""


class Overloaded(RuntimeError):
    """The request queue is full; retry after ``retry_after_s`` seconds."""

    def __init__(self, queued: int, retry_after_s: int) -> None:
        super().__init__(f"the inference queue is full ({queued} waiting)")
        self.queued = queued
        self.retry_after_s = retry_after_s


class InferenceFailed(RuntimeError):
    """The engine raised or returned something that is not (N, classes) finite logits."""


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One model ready to serve. Identity matters: the batcher batches per instance."""

    version: str
    engine: InferenceEngine
    classes: tuple[str, ...]
    input: InputSpec
    temperature: float = 1.0
    preprocessing: tuple[Mapping[str, Any], ...] = ()
    calibrated: bool = False
    loaded_at: float = field(default_factory=time.time)
    pipeline: Pipeline = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if len(self.classes) < 2:
            raise ValueError("a classifier needs at least two classes")
        object.__setattr__(self, "pipeline", build_pipeline(list(self.preprocessing)))

    def preprocess(self, img: Image) -> np.ndarray:
        """Run this model's preprocessing; the result must match its input spec."""
        x = self.pipeline(img)
        c, h, w = x.shape
        spec = self.input
        if c != spec.channels:
            raise ImageRejected(
                "wrong_channels", f"the image has {c} channel(s) after preprocessing, the model takes {spec.channels}"
            )
        if (h, w) != (spec.height, spec.width):
            raise ImageRejected(
                "wrong_size", f"the image is {h}x{w} after preprocessing, the model takes {spec.height}x{spec.width}"
            )
        return x


class ServedModel:
    """The model the box serves now; ``swap`` changes it atomically."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: LoadedModel | None = None
        self._listeners: list[Callable[[LoadedModel], None]] = []

    @property
    def ready(self) -> bool:
        return self._current is not None

    def current(self) -> LoadedModel:
        m = self._current  # one read of one reference: atomic
        if m is None:
            raise NotReady("no verified model is loaded yet")
        return m

    def add_listener(self, fn: Callable[[LoadedModel], None]) -> None:
        self._listeners.append(fn)

    def swap(
        self,
        *,
        version: str,
        engine: InferenceEngine,
        classes: Sequence[str],
        input: InputSpec,
        temperature: float | None = None,
        preprocessing: Sequence[PreprocessStep | Mapping[str, Any]] = (),
    ) -> LoadedModel | None:
        """Serve a verified model from now on; returns the one it replaces (for rollback).

        The installer calls this only after verification and its smoke inference. Requests in
        flight finish on the model they started with.
        """
        steps = tuple(s.model_dump() if hasattr(s, "model_dump") else dict(s) for s in preprocessing)
        new = LoadedModel(
            version=version,
            engine=engine,
            classes=tuple(classes),
            input=input,
            temperature=float(temperature) if temperature is not None else 1.0,
            preprocessing=steps,
            calibrated=temperature is not None,
        )
        return self.swap_loaded(new)

    def swap_manifest(
        self,
        manifest: Manifest,
        engine: InferenceEngine,
        *,
        default_preprocessing: Sequence[PreprocessStep | Mapping[str, Any]] = (),
    ) -> LoadedModel | None:
        """``swap`` with everything but the engine taken from a verified manifest; when the
        manifest lists no preprocessing, the box's profile steps (``default_preprocessing``)."""
        return self.swap(
            version=manifest.version,
            engine=engine,
            classes=manifest.classes,
            input=manifest.input,
            temperature=manifest.calibration.temperature if manifest.calibration else None,
            preprocessing=manifest.preprocessing or default_preprocessing,
        )

    def swap_loaded(self, new: LoadedModel) -> LoadedModel | None:
        with self._lock:
            old, self._current = self._current, new
        log.info("serving model %s on %s (was %s)", new.version, new.engine.name, old.version if old else None)
        for fn in self._listeners:
            try:
                fn(new)
            except Exception:
                log.exception("model swap listener failed")
        return old


# -- micro-batching -------------------------------------------------------------------------------
@dataclass
class InferenceResult:
    logits: np.ndarray
    queue_ms: float
    infer_ms: float
    batch_size: int


@dataclass(eq=False)
class _Job:
    model: LoadedModel
    x: np.ndarray
    enqueued: float
    future: concurrent.futures.Future[InferenceResult]


class MicroBatcher:
    """Bounded queue + one worker thread that batches requests for the same model."""

    def __init__(
        self,
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        queue_size: int = 64,
        retry_after_s: int = 1,
    ) -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and queue_size must be >= 1, max_wait_ms >= 0")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.retry_after_s = retry_after_s
        self._q: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._held: _Job | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.batches = 0
        self.items = 0
        self._incoming = 0  # requests being decoded/preprocessed: worth waiting for
        self._incoming_lock = threading.Lock()

    @classmethod
    def from_profile(cls, serving: ServingSection | None, retry_after_s: int = 1) -> MicroBatcher:
        s = serving or ServingSection()
        return cls(s.max_batch, s.max_wait_ms, s.queue_size, retry_after_s)

    # lifecycle
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fedscan-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(None)
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None
        self._fail_pending(RuntimeError("the inference service is shutting down"))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        return self._q.qsize()

    def expect(self, n: int = 1) -> None:
        """A request is on its way (being decoded); ``expect(-1)`` when it submitted or failed.
        With nothing on its way and nothing queued, a batch goes at once instead of waiting."""
        with self._incoming_lock:
            self._incoming += n

    def submit(self, model: LoadedModel, x: np.ndarray) -> concurrent.futures.Future[InferenceResult]:
        """Queue one preprocessed image (C, H, W); raises :class:`Overloaded` when full."""
        if self._thread is None:
            raise RuntimeError("the micro-batcher is not running")
        job = _Job(model, x, time.perf_counter(), concurrent.futures.Future())
        try:
            self._q.put_nowait(job)
        except queue.Full:
            raise Overloaded(self._q.qsize(), self.retry_after_s) from None
        return job.future

    # worker
    def _next(self, timeout: float | None) -> _Job | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        try:
            return self._q.get(timeout=timeout) if timeout is None or timeout > 0 else self._q.get_nowait()
        except queue.Empty:
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._one_batch()
            except Exception:  # the worker must outlive any one batch
                log.exception("micro-batcher iteration failed")

    def _one_batch(self) -> None:
        first = self._next(None)
        while first is not None and not first.future.set_running_or_notify_cancel():
            first = self._next(0.0)  # its caller gave up (timeout, disconnect): skip it
        if first is None:
            return
        batch = [first]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.perf_counter()
            if self._q.empty() and (left <= 0 or self._incoming <= 0):
                break
            job = self._next(max(left, 0.0))
            if job is None:
                break
            if job.model is not first.model:
                self._held = job  # a different model (a swap happened): next batch
                break
            if job.future.set_running_or_notify_cancel():
                batch.append(job)
        self._infer(batch)

    def _infer(self, batch: list[_Job]) -> None:
        model = batch[0].model
        start = time.perf_counter()
        try:
            xb = np.stack([j.x for j in batch]).astype(np.float32, copy=False)
            logits = np.asarray(model.engine.predict(xb), dtype=np.float32)
            if logits.shape != (len(batch), len(model.classes)) or not np.isfinite(logits).all():
                raise InferenceFailed(
                    f"engine {model.engine.name} returned {logits.shape} for a batch of {len(batch)}"
                    f" and {len(model.classes)} classes (or non-finite values)"
                )
        except Exception as exc:
            log.exception("inference failed on model %s", model.version)
            err = exc if isinstance(exc, InferenceFailed) else InferenceFailed(f"{type(exc).__name__}: {exc}")
            for j in batch:
                j.future.set_exception(err)
            return
        end = time.perf_counter()
        self.batches += 1
        self.items += len(batch)
        for i, j in enumerate(batch):
            j.future.set_result(
                InferenceResult(logits[i], (start - j.enqueued) * 1000.0, (end - start) * 1000.0, len(batch))
            )

    def _fail_pending(self, exc: Exception) -> None:
        pending = [self._held] if self._held is not None else []
        self._held = None
        while True:
            try:
                j = self._q.get_nowait()
            except queue.Empty:
                break
            if j is not None:
                pending.append(j)
        for j in pending:
            if not j.future.done():
                j.future.set_exception(exc)


# -- the diagnosis path, shared by the HTTP API and the DICOM SCP ---------------------------------
@dataclass
class StageTimings:
    decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    queue_ms: float = 0.0
    infer_ms: float = 0.0
    store_ms: float = 0.0
    total_ms: float = 0.0
    batch_size: int = 0


@dataclass
class Diagnosis:
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
    ) -> None:
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

    # stages
    def _notify(self) -> None:
        for fn in list(self.on_inference_request):
            try:
                fn()
            except Exception:
                log.exception("on_inference_request callback failed")

    def _prepare(self, data: bytes, content_type: str | None) -> tuple[LoadedModel, Image, np.ndarray, StageTimings]:
        model = self.served.current()  # taken once: this request is served by this model
        t0 = time.perf_counter()
        img = decode(data, content_type, self.accept)
        t1 = time.perf_counter()
        x = model.preprocess(img)
        t2 = time.perf_counter()
        return model, img, x, StageTimings(decode_ms=(t1 - t0) * 1e3, preprocess_ms=(t2 - t1) * 1e3)

    def _finish(
        self, model: LoadedModel, img: Image, x: np.ndarray, res: InferenceResult, timings: StageTimings,
        caller: str, source: str, content_type: str,
    ) -> Diagnosis:
        probs = softmax(res.logits[None], model.temperature)[0]
        k = int(np.argmax(probs))
        probabilities = {c: float(p) for c, p in zip(model.classes, probs, strict=True)}
        t0 = time.perf_counter()
        study_id = self.store.ingest(
            source=source, content_type=content_type, model_input=x, modality=img.modality,
            dataset=img.dataset, pixels=None if img.dataset is not None else img.pixels,
        )
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
            probabilities=probabilities, source=source,
        ))
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

    def _refused(self, exc: Exception, caller: str, source: str, start: float) -> None:
        if isinstance(exc, ImageRejected):
            reason, code = exc.reason, exc.status_code
        elif isinstance(exc, Overloaded):
            reason, code = "overloaded", 503
        elif isinstance(exc, NotReady):
            reason, code = "not_ready", 503
        else:
            reason, code = ("inference_timeout", 504) if isinstance(exc, TimeoutError) else ("inference_failed", 500)
        self._report(start, "error" if code >= 500 and code != 503 else "rejected")
        m = self.served._current
        self.audit.append(AuditRecord(
            event="rejected", caller=caller, source=source, reason=reason, status_code=code,
            model_version=m.version if m else None, engine=m.engine.name if m else None,
        ))

    # entry points: one request path, awaited (HTTP) or blocking (the DICOM SCP)
    @contextlib.contextmanager
    def _request(self, caller: str, source: str) -> Iterator[_Request]:
        """Book-keeping around one diagnosis: wakes the gate controller, tells the batcher a request is
        on its way until it is submitted, audits a refusal, and stamps the total time of a success."""
        req = _Request(start=time.perf_counter(), batcher=self.batcher)
        self._notify()
        self.batcher.expect(1)
        try:
            yield req
        except (ImageRejected, Overloaded, NotReady, InferenceFailed, TimeoutError) as exc:
            self._refused(exc, caller, source, req.start)
            raise
        finally:
            if req.expected:
                self.batcher.expect(-1)
        assert req.diagnosis is not None
        req.diagnosis.timings.total_ms = (time.perf_counter() - req.start) * 1e3
        self._report(req.start, "ok")

    async def diagnose_async(self, data: bytes, content_type: str | None, caller: str, source: str = "http") -> Diagnosis:
        loop = asyncio.get_running_loop()
        with self._request(caller, source) as req:
            inline = self._inline_ok(data)
            if inline:
                model, img, x, timings = self._prepare(data, content_type)
            else:
                model, img, x, timings = await loop.run_in_executor(None, self._prepare, data, content_type)
            res = await asyncio.wait_for(asyncio.wrap_future(req.submit(model, x)), self.timeout_s)
            finish = (model, img, x, res, timings, caller, source, _base_type(content_type))
            req.diagnosis = self._finish(*finish) if inline else await loop.run_in_executor(None, self._finish, *finish)
        return req.diagnosis

    def diagnose(self, data: bytes, content_type: str | None, caller: str, source: str = "dicom") -> Diagnosis:
        """Blocking variant for threads that are not an event loop (the DICOM SCP)."""
        with self._request(caller, source) as req:
            model, img, x, timings = self._prepare(data, content_type)
            res = req.submit(model, x).result(timeout=self.timeout_s)
            req.diagnosis = self._finish(model, img, x, res, timings, caller, source, _base_type(content_type))
        return req.diagnosis


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


def _base_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()

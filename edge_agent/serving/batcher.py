"""The micro-batcher in front of the served model: one worker thread, a bounded queue.

It waits for the first request, then gathers more for at most ``max_wait_ms`` or until
``max_batch``, stacks them and calls ``engine.predict`` once. Only requests for the same model
share a batch. The queue is bounded: when it is full ``submit`` raises :class:`ServingError` ``overloaded`` at once
(the API answers 503 with ``Retry-After``) rather than letting latency grow without bound.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from edge_agent.serving.model import LoadedModel, ServingError
from firmware.profile import ServingSection
from protocol.errors import Reason

log = logging.getLogger("fedscan.agent.serving")


@dataclass
class InferenceResult:
    """The logits of one image and where its time went."""

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
        """Batch up to ``max_batch`` requests, waiting at most ``max_wait_ms``, with ``queue_size`` queued at most."""
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
        """Build a batcher from the profile's ``serving`` section."""
        s = serving or ServingSection()
        return cls(s.max_batch, s.max_wait_ms, s.queue_size, retry_after_s)

    # lifecycle
    def start(self) -> None:
        """Start the worker thread (no-op when running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fedscan-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker and fail every request still queued."""
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(None)
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None
        self._fail_pending(RuntimeError("the inference service is shutting down"))

    @property
    def running(self) -> bool:
        """Whether the worker runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        """How many requests wait in the queue."""
        return self._q.qsize()

    def expect(self, n: int = 1) -> None:
        """Count a request on its way (being decoded); ``expect(-1)`` when it submitted or failed.

        With nothing on its way and nothing queued, a batch goes at once instead of waiting.
        """
        with self._incoming_lock:
            self._incoming += n

    def submit(self, model: LoadedModel, x: np.ndarray) -> concurrent.futures.Future[InferenceResult]:
        """Queue one preprocessed image (C, H, W); raises :class:`ServingError` ``overloaded`` when full."""
        if self._thread is None:
            raise RuntimeError("the micro-batcher is not running")
        job = _Job(model, x, time.perf_counter(), concurrent.futures.Future())
        try:
            self._q.put_nowait(job)
        except queue.Full:
            queued = self._q.qsize()
            raise ServingError(f"the inference queue is full ({queued} waiting)", reason=Reason.OVERLOADED,
                               detail={"queued": queued, "retry_after_s": self.retry_after_s}) from None
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
                raise ServingError(
                    f"engine {model.engine.name} returned {logits.shape} for a batch of {len(batch)}"
                    f" and {len(model.classes)} classes (or non-finite values)",
                    reason=Reason.INFERENCE_FAILED,
                )
        except Exception as exc:
            log.exception("inference failed on model %s", model.version)
            err = exc if isinstance(exc, ServingError) else ServingError(f"{type(exc).__name__}: {exc}")
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

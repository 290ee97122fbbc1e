"""The agent's Prometheus registry: inference counters and latency, training progress, gate state.

One :class:`AgentMetrics` per agent process, on its own ``CollectorRegistry`` (not the global
default, so tests and several agents in one process do not collide). It also summarises itself
for the telemetry message (:meth:`inference_summary`, :meth:`training_summary`), so ``/metrics``
and MQTT telemetry tell the same story. Labels are fixed, low-cardinality vocabularies (outcome,
reason); no request content ever becomes a label.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edge_agent.telemetry import TRAINING_STATES, ResourceSample

#: Latency buckets for a diagnosis request on an edge box (seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OUTCOMES = ("ok", "rejected", "error")


class AgentMetrics:
    """The agent's Prometheus metrics: inference, training progress, resource gates, resources."""

    def __init__(self, registry: CollectorRegistry | None = None, *, recent: int = 512) -> None:
        """Register the metrics in a registry of their own."""
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.inference_requests = Counter(
            "fedscan_inference_requests", "Diagnosis requests handled, by outcome", ["outcome"], registry=r
        )
        self.inference_latency = Histogram(
            "fedscan_inference_latency_seconds", "Diagnosis request latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference_in_flight = Gauge("fedscan_inference_in_flight", "Diagnosis requests in progress", registry=r)
        self.training_active = Gauge("fedscan_training_active", "1 while a training job exists", registry=r)
        self.training_paused = Gauge("fedscan_training_paused", "1 while training is paused", registry=r)
        self.training_round = Gauge("fedscan_training_round", "Round of the current training job", registry=r)
        self.training_step = Gauge("fedscan_training_step", "Optimizer steps done in the current job", registry=r)
        self.training_steps_total = Gauge("fedscan_training_steps_total", "Steps planned for the job", registry=r)
        self.training_loss = Gauge("fedscan_training_loss", "Mean training loss of the last batch", registry=r)
        self.training_progress_ts = Gauge(
            "fedscan_training_last_progress_timestamp_seconds", "Unix time of the last training step", registry=r
        )
        self.training_pauses = Counter("fedscan_training_pauses", "Training pauses, by reason", ["reason"], registry=r)
        self.gates_open = Gauge("fedscan_gates_open", "1 when the resource gates allow training", registry=r)
        self.cpu_percent = Gauge("fedscan_cpu_percent", "Box CPU utilization", registry=r)
        self.memory_percent = Gauge("fedscan_memory_percent", "Box memory in use", registry=r)
        self.memory_available = Gauge("fedscan_memory_available_bytes", "Box memory available", registry=r)
        self.disk_percent = Gauge("fedscan_disk_percent", "Data disk in use", registry=r)
        self.gpu_util = Gauge("fedscan_gpu_utilization_percent", "GPU utilization", ["gpu"], registry=r)
        self.gpu_temp = Gauge("fedscan_gpu_temperature_celsius", "GPU temperature", ["gpu"], registry=r)
        self.gpu_power = Gauge("fedscan_gpu_power_watts", "GPU power draw", ["gpu"], registry=r)
        self.model_info = Gauge("fedscan_model_info", "Model version being served (value 1)", ["version"], registry=r)
        for o in OUTCOMES:
            self.inference_requests.labels(o)
        self._lock = threading.Lock()
        self._recent: deque[float] = deque(maxlen=recent)
        self._counts = dict.fromkeys(OUTCOMES, 0)
        self._state = "idle"
        self._step = 0.0
        self._steps_total = 0.0
        self._round: float | None = None
        self._loss: float | None = None
        self._progress_at: float | None = None
        self._model_version: str | None = None

    # -- inference ------------------------------------------------------------------------------
    def observe_inference(self, latency_s: float, outcome: str = "ok") -> None:
        """Count one diagnosis request and its latency (``outcome`` ok, rejected or error)."""
        if outcome not in OUTCOMES:
            outcome = "error"
        self.inference_requests.labels(outcome).inc()
        self.inference_latency.observe(latency_s)
        with self._lock:
            self._counts[outcome] += 1
            if outcome == "ok":
                self._recent.append(latency_s)

    def inference_summary(self) -> dict[str, float]:
        """Counters and recent latency percentiles (ms) for the telemetry ``inference`` section."""
        with self._lock:
            counts = dict(self._counts)
            recent = sorted(self._recent)
        out: dict[str, float] = {"requests": float(sum(counts.values())), "errors": float(counts["error"])}
        if recent:
            out["p50_ms"] = 1000 * recent[len(recent) // 2]
            out["p95_ms"] = 1000 * recent[min(len(recent) - 1, int(0.95 * len(recent)))]
        return out

    # -- training -------------------------------------------------------------------------------
    def training_started(self, round_id: int, steps_total: int) -> None:
        """Record that a training job for ``round_id`` started."""
        with self._lock:
            self._state, self._round, self._step, self._steps_total = "running", float(round_id), 0.0, float(steps_total)
            self._progress_at, self._loss = time.time(), None
        self.training_active.set(1)
        self.training_paused.set(0)
        self.training_round.set(round_id)
        self.training_step.set(0)
        self.training_steps_total.set(steps_total)
        self.training_progress_ts.set_to_current_time()

    def training_step_done(self, step: int, loss: float | None = None) -> None:
        """Record one finished training step (and its loss)."""
        now = time.time()
        with self._lock:
            self._step, self._progress_at = float(step), now
            if loss is not None:
                self._loss = float(loss)
        self.training_step.set(step)
        self.training_progress_ts.set(now)
        if loss is not None:
            self.training_loss.set(loss)

    def on_train_progress(self, steps_done: int, steps_planned: int, loss: float) -> None:
        """Record training progress (the shape of ``learning.trainer.Progress``): pass as ``train_local(..., progress=metrics.on_train_progress)``."""
        with self._lock:
            self._steps_total = float(steps_planned)
        self.training_steps_total.set(steps_planned)
        self.training_step_done(steps_done, loss)

    def on_gate_change(self, paused: bool, reasons: list[str]) -> None:
        """Record a gate change (``GateController(on_change=...)``): pause state, gate gauge and pause reason."""
        by_inference = any("inference" in r for r in reasons)
        self.gates_open.set(0 if paused and not by_inference else 1)
        self.training_paused_changed(paused, "inference" if by_inference else "gate")

    def training_paused_changed(self, paused: bool, reason: str = "gate") -> None:
        """Record that training paused or resumed, and why."""
        with self._lock:
            if self._state in ("running", "paused"):
                self._state = "paused" if paused else "running"
        self.training_paused.set(1 if paused else 0)
        if paused:
            self.training_pauses.labels("inference" if reason == "inference" else "gate").inc()

    def training_finished(self, state: str = "done") -> None:
        """Record that the training job ended (``done``, ``failed`` or ``idle``)."""
        with self._lock:
            self._state = state if state in TRAINING_STATES else "done"
        self.training_active.set(0)
        self.training_paused.set(0)

    def training_summary(self) -> dict[str, float | str]:
        """Return the training section of the telemetry message."""
        with self._lock:
            out: dict[str, float | str] = {"state": self._state}
            if self._round is not None:
                out.update(round=self._round, step=self._step, steps_total=self._steps_total)
            if self._loss is not None:
                out["loss"] = self._loss
            if self._progress_at is not None:
                out["progress_at"] = self._progress_at
        return out

    # -- model and resources ----------------------------------------------------------------------
    def set_model_version(self, version: str | None) -> None:
        """Record the model version served now."""
        with self._lock:
            old, self._model_version = self._model_version, version
        if old is not None:
            self.model_info.remove(old)
        if version is not None:
            self.model_info.labels(version).set(1)

    def model_version(self) -> str | None:
        """Return the model version served now."""
        return self._model_version

    def observe_resources(self, sample: ResourceSample) -> None:
        """Record a resource sample (a ``TelemetryPublisher`` listener)."""
        """Mirror a telemetry sample into gauges (a ``TelemetryPublisher`` listener)."""
        for gauge, value in (
            (self.cpu_percent, sample.cpu_percent),
            (self.memory_percent, sample.memory_percent),
            (self.disk_percent, sample.disk_percent),
            (self.memory_available, None if sample.memory_available_mb is None else sample.memory_available_mb * 2**20),
        ):
            if value is not None:
                gauge.set(value)
        for g in sample.gpus:
            for gauge, value in ((self.gpu_util, g.util_percent), (self.gpu_temp, g.temp_c), (self.gpu_power, g.power_w)):
                if value is not None:
                    gauge.labels(str(g.index)).set(value)

    def exposition(self) -> bytes:
        """Return the metrics in the Prometheus text format."""
        return generate_latest(self.registry)


def metrics_router(registry: CollectorRegistry, path: str = "/metrics") -> APIRouter:
    """Return a FastAPI router serving ``registry`` in the Prometheus text format (agent and coordinator)."""
    router = APIRouter()

    @router.get(path, include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router

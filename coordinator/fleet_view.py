"""The coordinator's live view of the fleet, from what agents publish.

:class:`FleetView` subscribes to every agent's ``status`` (retained birth / Last Will),
``telemetry`` (QoS 0 samples) and ``shadow/reported`` + ``shadow/desired`` (served vs. wanted
model version), keeps the latest of each per agent plus a bounded history for charts, and
answers two readers: :class:`FleetCollector` (a Prometheus collector, one label ``agent`` per
series, for the coordinator's ``/metrics`` and the alert rules in ``deploy/prometheus/``) and
:meth:`FleetView.snapshot` (JSON for the dashboard).

An agent is *up* when its last status is not ``offline`` and its last telemetry (or, before
the first sample, its birth message) is younger than ``stale_after_s`` on the coordinator's
clock, so a box that vanished without its Last Will still goes down. Messages that do not parse
are counted and logged by topic and reason only, never by content.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from protocol.errors import MalformedMessage, UnknownTopic
from protocol.messages import Shadow, Status, Telemetry, parse_message
from protocol.topics import Kind, Topics
from protocol.transport import Transport

log = logging.getLogger(__name__)

TRAINING_ACTIVE_STATES = frozenset({"waiting", "running", "paused", "uploading"})


@dataclass(frozen=True)
class HistoryPoint:
    t: float
    cpu: float | None
    mem: float | None
    disk: float | None
    gpu_util: float | None
    gpu_temp: float | None


def _all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True


def _max(values: Iterable[Any]) -> float | None:
    nums = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return max(nums) if nums else None


@dataclass
class AgentState:
    agent: str
    status: str | None = None
    status_at: float | None = None  # coordinator clock
    last_seen: float | None = None  # coordinator clock, last telemetry
    telemetry: Telemetry | None = None
    reported_version: str | None = None
    desired_version: str | None = None
    messages: int = 0
    progress_key: tuple[Any, ...] | None = None  # (round, step, state) of the training section
    progress_seen: float | None = None  # coordinator clock when progress_key last changed
    history: deque[HistoryPoint] = field(default_factory=lambda: deque(maxlen=360))

    @property
    def model_version(self) -> str | None:
        """The version the box serves: its reported shadow, else what its telemetry says."""
        if self.reported_version is not None:
            return self.reported_version
        return self.telemetry.model_version if self.telemetry is not None else None

    @property
    def drift(self) -> bool:
        return self.desired_version is not None and self.model_version != self.desired_version


class FleetView:
    def __init__(
        self,
        topics: Topics,
        *,
        stale_after_s: float = 30.0,
        history: int = 360,
        accept: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.topics = topics
        self.stale_after_s = stale_after_s
        self.history = history
        self.accept = accept
        self.clock = clock
        self._lock = threading.Lock()
        self._agents: dict[str, AgentState] = {}
        self.counts: dict[str, int] = {"telemetry": 0, "status": 0, "shadow": 0, "malformed": 0, "refused": 0}

    # -- wiring -----------------------------------------------------------------------------------
    def attach(self, transport: Transport) -> None:
        """Subscribe on ``transport`` (connected or not: subscriptions survive reconnects)."""
        transport.subscribe(self.topics.all_agents(Kind.TELEMETRY), self.handle, qos=0)
        for kind in (Kind.STATUS, Kind.SHADOW_REPORTED, Kind.SHADOW_DESIRED):
            transport.subscribe(self.topics.all_agents(kind), self.handle, qos=1)

    def handle(self, topic: str, payload: bytes) -> None:
        try:
            parsed = self.topics.parse(topic)
            agent = parsed.agent
            if agent is None:
                return
            if self.accept is not None and not self.accept(agent):
                with self._lock:
                    self.counts["refused"] += 1
                return
            if parsed.kind is Kind.TELEMETRY:
                msg = parse_message(Telemetry, payload)
                if not _all_finite(msg.model_dump()):
                    raise MalformedMessage("Telemetry: non-finite number")
                self._on_telemetry(agent, msg)
            elif parsed.kind is Kind.STATUS:
                if not payload:  # retained status cleared
                    return
                self._on_status(agent, parse_message(Status, payload))
            elif parsed.kind in (Kind.SHADOW_REPORTED, Kind.SHADOW_DESIRED):
                if not payload:
                    return
                self._on_shadow(agent, parsed.kind, parse_message(Shadow, payload))
        except (MalformedMessage, UnknownTopic) as exc:
            with self._lock:
                self.counts["malformed"] += 1
            log.warning("fleet view: dropped message on %s: %s", topic, exc)

    def _state(self, agent: str) -> AgentState:
        st = self._agents.get(agent)
        if st is None:
            st = self._agents[agent] = AgentState(agent, history=deque(maxlen=self.history))
        return st

    def _on_telemetry(self, agent: str, msg: Telemetry) -> None:
        now = self.clock()
        point = HistoryPoint(
            t=now,
            cpu=msg.cpu_percent,
            mem=msg.memory_percent,
            disk=msg.disk_percent,
            gpu_util=_max(g.get("util_percent") for g in msg.gpu),
            gpu_temp=_max(g.get("temp_c") for g in msg.gpu),
        )
        with self._lock:
            st = self._state(agent)
            st.telemetry, st.last_seen = msg, now
            st.messages += 1
            key = tuple(msg.training.get(k) for k in ("round", "step", "state"))
            if key != st.progress_key:
                st.progress_key, st.progress_seen = key, now
            st.history.append(point)
            self.counts["telemetry"] += 1

    def _on_status(self, agent: str, msg: Status) -> None:
        if msg.role != "agent":
            return
        with self._lock:
            st = self._state(agent)
            st.status, st.status_at = msg.state, self.clock()
            self.counts["status"] += 1

    def _on_shadow(self, agent: str, kind: Kind, msg: Shadow) -> None:
        with self._lock:
            st = self._state(agent)
            if kind is Kind.SHADOW_REPORTED:
                st.reported_version = msg.version
            else:
                st.desired_version = msg.version
            self.counts["shadow"] += 1

    # -- reading ----------------------------------------------------------------------------------
    def _is_up(self, st: AgentState, now: float) -> bool:
        if st.status == "offline":
            return False
        seen = st.last_seen if st.last_seen is not None else st.status_at
        return seen is not None and now - seen <= self.stale_after_s

    def agents(self) -> list[str]:
        with self._lock:
            return sorted(self._agents)

    def is_up(self, agent: str) -> bool:
        with self._lock:
            st = self._agents.get(agent)
            return st is not None and self._is_up(st, self.clock())

    def states(self) -> Iterator[tuple[AgentState, bool]]:
        """A consistent copy of every agent's state with its up flag (history not copied)."""
        now = self.clock()
        with self._lock:
            rows = [
                (
                    AgentState(
                        st.agent, st.status, st.status_at, st.last_seen, st.telemetry,
                        st.reported_version, st.desired_version, st.messages,
                        st.progress_key, st.progress_seen, deque(),
                    ),
                    self._is_up(st, now),
                )
                for st in sorted(self._agents.values(), key=lambda s: s.agent)
            ]
        yield from rows

    def snapshot(self, *, history_points: int = 120) -> dict[str, Any]:
        """JSON-ready fleet state for the dashboard."""
        now = self.clock()
        agents = []
        with self._lock:
            for st in sorted(self._agents.values(), key=lambda s: s.agent):
                t = st.telemetry
                hist = list(st.history)[-history_points:] if history_points > 0 else []
                agents.append(
                    {
                        "agent": st.agent,
                        "online": self._is_up(st, now),
                        "status": st.status,
                        "last_seen": st.last_seen,
                        "age_s": None if st.last_seen is None else round(now - st.last_seen, 1),
                        "model_version": st.model_version,
                        "desired_version": st.desired_version,
                        "drift": st.drift,
                        "cpu_percent": t.cpu_percent if t else None,
                        "memory_percent": t.memory_percent if t else None,
                        "disk_percent": t.disk_percent if t else None,
                        "temperatures_c": dict(t.temperatures_c) if t else {},
                        "gpu": [dict(g) for g in t.gpu] if t else [],
                        "training": dict(t.training) if t else {},
                        "inference": dict(t.inference) if t else {},
                        "history": {
                            "t": [round(p.t - now, 1) for p in hist],
                            "cpu": [p.cpu for p in hist],
                            "mem": [p.mem for p in hist],
                            "disk": [p.disk for p in hist],
                            "gpu_util": [p.gpu_util for p in hist],
                            "gpu_temp": [p.gpu_temp for p in hist],
                        },
                    }
                )
        online = sum(1 for a in agents if a["online"])
        return {"generated_at": now, "agents": agents, "online": online, "total": len(agents)}


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class FleetCollector(Collector):
    """Prometheus collector over a :class:`FleetView`: per-agent series labelled ``agent``."""

    def __init__(self, view: FleetView) -> None:
        self.view = view

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: series depend on the fleet

    def collect(self) -> Iterator[Metric]:
        def gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["agent", *(labels or [])])

        up = gauge("fedscan_agent_up", "1 when the agent is online and its telemetry is fresh")
        seen = gauge("fedscan_agent_last_seen_timestamp_seconds", "Coordinator time of the last telemetry")
        cpu = gauge("fedscan_agent_cpu_percent", "CPU utilization")
        mem = gauge("fedscan_agent_memory_percent", "Memory in use")
        disk = gauge("fedscan_agent_disk_percent", "Data disk in use")
        temp = gauge("fedscan_agent_temperature_celsius", "Hottest reading per sensor chip", ["sensor"])
        gutil = gauge("fedscan_agent_gpu_utilization_percent", "GPU utilization", ["gpu"])
        gmem = gauge("fedscan_agent_gpu_memory_percent", "GPU memory in use", ["gpu"])
        gtemp = gauge("fedscan_agent_gpu_temperature_celsius", "GPU temperature", ["gpu"])
        gpow = gauge("fedscan_agent_gpu_power_watts", "GPU power draw", ["gpu"])
        model = gauge("fedscan_agent_model_info", "Model version served (value 1)", ["version"])
        desired = gauge("fedscan_agent_model_desired_info", "Model version desired by the rollout (value 1)", ["version"])
        drift = gauge("fedscan_agent_model_drift", "1 when the served version differs from the desired one")
        tactive = gauge("fedscan_agent_training_active", "1 while a training job exists on the agent")
        tpaused = gauge("fedscan_agent_training_paused", "1 while training is paused (gates, diagnosis load)")
        tstep = gauge("fedscan_agent_training_step", "Steps done in the current training job")
        tprog = gauge(
            "fedscan_agent_training_last_progress_timestamp_seconds",
            "Coordinator time when the agent's training round/step/state last changed",
        )
        ireq = CounterMetricFamily("fedscan_agent_inference_requests", "Diagnosis requests handled", labels=["agent"])
        ip95 = gauge("fedscan_agent_inference_latency_p95_seconds", "p95 of recent diagnosis latencies")
        fleet = GaugeMetricFamily("fedscan_fleet_agents", "Agents known to the fleet view", labels=["state"])
        msgs = CounterMetricFamily("fedscan_fleet_messages", "Agent messages handled by kind", labels=["kind"])

        n_up = n_down = 0
        for st, is_up in self.view.states():
            a = st.agent
            up.add_metric([a], 1.0 if is_up else 0.0)
            n_up, n_down = n_up + int(is_up), n_down + int(not is_up)
            if st.last_seen is not None:
                seen.add_metric([a], st.last_seen)
            if st.model_version is not None:
                model.add_metric([a, st.model_version], 1.0)
            if st.desired_version is not None:
                desired.add_metric([a, st.desired_version], 1.0)
            drift.add_metric([a], 1.0 if st.drift else 0.0)
            t = st.telemetry
            if t is None:
                continue
            for fam, value in ((cpu, t.cpu_percent), (mem, t.memory_percent), (disk, t.disk_percent)):
                if value is not None:
                    fam.add_metric([a], value)
            for sensor, celsius in t.temperatures_c.items():
                temp.add_metric([a, sensor], celsius)
            for i, g in enumerate(t.gpu):
                index = _num(g.get("index"))
                idx = str(int(index)) if index is not None else str(i)
                for fam, key in ((gutil, "util_percent"), (gmem, "mem_percent"), (gtemp, "temp_c"), (gpow, "power_w")):
                    v = _num(g.get(key))
                    if v is not None:
                        fam.add_metric([a, idx], v)
            state = t.training.get("state")
            if isinstance(state, str):
                tactive.add_metric([a], 1.0 if state in TRAINING_ACTIVE_STATES else 0.0)
                tpaused.add_metric([a], 1.0 if state == "paused" else 0.0)
            v = _num(t.training.get("step"))
            if v is not None:
                tstep.add_metric([a], v)
            if isinstance(state, str) and st.progress_seen is not None:
                tprog.add_metric([a], st.progress_seen)
            v = _num(t.inference.get("requests"))
            if v is not None:
                ireq.add_metric([a], v)
            v = _num(t.inference.get("p95_ms"))
            if v is not None:
                ip95.add_metric([a], v / 1000.0)
        fleet.add_metric(["online"], n_up)
        fleet.add_metric(["offline"], n_down)
        for kind, n in dict(self.view.counts).items():
            msgs.add_metric([kind], n)
        yield from (up, seen, cpu, mem, disk, temp, gutil, gmem, gtemp, gpow, model, desired, drift)
        yield from (tactive, tpaused, tstep, tprog, ireq, ip95, fleet, msgs)


def fleet_registry(view: FleetView) -> CollectorRegistry:
    """A registry holding only the fleet collector (add the coordinator's own metrics as needed)."""
    registry = CollectorRegistry()
    registry.register(FleetCollector(view))
    return registry



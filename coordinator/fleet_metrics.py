"""Prometheus metrics of the fleet: one series per agent, labelled ``agent``.

:class:`FleetCollector` reads whatever offers ``states()`` (each agent's :class:`AgentState` with
its up flag) and ``counts`` (messages handled by kind) — the fleet view — at every scrape, for
the coordinator's ``/metrics`` and the alert rules in ``deploy/prometheus/``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.fleet_state import TRAINING_ACTIVE_STATES, AgentState


class FleetStates(Protocol):
    """What the collector reads: every agent's state with its up flag, and message counts."""

    counts: Mapping[str, int]

    def states(self) -> Iterator[tuple[AgentState, bool]]:
        """Each agent's state (history not needed) and whether it is up."""
        ...


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class FleetCollector(Collector):
    """Prometheus collector over a :class:`FleetView`: per-agent series labelled ``agent``."""

    def __init__(self, view: FleetStates) -> None:
        self.view = view

    def describe(self) -> list[Metric]:
        """No fixed series: they depend on the fleet."""
        return []  # unchecked collector: series depend on the fleet

    def collect(self) -> Iterator[Metric]:
        """One family per metric, a series per agent."""
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
            for g in t.gpu:
                idx = str(g.index)
                for fam, key in ((gutil, "util_percent"), (gmem, "mem_percent"), (gtemp, "temp_c"), (gpow, "power_w")):
                    v = _num(getattr(g, key))
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


def fleet_registry(view: FleetStates) -> CollectorRegistry:
    """A registry holding only the fleet collector (add the coordinator's own metrics as needed)."""
    registry = CollectorRegistry()
    registry.register(FleetCollector(view))
    return registry

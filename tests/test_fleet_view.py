"""Coordinator fleet view: 50 agents over a real mosquitto, /metrics and the dashboard JSON."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fleet_helpers import serve, wait_until
from mqtt_broker import Broker
from prometheus_client.parser import text_string_to_metric_families

from coordinator.dashboard import dashboard_router
from coordinator.fleet_view import FleetView, fleet_registry
from edge_agent.metrics import AgentMetrics, metrics_router
from edge_agent.telemetry import TelemetryPublisher, TelemetrySampler
from protocol.messages import Shadow, Status, Telemetry
from protocol.topics import Topics
from protocol.transport import MemoryBroker, MemoryTransport, MqttTransport

REPO = Path(__file__).resolve().parent.parent
N_AGENTS = 50


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def coordinator_app(view: FleetView) -> FastAPI:
    app = FastAPI()
    app.include_router(metrics_router(fleet_registry(view)))
    app.include_router(dashboard_router(view, round_info=lambda: {"round_id": 2, "received": 31, "expected": 50}))
    return app


class SimAgent:
    """One simulated box: own MQTT client id, Last Will, birth message, real sampler at 0.3 s."""

    def __init__(self, topics: Topics, name: str, port: int, version: str) -> None:
        self.name = name
        offline = Status(state="offline").to_bytes()
        self.transport = MqttTransport(name, "127.0.0.1", port, will=(topics.status(name), offline), clean_session=True)
        self.metrics = AgentMetrics()
        self.metrics.set_model_version(version)
        self.metrics.observe_inference(0.012)
        sampler = TelemetrySampler(gpu=False, inference=self.metrics.inference_summary,
                                   training=self.metrics.training_summary, model_version=self.metrics.model_version)
        self.publisher = TelemetryPublisher(sampler, self.transport, topics.telemetry(name), period_s=0.3)
        self.status_topic = topics.status(name)

    def start(self) -> None:
        self.transport.connect()
        self.transport.publish(self.status_topic, Status(state="online", profile="xray-cxr-28").to_bytes(), retain=True)
        self.publisher.start()

    def stop(self) -> None:
        self.publisher.stop()
        self.transport.close(graceful_payload=(self.status_topic, Status(state="offline").to_bytes()))


def test_fifty_agents_show_in_metrics_and_dashboard(broker: Broker) -> None:
    topics = Topics("fifty")
    view = FleetView(topics, stale_after_s=5)
    coord = MqttTransport("coordinator", "127.0.0.1", broker.port, clean_session=True)
    view.attach(coord)
    coord.connect()
    names = [f"box-{i:02d}" for i in range(N_AGENTS)]
    agents = [SimAgent(topics, n, broker.port, "g7" if i % 10 else "g6") for i, n in enumerate(names)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(SimAgent.start, agents))
    # The rollout wants g7 everywhere: the five boxes still on g6 drift.
    for n in names:
        coord.publish(topics.shadow_desired(n), Shadow(version="g7").to_bytes(), retain=True)
    try:
        assert wait_until(lambda: sum(view.is_up(n) for n in names) == N_AGENTS and all(
            st.telemetry is not None and st.desired_version for st, _ in view.states()), timeout=15)
        time.sleep(0.7)  # a few more samples for the history
        with serve(coordinator_app(view)) as url:
            metrics = httpx.get(url + "/metrics", timeout=10)
            fleet = httpx.get(url + "/dashboard/api/fleet", timeout=10).json()
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        up = samples(metrics.text, "fedscan_agent_up")
        assert {dict(k)["agent"] for k, v in up.items() if v == 1.0} == set(names)
        cpu = samples(metrics.text, "fedscan_agent_cpu_percent")
        assert {dict(k)["agent"] for k in cpu} == set(names) and all(0 <= v <= 100 for v in cpu.values())
        assert len(samples(metrics.text, "fedscan_agent_memory_percent")) == N_AGENTS
        assert samples(metrics.text, "fedscan_fleet_agents")[(("state", "online"),)] == N_AGENTS
        models = samples(metrics.text, "fedscan_agent_model_info")
        assert sum(1 for k in models if dict(k)["version"] == "g6") == 5
        drift = samples(metrics.text, "fedscan_agent_model_drift")
        assert sorted(dict(k)["agent"] for k, v in drift.items() if v == 1.0) == [f"box-{i:02d}" for i in range(0, 50, 10)]
        assert samples(metrics.text, "fedscan_agent_inference_requests_total")[(("agent", "box-03"),)] == 1.0

        assert fleet["total"] == N_AGENTS and fleet["online"] == N_AGENTS
        assert [a["agent"] for a in fleet["agents"]] == names
        assert all(a["online"] and a["cpu_percent"] is not None and len(a["history"]["cpu"]) >= 2 for a in fleet["agents"])
        assert fleet["round"] == {"round_id": 2, "received": 31, "expected": 50}
        assert fleet["rollout"] is None

        # A clean shutdown publishes the retained offline status.
        agents[3].stop()
        assert wait_until(lambda: not view.is_up("box-03"), timeout=5)
        assert view.is_up("box-04")
    finally:
        for a in agents:
            if a.transport.connected:
                a.stop()
        coord.close()


AGENT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from edge_agent.telemetry import TelemetryPublisher, TelemetrySampler
    from protocol.messages import Status
    from protocol.topics import Topics
    from protocol.transport import MqttTransport
    topics, name = Topics("will"), "box-crash"
    t = MqttTransport(name, "127.0.0.1", int(sys.argv[1]), clean_session=True, keepalive=5,
                      will=(topics.status(name), Status(state="offline").to_bytes()))
    t.connect()
    t.publish(topics.status(name), Status(state="online").to_bytes(), retain=True)
    TelemetryPublisher(TelemetrySampler(gpu=False), t, topics.telemetry(name), period_s=0.2).start()
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_killed_agent_goes_offline_through_its_last_will(broker: Broker) -> None:
    topics = Topics("will")
    view = FleetView(topics, stale_after_s=60)  # so only the Last Will can make it offline quickly
    coord = MqttTransport("coordinator", "127.0.0.1", broker.port, clean_session=True)
    view.attach(coord)
    coord.connect()
    proc = subprocess.Popen([sys.executable, "-c", AGENT_SCRIPT, str(broker.port)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert wait_until(lambda: view.is_up("box-crash"), timeout=10)
        proc.kill()  # SIGKILL: no clean disconnect, the broker sends the will
        proc.wait(5)
        assert wait_until(lambda: not view.is_up("box-crash"), timeout=10)
        snap = view.snapshot()
        assert snap["agents"][0]["status"] == "offline" and snap["online"] == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        coord.close()


def test_stale_telemetry_malformed_messages_and_unknown_agents(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    now = [1000.0]
    topics = Topics("unit")
    view = FleetView(topics, stale_after_s=30, clock=lambda: now[0], accept=lambda a: a != "intruder")
    broker = MemoryBroker()
    coord, agent = MemoryTransport(broker, "coordinator"), MemoryTransport(broker, "box-1")
    coord.connect()
    agent.connect()
    view.attach(coord)
    agent.publish(topics.status("box-1"), Status(state="online").to_bytes(), retain=True)
    agent.publish(topics.telemetry("box-1"), Telemetry(cpu_percent=12.5, training={"state": "running", "step": 3}).to_bytes())
    agent.publish(topics.telemetry("box-1"), b'{"v":1,"cpu_percent":"DOE^JANE"}')
    agent.publish(topics.telemetry("box-1"), b'{"v":1,"cpu_percent":NaN}')
    agent.publish(topics.telemetry("intruder"), Telemetry(cpu_percent=1).to_bytes())
    assert wait_until(lambda: view.counts["malformed"] == 2 and view.counts["refused"] == 1, timeout=5)
    assert view.agents() == ["box-1"] and view.is_up("box-1")
    assert "DOE^JANE" not in caplog.text and "fleet view: dropped message" in caplog.text
    text = "\n".join(f"{s.name} {s.labels} {s.value}" for f in fleet_registry(view).collect() for s in f.samples)
    assert "fedscan_agent_training_last_progress_timestamp_seconds {'agent': 'box-1'} 1000.0" in text
    now[0] += 31
    assert not view.is_up("box-1"), "no telemetry for longer than stale_after_s"
    assert view.snapshot()["agents"][0]["age_s"] == 31.0
    coord.close()
    agent.close()

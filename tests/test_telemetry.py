"""Telemetry sampler, compact encoding, QoS-0 publishing over a real mosquitto, agent metrics."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from mqtt_broker import Broker

from edge_agent.metrics import AgentMetrics, metrics_router
from edge_agent.telemetry import NvmlProbe, TelemetryPublisher, TelemetrySampler, encode_telemetry
from protocol.messages import Telemetry, parse_message
from protocol.topics import Kind, Topics
from protocol.transport import MemoryBroker, MemoryTransport, MqttTransport

# Identifiers of a (synthetic) study that must never reach telemetry or logs.
PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "PID-0042-7731"
STUDY_UID = "1.2.840.113619.2.55.3.604688119.971.1700000000.123"
IMAGE_FILE = "/data/incoming/DOE_JANE_chest.dcm"
PHI = (PATIENT_NAME, PATIENT_ID, STUDY_UID, IMAGE_FILE, "DOE", "JANE", "113619")


def test_sample_reads_the_real_box() -> None:
    sampler = TelemetrySampler(disk_path=str(Path.cwd()))
    end = time.monotonic() + 0.2
    while time.monotonic() < end:  # some CPU work between the two cpu_times readings
        sum(i * i for i in range(1000))
    s = sampler.sample()
    assert s.cpu_percent is not None and 0.0 < s.cpu_percent <= 100.0
    vm = psutil.virtual_memory()
    assert s.memory_percent is not None and abs(s.memory_percent - vm.percent) < 10
    assert s.memory_available_mb is not None and 0 < s.memory_available_mb <= vm.total / 2**20
    assert s.disk_percent == pytest.approx(psutil.disk_usage(str(Path.cwd())).percent, abs=1.0)
    assert abs(s.at - time.time()) < 5
    for name, celsius in s.temperatures_c.items():
        assert name and -40 < celsius < 150


def test_gpu_section_is_nvml_or_skipped_with_a_logged_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.telemetry")
    probe = NvmlProbe()
    sampler = TelemetrySampler(nvml=probe)
    s = sampler.sample()
    if probe.available:
        assert s.gpus, "NVML sees a GPU, so the sample must carry it"
        g = s.gpus[0].to_wire()
        assert {"index", "util_percent", "mem_percent", "temp_c"} <= set(g)
        assert 0 <= float(g["util_percent"]) <= 100  # type: ignore[arg-type]
    else:
        assert s.gpus == ()
        assert probe.reason
        assert "GPU section skipped" in caplog.text and probe.reason in caplog.text
        assert "gpu" not in json.loads(encode_telemetry(sampler.to_message(s)))
    sampler.close()


def test_encoding_is_compact_and_round_trips() -> None:
    metrics = AgentMetrics()
    for ms in (12, 15, 18, 40):
        metrics.observe_inference(ms / 1000)
    metrics.training_started(round_id=3, steps_total=200)
    metrics.training_step_done(17, loss=0.6931472)
    metrics.set_model_version("g-000012")
    sampler = TelemetrySampler(
        inference=metrics.inference_summary, training=metrics.training_summary, model_version=metrics.model_version
    )
    msg = sampler.to_message(sampler.sample())
    payload = encode_telemetry(msg)
    text = payload.decode()
    assert " " not in text and "null" not in text and "{}" not in text and "[]" not in text
    back = parse_message(Telemetry, payload)
    assert back.model_version == "g-000012"
    assert back.training["state"] == "running" and back.training["step"] == 17
    assert back.training["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert back.inference["requests"] == 4 and back.inference["p95_ms"] == pytest.approx(40.0)
    assert back.cpu_percent == pytest.approx(msg.cpu_percent, abs=0.05)
    assert back.at == pytest.approx(msg.at, abs=1e-3)
    assert len(payload) < len(msg.to_bytes())  # smaller than the plain pydantic dump
    assert len(payload) < 400, text


def test_providers_cannot_leak_study_identifiers(caplog: pytest.LogCaptureFixture) -> None:
    """Whatever a provider returns, only snake_case numbers (and a known state) reach the wire."""
    caplog.set_level(logging.DEBUG)

    def inference() -> dict[str, object]:
        return {"requests": 3, "last_patient": PATIENT_NAME, "PatientID": 1.0, "study_uid": STUDY_UID,
                "file": IMAGE_FILE, "ok_flag": True, "nan": float("nan")}

    def training() -> dict[str, object]:
        return {"state": STUDY_UID, "step": 4, "image": IMAGE_FILE}

    def broken_version() -> str:
        raise RuntimeError(f"cannot read model for {PATIENT_NAME} {STUDY_UID}")

    sampler = TelemetrySampler(inference=inference, training=training, model_version=broken_version)  # type: ignore[arg-type]
    payload = encode_telemetry(sampler.to_message(sampler.sample()))
    bad_version = TelemetrySampler(model_version=lambda: f"{PATIENT_ID} {STUDY_UID}")
    payload2 = encode_telemetry(bad_version.to_message(bad_version.sample()))
    data = json.loads(payload)
    assert data["inference"] == {"requests": 3}
    assert data["training"] == {"step": 4}
    assert "model_version" not in data and "model_version" not in json.loads(payload2)
    everything = payload.decode() + payload2.decode() + caplog.text
    for ident in PHI:
        assert ident not in everything
    assert "model_version provider failed: RuntimeError" in caplog.text


def test_publishes_qos0_at_the_configured_period_over_mosquitto(broker: Broker) -> None:
    topics = Topics("tele")
    got: list[mqtt.MQTTMessage] = []
    subscribed = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="observer", protocol=mqtt.MQTTv311)
    sub.on_message = lambda c, u, m: got.append(m)
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    sub.subscribe(topics.all_agents(Kind.TELEMETRY), qos=1)  # QoS 1 subscription: delivered QoS = publish QoS
    assert subscribed.wait(5)

    transport = MqttTransport("box-01", "127.0.0.1", broker.port, clean_session=True)
    transport.connect()
    publisher = TelemetryPublisher(TelemetrySampler(), transport, topics.telemetry("box-01"), period_s=0.1)
    publisher.start()
    time.sleep(1.05)
    publisher.stop()
    time.sleep(0.2)
    transport.close()
    sub.loop_stop()
    sub.disconnect()

    assert 8 <= len(got) <= 13, f"{len(got)} messages in ~1 s at a 0.1 s period"
    assert all(m.qos == 0 and not m.retain and m.topic == topics.telemetry("box-01") for m in got)
    msgs = [parse_message(Telemetry, bytes(m.payload)) for m in got]
    gaps = [b.at - a.at for a, b in itertools.pairwise(msgs)]
    assert all(0.05 < g < 0.2 for g in gaps), gaps
    assert publisher.messages >= len(got) and publisher.bytes / publisher.messages < 300


def test_listeners_and_agent_metrics_exposition() -> None:
    mb = MemoryBroker()
    transport = MemoryTransport(mb, "box-02")
    transport.connect()
    metrics = AgentMetrics()
    publisher = TelemetryPublisher(TelemetrySampler(), transport, Topics("m").telemetry("box-02"), period_s=5)
    publisher.listeners.append(metrics.observe_resources)
    publisher.publish_once()
    assert publisher.latest is not None
    for s in (0.004, 0.03, 0.3):
        metrics.observe_inference(s)
    metrics.observe_inference(0.5, outcome="error")
    metrics.training_started(round_id=7, steps_total=50)
    metrics.training_step_done(3, loss=1.25)
    metrics.training_paused_changed(True, reason="inference")
    metrics.set_model_version("g1")
    metrics.set_model_version("g2")
    app = FastAPI()
    app.include_router(metrics_router(metrics.registry))
    text = TestClient(app).get("/metrics").text
    assert 'fedscan_inference_requests_total{outcome="ok"} 3.0' in text
    assert 'fedscan_inference_requests_total{outcome="error"} 1.0' in text
    assert 'fedscan_inference_latency_seconds_bucket{le="0.005"} 1.0' in text
    assert "fedscan_inference_latency_seconds_count 4.0" in text
    assert "fedscan_training_step 3.0" in text and "fedscan_training_paused 1.0" in text
    assert 'fedscan_training_pauses_total{reason="inference"} 1.0' in text
    assert 'fedscan_model_info{version="g2"} 1.0' in text and 'version="g1"' not in text
    assert f"fedscan_memory_percent {publisher.latest.memory_percent}" in text
    assert metrics.training_summary()["state"] == "paused"
    transport.close()

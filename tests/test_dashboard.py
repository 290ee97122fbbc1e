"""Fleet dashboard: self-contained page, JSON API, and the page rendered by headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from fleet_helpers import serve, wait_until
from mqtt_broker import Broker

from coordinator.dashboard import dashboard_router
from coordinator.fleet_view import FleetView
from edge_agent.metrics import AgentMetrics
from edge_agent.telemetry import TelemetryPublisher, TelemetrySampler
from protocol.messages import Status, Telemetry
from protocol.topics import Topics
from protocol.transport import MqttTransport

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SVG_NS = "http://www.w3.org/2000/svg"


def app_for(view: FleetView, **kw: object) -> FastAPI:
    app = FastAPI()
    app.include_router(dashboard_router(view, **kw))  # type: ignore[arg-type]
    return app


def test_page_is_self_contained_and_locked_down() -> None:
    client = TestClient(app_for(FleetView(Topics("d"))))
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert 'content="/dashboard/api/fleet"' in page.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(assets) == ["/dashboard/static/app.js", "/dashboard/static/style.css"]
    for asset in assets:
        r = client.get(asset)
        assert r.status_code == 200 and r.text
        # no CDN, no external fetch: the only absolute URL is the SVG namespace name
        assert re.findall(r"https?://[^\s\"'`)]+", r.text.replace(SVG_NS, "")) == []
    assert client.get("/dashboard/static/__init__.py").status_code == 404
    assert client.get("/dashboard/static/..%2F__init__.py").status_code == 404


def test_fleet_json_with_round_and_failing_rollout_callable() -> None:
    topics = Topics("d")
    view = FleetView(topics)
    view.handle(topics.status("box-1"), Status(state="online").to_bytes())
    view.handle(topics.telemetry("box-1"), Telemetry(cpu_percent=41.5, memory_percent=30.0).to_bytes())

    def rollout() -> dict[str, object]:
        raise RuntimeError("rollout store down")

    client = TestClient(app_for(view, round_info=lambda: {"round_id": 9, "state": "aggregating"}, rollout_info=rollout))
    data = client.get("/dashboard/api/fleet", params={"points": 5}).json()
    assert data["total"] == 1 and data["online"] == 1
    (agent,) = data["agents"]
    assert agent["agent"] == "box-1" and agent["cpu_percent"] == 41.5 and agent["history"]["cpu"] == [41.5]
    assert data["round"] == {"round_id": 9, "state": "aggregating"}
    assert data["rollout"] == {"error": "RuntimeError"}
    assert client.get("/dashboard/api/fleet", params={"points": -1}).status_code == 422


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install -y chromium)")
def test_dashboard_renders_live_agents_in_headless_chromium(broker: Broker, tmp_path: Path) -> None:
    topics = Topics("ui")
    view = FleetView(topics)
    coord = MqttTransport("coordinator", "127.0.0.1", broker.port, clean_session=True)
    view.attach(coord)
    coord.connect()
    agents = []
    for name, version in (("box-ct-01", "g12"), ("box-cxr-02", "g12"), ("box-derm-03", "g11")):
        t = MqttTransport(name, "127.0.0.1", broker.port, clean_session=True)
        t.connect()
        t.publish(topics.status(name), Status(state="online").to_bytes(), retain=True)
        m = AgentMetrics()
        m.set_model_version(version)
        m.training_started(round_id=4, steps_total=120)
        m.training_step_done(37, loss=0.41)
        sampler = TelemetrySampler(gpu=False, training=m.training_summary, model_version=m.model_version)
        p = TelemetryPublisher(sampler, t, topics.telemetry(name), period_s=0.2)
        p.start()
        agents.append((t, p))
    try:
        def three_samples_each() -> bool:
            snap = view.snapshot()
            return snap["total"] == 3 and all(len(a["history"]["cpu"]) >= 3 for a in snap["agents"])

        assert wait_until(three_samples_each, timeout=10)
        assert CHROMIUM is not None
        app = app_for(view, round_info=lambda: {"round_id": 4, "received": 2, "expected": 3},
                      rollout_info=lambda: {"version": "g12", "stage": "canary", "done": 2, "total": 3})
        shot = tmp_path / "dashboard.png"
        with serve(app) as url:
            proc = subprocess.run(
                [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,900",
                 "--virtual-time-budget=5000", "--dump-dom", url + "/dashboard"],
                capture_output=True, text=True, timeout=60,
            )
        assert proc.returncode == 0, proc.stderr[-2000:]
        dom = proc.stdout
        assert 'data-loaded="1"' in dom, "app.js did not render (fetch failed or script blocked)"
        assert '<div id="summary" class="big">3 / 3 online</div>' in dom
        assert '<span id="page" class="muted">1–3 of 3</span>' in dom  # the server pages: one page here
        row = re.search(r'<tr data-agent="box-cxr-02" data-online="true"[^>]*>(.*?)</tr>', dom, re.S)
        assert row, "known agent missing from the table"
        cells = dict(re.findall(r'<td class="(\w+)[^"]*">([^<]*)</td>', row.group(1)))
        assert re.fullmatch(r"\d{1,3}\.\d%", cells["cpu"]) and re.fullmatch(r"\d{1,3}\.\d%", cells["mem"])
        assert cells["model"] == "g12" and cells["training"] == "running 37/120"
        assert re.search(r'<tr data-agent="box-derm-03"[^>]*>.*?<td class="model">g11</td>', dom, re.S)
        assert dom.count('class="line cpu"') >= 4  # 3 sparklines + the detail chart
        assert re.search(r'data-series="cpu"></polyline>', dom) and "2 / 3" in dom  # chart, progress
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        for t, p in agents:
            p.stop()
            t.close()
        coord.close()

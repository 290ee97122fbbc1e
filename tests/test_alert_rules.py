"""Prometheus alert rules: promtool syntax and unit tests, and every metric they use really exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from coordinator.fleet_view import FleetView, fleet_registry
from protocol.messages import Shadow, Status, Telemetry
from protocol.topics import Topics

PROM = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install -y prometheus)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=PROM, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_check_rules() -> None:
    r = promtool("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 8 rules found" in r.stdout


@needs_promtool
def test_promtool_check_config() -> None:
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_alerts_fire_as_specified() -> None:
    """promtool unit tests: offline box, hot GPU, stuck (not paused) training, model version drift."""
    r = promtool("test", "rules", "alerts_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_required_alerts_exist_and_use_exported_metrics() -> None:
    rules = [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"FedscanBoxOffline", "FedscanGpuHot", "FedscanTrainingStuck", "FedscanModelVersionDrift"} <= names
    assert all(r["labels"]["severity"] in {"info", "warning", "critical"} and r["annotations"]["summary"] for r in rules)

    # A fleet view in which every series exists at least once.
    topics = Topics("alerts")
    view = FleetView(topics)
    view.handle(topics.status("box-1"), Status(state="online").to_bytes())
    view.handle(topics.shadow_desired("box-1"), Shadow(version="g2").to_bytes())
    view.handle(topics.shadow_reported("box-1"), Shadow(version="g1").to_bytes())
    view.handle(topics.telemetry("box-1"), Telemetry(
        cpu_percent=5, memory_percent=5, disk_percent=5, temperatures_c={"coretemp": 50.0},
        gpu=[{"index": 0, "util_percent": 10.0, "mem_percent": 3.0, "temp_c": 60.0, "power_w": 70.0}],
        inference={"requests": 3, "p95_ms": 20}, training={"state": "running", "step": 5}, model_version="g1",
    ).to_bytes())
    exported = set(re.findall(r"^(fedscan_\w+?)(?:\{| )", generate_latest(fleet_registry(view)).decode(), re.M))
    used = {m for r in rules for m in re.findall(r"\bfedscan_\w+", r["expr"])}
    assert used and used <= exported, f"rules use metrics the coordinator does not export: {used - exported}"

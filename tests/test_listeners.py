"""Listeners a hospital can deploy (issue 15 item 11): the DICOM listener and the HTTP API bind to
separate, configurable addresses (CLI flags or FEDSCAN_HTTP_HOST / FEDSCAN_DICOM_HOST), loopback by
default, and a bad address stops the start."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
from mqtt_broker import free_port
from typer.testing import CliRunner

from edge_agent.agent import AgentSettings, EdgeAgent
from edge_agent.listeners import ListenerConfigError, bind_host, is_loopback
from edge_agent.metrics import AgentMetrics
from edge_agent.store import LocalStore
from fedscan.cli import app
from fedscan.compose import AgentConfig, build_edge_services
from firmware.profile import find_profile
from protocol.transport import MemoryBroker, MemoryTransport


def _listening() -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def test_bind_addresses_are_validated() -> None:
    assert bind_host(" 10.1.2.3 ", "DICOM") == "10.1.2.3" and bind_host("::", "HTTP") == "::"
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    with pytest.raises(ListenerConfigError, match="not an IP address"):
        bind_host("scanner-net", "DICOM")


def test_the_dicom_listener_and_the_api_bind_where_each_is_told(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSCAN_API_TOKENS", "clinic:0123456789abcdef0123")
    profile = find_profile("xray-cxr-28")
    http_port, dicom_port = free_port(), free_port()
    # 127.0.0.2 stands for the imaging network's interface (all of 127/8 is this machine on Linux)
    cfg = AgentConfig(agent_id="box", broker="127.0.0.1:1", profile=profile, state_dir=tmp_path,
                      http_port=http_port, http_host="127.0.0.1", dicom_port=dicom_port, dicom_host="127.0.0.2",
                      dicom_aets=("SCANNER1",), telemetry=False, resource_gates=False)
    t = MemoryTransport(MemoryBroker(), "box")
    t.connect()
    agent = EdgeAgent(AgentSettings("box", profile, tmp_path), t, None)
    services = build_edge_services(cfg, agent, t, metrics=AgentMetrics(), store=LocalStore(tmp_path / "store"))  # type: ignore[arg-type]
    try:
        deadline = time.monotonic() + 20
        while ("127.0.0.1", http_port) not in _listening() and time.monotonic() < deadline:
            time.sleep(0.05)
        bound = _listening()
        assert ("127.0.0.2", dicom_port) in bound, bound
        assert ("127.0.0.1", http_port) in bound and ("127.0.0.1", dicom_port) not in bound
    finally:
        services.close()


def test_a_bad_bind_address_stops_the_agent_at_start(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["agent", "--id", "box", "--state", str(tmp_path), "--dicom-host", "scanners"],
                                env={"FEDSCAN_ENV": "development"})
    assert result.exit_code == 2 and "not an IP address" in result.output, result.output

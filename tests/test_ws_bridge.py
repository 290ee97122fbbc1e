"""MQTT over WebSockets + TLS through ``fedscan ws-bridge``, and through an HTTP CONNECT proxy."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fedproc import wait_for
from http_proxy import connect_proxy
from mqtt_broker import Broker, free_port
from typer.testing import CliRunner

from coordinator.pki import FleetPKI
from fedscan.cli import app
from fedscan.ws_bridge import Bridge, BridgeConfig, BridgeRefusal, connect_client_id
from protocol.broker_address import parse_broker_list, parse_proxy
from protocol.errors import Reason, TransportError
from protocol.transport import MqttTransport, TlsConfig


def _connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(var)]) + var


def test_connect_client_id_parses_and_refuses() -> None:
    assert connect_client_id(_connect_packet("site-1")) == "site-1"
    assert connect_client_id(_connect_packet("site-1") + b"\x82\x05more") == "site-1"
    with pytest.raises(BridgeRefusal) as info:
        connect_client_id(_connect_packet("site-1")[:6])
    assert info.value.reason is Reason.TRUNCATED
    for bad in (b"\x30\x02ab", b"\x10\x04\x00\x04HTTP", b"\x10\xff\xff\xff\xff\x01"):
        with pytest.raises(BridgeRefusal) as info:
            connect_client_id(bad)
        assert info.value.reason in (Reason.PROTOCOL_ERROR, Reason.TRUNCATED)


@contextlib.contextmanager
def running_bridge(cfg: BridgeConfig) -> Iterator[Bridge]:
    """The bridge on its own event loop in a thread, stopped afterwards."""
    bridge = Bridge(cfg)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: list[asyncio.Event] = []

    async def main() -> None:
        stop.append(asyncio.Event())
        ready = asyncio.Event()
        task = asyncio.ensure_future(bridge.serve(stop[0], ready))
        await ready.wait()
        started.set()
        await task

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10), "bridge did not start"
    try:
        yield bridge
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(10)


@pytest.fixture
def pki(tmp_path: Path) -> FleetPKI:
    p = FleetPKI.init(tmp_path / "pki", "lab")
    p.issue_server("bridge", hosts=("127.0.0.1", "localhost"))
    for name in ("box-1", "box-2"):
        p.issue_device(name)
    return p


def _tls(pki: FleetPKI, name: str) -> TlsConfig:
    paths = pki.paths(name)
    return TlsConfig(str(paths.ca), str(paths.cert), str(paths.key))


def _bridge_cfg(pki: FleetPKI, upstream: int, **kw: object) -> BridgeConfig:
    server = pki.paths("bridge")
    return BridgeConfig("127.0.0.1", free_port(), "127.0.0.1", upstream, tls_cert=server.cert, tls_key=server.key,
                        tls_ca=server.ca, **kw)  # type: ignore[arg-type]


def _round_trip(a: MqttTransport, b: MqttTransport) -> None:
    got: list[bytes] = []
    b.subscribe("fedscan/v1/t/agents/box-2/tasks", lambda _t, p: got.append(p))
    b.connect()
    a.connect()
    payload = bytes(range(256)) * 1200  # 300 KiB: one update chunk's worth, several WebSocket frames
    a.publish("fedscan/v1/t/agents/box-2/tasks", payload)
    wait_for(lambda: got == [payload], 20, "the message through the bridge")


def test_wss_with_client_certificates_through_the_bridge(tmp_path: Path, broker: Broker, pki: FleetPKI) -> None:
    cfg = _bridge_cfg(pki, broker.port)
    with running_bridge(cfg) as bridge:
        url = parse_broker_list(f"wss://127.0.0.1:{cfg.listen_port}/mqtt")
        a = MqttTransport("box-1", brokers=url, tls=_tls(pki, "box-1"), clean_session=True)
        b = MqttTransport("box-2", brokers=url, tls=_tls(pki, "box-2"), clean_session=True)
        try:
            _round_trip(a, b)
            assert bridge.connections == 2
        finally:
            a.close()
            b.close()


def test_bridge_refuses_a_borrowed_identity_a_wrong_path_and_no_certificate(
        tmp_path: Path, broker: Broker, pki: FleetPKI) -> None:
    cfg = _bridge_cfg(pki, broker.port)
    with running_bridge(cfg) as bridge:
        url = parse_broker_list(f"wss://127.0.0.1:{cfg.listen_port}/mqtt")
        impostor = MqttTransport("box-2", brokers=url, tls=_tls(pki, "box-1"), connect_attempts=1)
        with pytest.raises(TransportError):
            impostor.connect()
        impostor.close()
        assert bridge.refused.get("protocol_error") == 1 and bridge.connections == 0
        wrong = parse_broker_list(f"wss://127.0.0.1:{cfg.listen_port}/other")
        lost = MqttTransport("box-1", brokers=wrong, tls=_tls(pki, "box-1"), connect_attempts=1)
        with pytest.raises(TransportError, match=r"404|Not Found|handshake"):
            lost.connect()
        lost.close()
        anonymous = MqttTransport("box-1", brokers=url, tls=TlsConfig(str(pki.paths("box-1").ca)), connect_attempts=1)
        with pytest.raises(TransportError):
            anonymous.connect()
        anonymous.close()
        assert bridge.connections == 0


def test_agent_reaches_the_bridge_through_an_http_connect_proxy(tmp_path: Path, broker: Broker,
                                                                pki: FleetPKI) -> None:
    pytest.importorskip("socks", reason="--proxy needs PySocks (pip install pysocks; listed in pyproject)")
    cfg = _bridge_cfg(pki, broker.port)
    target = f"127.0.0.1:{cfg.listen_port}"
    with running_bridge(cfg) as bridge, connect_proxy(allow={target}) as proxy:
        url = parse_broker_list(f"wss://127.0.0.1:{cfg.listen_port}/mqtt")
        via = parse_proxy(f"http://127.0.0.1:{proxy.port}")
        a = MqttTransport("box-1", brokers=url, tls=_tls(pki, "box-1"), proxy=via, clean_session=True)
        b = MqttTransport("box-2", brokers=url, tls=_tls(pki, "box-2"), clean_session=True)
        try:
            _round_trip(a, b)
        finally:
            a.close()
            b.close()
        assert proxy.seen == [target] and bridge.connections == 2
        direct = MqttTransport("box-1", host="127.0.0.1", port=broker.port, proxy=via, connect_attempts=1)
        with pytest.raises(TransportError):  # the proxy's policy allows only the bridge
            direct.connect()
        direct.close()
        assert proxy.refused == [f"127.0.0.1:{broker.port}"]


def test_ws_bridge_cli_refuses_bad_settings(tmp_path: Path) -> None:
    runner = CliRunner()
    for args, fragment in (
        ([], "--tls-cert and --tls-key are required"),
        (["--plain", "--tls-ca", str(tmp_path / "ca.crt")], "--plain takes no TLS files"),
        (["--tls-cert", str(tmp_path / "c"), "--tls-key", str(tmp_path / "k")], "not found"),
        (["--listen", "0.0.0.0", "--plain"], "HOST:PORT"),
        (["--plain", "--path", "mqtt"], "--path must start"),
    ):
        result = runner.invoke(app, ["ws-bridge", *args])
        assert result.exit_code == 2, (args, result.output)
        assert fragment in result.output, (args, result.output)

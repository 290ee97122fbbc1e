"""Issue 15 items 5 (transport part) and 6: plain MQTT only to loopback unless allowed; bounded publish state."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mqtt_broker import Broker
from typer.testing import CliRunner

from fedscan.cli import EXIT_CONFIG, app
from protocol.errors import TransportError
from protocol.transport import MqttTransport, TlsConfig, check_plaintext, is_loopback


@pytest.mark.parametrize("host", ["10.1.2.3", "broker.hospital.example", "203.0.113.7", "0.0.0.0"])
def test_plain_mqtt_beyond_loopback_is_refused_before_any_socket(host: str) -> None:
    with pytest.raises(TransportError) as info:
        MqttTransport("box-1", host, 1883)
    assert info.value.reason == "plaintext_refused"
    MqttTransport("box-1", host, 1883, allow_plaintext=True).close()  # explicit development opt-in
    check_plaintext(host, tls=TlsConfig(ca_file="fleet-ca.pem"), allow_plaintext=False)  # TLS: the normal way


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "::1", "[::1]"])
def test_loopback_brokers_need_no_opt_in(host: str) -> None:
    assert is_loopback(host)
    MqttTransport("box-1", host, 1883).close()


def test_the_cli_flag_is_refused_outside_development(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDSCAN_ENV", raising=False)
    r = CliRunner().invoke(app, ["agent", "--id", "box-1", "--state", str(tmp_path), "--insecure-plaintext-mqtt"])
    assert r.exit_code == EXIT_CONFIG and "FEDSCAN_ENV=development" in r.output


def test_the_cli_refuses_plain_mqtt_to_a_remote_broker_as_a_config_error(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["coordinator", "--state", str(tmp_path), "--broker", "203.0.113.7:1883",
                                 "--rounds", "1", "--no-export"])
    assert r.exit_code == EXIT_CONFIG, r.output
    assert "plaintext_refused" in r.output


def test_publishes_never_drained_stay_bounded(broker: Broker) -> None:
    """A coordinator publishes acks, tasks and chunks for ever and never calls ``drain``."""
    t = MqttTransport("coordinator", "127.0.0.1", broker.port)
    t.connect()
    try:
        n = 5000
        for i in range(n):
            t.publish(f"fedscan/v1/test/agents/a{i % 7}/acks", b"x" * 64)
        deadline = time.monotonic() + 30
        while t.pending_count > 600 and time.monotonic() < deadline:
            t.publish("fedscan/v1/test/agents/a0/acks", b"y")  # publishing prunes what the broker acknowledged
            time.sleep(0.01)
        assert t.pending_count <= 600, t.pending_count  # before the fix: every one of the 5000 handles
        assert t.drain(timeout=30)
        assert t.pending_count == 0
    finally:
        t.close()

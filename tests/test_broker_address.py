"""``--broker`` lists and URLs, ``--proxy``, where a client starts in a list, and the reconnect backoff."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.broker_address import (
    BrokerAddress,
    BrokerAddressError,
    BrokerScheme,
    backoff_delay,
    parse_broker_list,
    parse_proxy,
    start_index,
)
from protocol.errors import Reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:1883", BrokerAddress(BrokerScheme.MQTT, "127.0.0.1", 1883)),
        ("broker.lan:11883", BrokerAddress(BrokerScheme.MQTT, "broker.lan", 11883)),
        ("[::1]:1883", BrokerAddress(BrokerScheme.MQTT, "::1", 1883)),
        ("mqtt://b", BrokerAddress(BrokerScheme.MQTT, "b", 1883)),
        ("mqtts://b", BrokerAddress(BrokerScheme.MQTTS, "b", 8883)),
        ("wss://fedscan.hospital.org/mqtt", BrokerAddress(BrokerScheme.WSS, "fedscan.hospital.org", 443, "/mqtt")),
        ("wss://h:8443/ws/fleet", BrokerAddress(BrokerScheme.WSS, "h", 8443, "/ws/fleet")),
        ("ws://h", BrokerAddress(BrokerScheme.WS, "h", 80, "/mqtt")),
        ("WSS://H:443", BrokerAddress(BrokerScheme.WSS, "h", 443, "/mqtt")),
    ],
)
def test_one_address(text: str, expected: BrokerAddress) -> None:
    brokers = parse_broker_list(text)
    assert brokers.addresses == (expected,)


def test_a_cluster_list_keeps_its_order_and_prints_back() -> None:
    brokers = parse_broker_list("10.0.0.1:1883, 10.0.0.2:1883,10.0.0.3:1883")
    assert [a.host for a in brokers.addresses] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert str(brokers) == "10.0.0.1:1883,10.0.0.2:1883,10.0.0.3:1883"
    assert [brokers.after(i) for i in range(3)] == [1, 2, 0]
    wss = parse_broker_list("wss://a/mqtt,wss://b:8443/mqtt")
    assert wss.scheme is BrokerScheme.WSS and wss.scheme.tls and wss.scheme.websockets
    assert str(wss) == "wss://a:443/mqtt,wss://b:8443/mqtt"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty broker address"),
        ("a:1883,,b:1883", "empty broker address"),
        ("localhost", "HOST:PORT"),
        (":1883", "HOST:PORT"),
        ("h:0", "1-65535"),
        ("h:99999", "1-65535"),
        ("h:mqtt", "1-65535"),
        ("http://h:80", "scheme must be"),
        ("wss://user:pw@h/mqtt", "credentials"),
        ("wss://h/mqtt?x=1", "credentials"),
        ("mqtts://h:8883/path", "only ws:// and wss://"),
        ("wss:///mqtt", "names no host"),
        ("wss://h:70000/mqtt", "1-65535"),
        ("a:1883,wss://b/mqtt", "mixes schemes"),
        ("a:1883,a:1883", "twice"),
    ],
)
def test_bad_addresses_are_refused_with_a_reason(text: str, fragment: str) -> None:
    with pytest.raises(BrokerAddressError, match=fragment) as info:
        parse_broker_list(text)
    assert info.value.reason is Reason.BAD_CONFIG and isinstance(info.value, ValueError)


def test_proxy() -> None:
    with pytest.raises(BrokerAddressError):
        parse_broker_list("wss://h:0/mqtt")
    assert (parse_proxy("http://proxy.hospital.org:3128").host, parse_proxy("http://p:8080").port) == (
        "proxy.hospital.org", 8080)
    assert parse_proxy("http://p").port == 3128
    for bad in ("socks5://p:1080", "p:3128", "http://u:pw@p:3128", "http://p:3128/x", "http://p:0"):
        with pytest.raises(BrokerAddressError):
            parse_proxy(bad)


def test_start_index_is_stable_and_spreads_a_fleet() -> None:
    assert start_index("site-1", 3) == start_index("site-1", 3)
    counts = Counter(start_index(f"box-{i:04d}", 3) for i in range(3000))
    assert set(counts) == {0, 1, 2} and min(counts.values()) > 900, counts
    assert start_index("anything", 1) == 0
    with pytest.raises(ValueError):
        start_index("x", 0)


@given(st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_backoff_is_bounded_and_never_spins(attempt: int, seed: int) -> None:
    d = backoff_delay(attempt, base=0.5, cap=8.0, rng=random.Random(seed))
    assert 0.25 <= d <= min(8.0, 0.5 * 2 ** (attempt - 1)) or d == 0.25


def test_backoff_is_jittered() -> None:
    rng = random.Random(0)
    draws = {round(backoff_delay(5, base=0.5, cap=8.0, rng=rng), 3) for _ in range(50)}
    assert len(draws) > 40, "a fleet reconnecting after a node dies must not come back in one wave"
    with pytest.raises(ValueError):
        backoff_delay(0, base=0.5, cap=8.0, rng=rng)


def test_cli_refuses_a_bad_broker_list_with_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from coordinator.keys import ensure_signing_key, trust_path
    from fedscan.cli import app

    ensure_signing_key(tmp_path / "coord")
    for flag, value, fragment in (("--broker", "a:1883,wss://b/mqtt", "mixes schemes"),
                                  ("--proxy", "socks5://p:1080", "HTTP CONNECT proxy")):
        result = CliRunner().invoke(app, ["agent", "--id", "site-x", flag, value, "--state", str(tmp_path / "s"),
                                          "--trust", str(trust_path(tmp_path / "coord"))])
        assert result.exit_code == 2, result.output
        assert fragment in result.output

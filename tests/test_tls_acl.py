"""Mutual TLS + topic ACLs against a real mosquitto running the shipped config.

The broker runs ``deploy/mosquitto/mosquitto-tls.conf`` (only listener port and file paths
changed, see ``coordinator.acl.render_broker_config``) with an ACL generated from a real state
store, and certificates from ``coordinator.pki``. Every "refused" below is checked against a
positive control that uses the same helper and succeeds.

"Never reaches a subscriber" is shown without long sleeps: after a forbidden publish, the same
client publishes an allowed *barrier* message on the same connection; the broker forwards one
client's messages to a subscriber in order, so once the barrier arrives the forbidden message
would already have arrived had it been forwarded.
"""

from __future__ import annotations

import datetime as dt
import os
import queue
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mqtt_broker import free_port, wait_port
from paho.mqtt.reasoncodes import ReasonCode

from coordinator.acl import DEPLOY_CONF, acl_from_store, render_broker_config, write_acl
from coordinator.pki import CertPaths, FleetPKI, fingerprint
from coordinator.store import open_store
from protocol.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FLEET = "lab"
T = Topics(FLEET)
WAIT = 3.0  # upper bound for anything that must happen
QUIET = 0.4  # how long we listen for something that must NOT happen (without a barrier)


class Refused(Exception):
    pass


@dataclass
class Peer:
    """A paho MQTT v5 client over TLS, recording messages, SUBACK and PUBACK reason codes."""

    port: int
    ca: Path
    cert: CertPaths | None
    client_id: str
    messages: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)
    suback: dict[int, list[ReasonCode]] = field(default_factory=dict)
    puback: dict[int, ReasonCode] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set(
            ca_certs=str(self.ca),
            certfile=str(self.cert.cert) if self.cert else None,
            keyfile=str(self.cert.key) if self.cert else None,
        )
        self._connected = threading.Event()
        self._closed = threading.Event()
        self._acked = threading.Condition()
        self.connack: ReasonCode | None = None
        self.assigned_id: str | None = None
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = lambda *a: self._closed.set()

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        self.connack = rc
        if props is not None and getattr(props, "AssignedClientIdentifier", None):
            self.assigned_id = props.AssignedClientIdentifier
        self._connected.set()

    def _on_subscribe(self, c: Any, u: Any, mid: int, rcs: list[ReasonCode], props: Any) -> None:
        with self._acked:
            self.suback[mid] = rcs
            self._acked.notify_all()

    def _on_publish(self, c: Any, u: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        with self._acked:
            self.puback[mid] = rc
            self._acked.notify_all()

    def connect(self) -> Peer:
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except (ssl.SSLError, OSError) as exc:
            raise Refused(f"TLS handshake refused: {exc!r}") from exc
        self.client.loop_start()
        # TLS 1.3: the client's handshake completes before the broker checks the client
        # certificate, so a refusal shows as the connection closing before any CONNACK.
        deadline = time.monotonic() + WAIT
        while not self._connected.is_set() and not self._closed.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._connected.is_set():
            self.close()
            raise Refused("connection closed before CONNACK")
        if self.connack is None or self.connack.is_failure:
            self.close()
            raise Refused(f"CONNACK {self.connack}")
        return self

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, topic: str) -> list[ReasonCode]:
        _rc, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        with self._acked:
            assert self._acked.wait_for(lambda: mid in self.suback, WAIT), "no SUBACK"
            return self.suback[mid]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._acked:
            assert self._acked.wait_for(lambda: info.mid in self.puback, WAIT), "no PUBACK"
            return self.puback[info.mid]

    def expect(self, payload: bytes, timeout: float = WAIT) -> list[tuple[str, bytes]]:
        """Collect messages until ``payload`` arrives; return everything received before it too."""
        seen: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            seen.append(item)
            if item[1] == payload:
                return seen
        raise AssertionError(f"{payload!r} did not arrive within {timeout}s; got {seen}")

    def drain(self, quiet: float = QUIET) -> list[tuple[str, bytes]]:
        time.sleep(quiet)
        out = []
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out


@dataclass
class Fleet:
    port: int
    pki: FleetPKI
    foreign: FleetPKI
    log: Path
    proc: subprocess.Popen[bytes]

    def peer(self, name: str, cert: CertPaths | None = None, client_id: str | None = None) -> Peer:
        return Peer(self.port, self.pki.ca_path, cert if cert is not None else self.pki.paths(name),
                    client_id or name)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    import shutil

    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto binary not installed")
    tmp = tmp_path_factory.mktemp("tls")
    pki = FleetPKI.init(tmp / "pki", FLEET)
    pki.issue_server("broker", hosts=["127.0.0.1", "localhost"])
    pki.issue_coordinator()
    now = dt.datetime.now(dt.UTC)
    store = open_store(f"sqlite:///{tmp / 'state.db'}")
    for agent in ("a1", "a2", "revoked1", "expired1"):
        if agent == "expired1":
            paths = pki.issue_device(agent, not_before=now - dt.timedelta(days=30),
                                     not_after=now - dt.timedelta(days=1))
        else:
            paths = pki.issue_device(agent)
        store.enroll_agent(agent, profile="cxr-jetson", tags=["test"], cert_fingerprint=fingerprint(paths.cert))
    pki.issue_device("stranger")  # signed by the fleet CA but never enrolled
    pki.revoke("revoked1")
    foreign = FleetPKI.init(tmp / "foreign", FLEET)
    foreign.issue_device("a1")  # same CN as a valid agent, other CA
    acl = write_acl(tmp / "acl", acl_from_store(store, FLEET, observers=["auditor"]))
    pki.issue("auditor", "admin")
    (tmp / "state").mkdir()
    port = free_port()
    extra = "user root\n" if os.geteuid() == 0 else ""  # mosquitto drops to `mosquitto` as root
    conf = tmp / "mosquitto.conf"
    conf.write_text(render_broker_config(DEPLOY_CONF.read_text(), port=port, pki_dir=pki.root, acl_file=acl,
                                         state_dir=tmp / "state", extra=extra))
    log = tmp / "mosquitto.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_port(port, 5)
        yield Fleet(port, pki, foreign, log, proc)
    finally:
        proc.kill()
        proc.wait(5)
        store.close()


@pytest.fixture
def coordinator(fleet: Fleet) -> Iterator[Peer]:
    """The coordinator, subscribed to the whole fleet tree."""
    peer = fleet.peer("coordinator").connect()
    assert all(not rc.is_failure for rc in peer.subscribe(f"{T.prefix}/#"))
    yield peer
    peer.close()


def test_shipped_config_is_strict() -> None:
    text = DEPLOY_CONF.read_text()
    for line in ("require_certificate true", "use_identity_as_username true", "use_username_as_clientid true",
                 "allow_anonymous false", "crlfile ", "acl_file ", "max_queued_messages ",
                 "message_size_limit ", "max_inflight_messages "):
        assert any(ln.strip().startswith(line) for ln in text.splitlines()), line
    listeners = [ln for ln in text.splitlines() if ln.startswith("listener")]
    assert listeners == ["listener 8883 0.0.0.0"]  # one TLS listener, no plain-text port


def test_pki_files_and_key_modes(fleet: Fleet) -> None:
    for name in ("a1", "broker", "coordinator"):
        p = fleet.pki.paths(name)
        assert p.key.stat().st_mode & 0o777 == 0o600
    assert (fleet.pki.root / "ca.key").stat().st_mode & 0o777 == 0o600
    assert fleet.pki.is_revoked(fleet.pki.paths("revoked1").cert)
    assert not fleet.pki.is_revoked(fleet.pki.paths("a1").cert)


def test_valid_agent_publishes_own_topics_and_receives_own_task(fleet: Fleet, coordinator: Peer) -> None:
    agent = fleet.peer("a1").connect()
    try:
        for topic in (T.tasks("a1"), T.acks("a1"), T.shadow_desired("a1"), T.downloads("a1"),
                      f"{T.prefix}/models/#", T.coordinator_status()):
            assert not agent.subscribe(topic)[0].is_failure, topic
        uplinks = {
            T.status("a1"): b"online",
            T.telemetry("a1"): b"telemetry",
            T.shadow_reported("a1"): b"reported",
            T.updates("a1", 7): b"update-chunk",
            T.model_request("a1"): b"model-request",
            T.events("a1"): b"event",
        }
        for topic, payload in uplinks.items():
            assert not agent.publish(topic, payload).is_failure, topic
        got = coordinator.expect(b"event")
        assert {(t, p) for t, p in got} >= set(uplinks.items())

        downlinks = {T.tasks("a1"): b"task-for-a1", T.acks("a1"): b"ack", T.shadow_desired("a1"): b"desired",
                     T.downloads("a1"): b"download", T.coordinator_status(): b"online"}
        for topic, payload in downlinks.items():
            assert not coordinator.publish(topic, payload).is_failure
        assert not coordinator.publish(T.model_manifest("v3"), b"manifest-v3").is_failure
        got = agent.expect(b"manifest-v3")
        assert {(t, p) for t, p in got} >= set(downlinks.items())
    finally:
        agent.close()


def test_client_without_certificate_is_refused(fleet: Fleet) -> None:
    peer = Peer(fleet.port, fleet.pki.ca_path, None, "a1")
    with pytest.raises(Refused):
        peer.connect()


def test_certificate_from_another_ca_is_refused(fleet: Fleet) -> None:
    with pytest.raises(Refused):
        fleet.peer("a1", cert=fleet.foreign.paths("a1")).connect()


def test_revoked_certificate_is_refused(fleet: Fleet) -> None:
    with pytest.raises(Refused):
        fleet.peer("revoked1").connect()


def test_expired_certificate_is_refused(fleet: Fleet) -> None:
    with pytest.raises(Refused):
        fleet.peer("expired1").connect()


def test_not_enrolled_cn_can_neither_publish_nor_receive(fleet: Fleet, coordinator: Peer) -> None:
    """A CN signed by the fleet CA but absent from the registry: TLS accepts it, the ACL gives it
    nothing. Every publish is refused (PUBACK "Not authorized") and never reaches the
    coordinator; mosquitto's ACL file grants SUBSCRIBE packets but checks read access per message,
    so nothing is ever delivered to it, not even the models every agent may read."""
    stranger = fleet.peer("stranger").connect()
    a1 = fleet.peer("a1").connect()
    try:
        for topic in (T.tasks("stranger"), f"{T.prefix}/models/#", f"{T.prefix}/#", "#"):
            stranger.subscribe(topic)
        assert not a1.subscribe(f"{T.prefix}/models/#")[0].is_failure  # positive control
        for topic in (T.status("stranger"), T.updates("stranger", 1), T.status("a1"), T.updates("a1", 1)):
            rc = stranger.publish(topic, b"from-stranger")
            assert rc.getName() == "Not authorized", (topic, rc)
        coordinator.publish(T.tasks("stranger"), b"task-for-stranger")
        coordinator.publish(T.coordinator_status(), b"online")
        coordinator.publish(T.model_manifest("v9"), b"manifest-v9")
        a1.expect(b"manifest-v9")  # an enrolled agent got the model ...
        assert stranger.drain() == []  # ... the stranger got nothing at all
        assert [m for m in coordinator.drain() if m[1] == b"from-stranger"] == []
    finally:
        stranger.close()


def test_agent_cannot_publish_into_or_read_another_agents_topics(fleet: Fleet, coordinator: Peer) -> None:
    a1 = fleet.peer("a1").connect()
    a2 = fleet.peer("a2").connect()
    try:
        assert not a2.subscribe(T.tasks("a2"))[0].is_failure
        assert not a2.subscribe(T.shadow_desired("a2"))[0].is_failure
        # a1 forges a2's uplinks and downlinks: every one is refused by the broker ...
        forged = [T.status("a2"), T.updates("a2", 7), T.events("a2"), T.tasks("a2"), T.shadow_desired("a2"),
                  T.downloads("a2"), T.model_manifest("v666"), T.model_chunks("v666"), T.coordinator_status(),
                  T.tasks("a1"), T.acks("a1"), T.downloads("a1")]
        for topic in forged:
            assert a1.publish(topic, b"forged").getName() == "Not authorized", topic
        # ... and, barrier on the same connection, never forwarded to anyone
        a1.publish(T.status("a1"), b"barrier-a1")
        before = coordinator.expect(b"barrier-a1")
        assert [m for m in before if m[1] == b"forged"] == []
        coordinator.publish(T.tasks("a2"), b"barrier-coordinator")
        assert [m for m in a2.expect(b"barrier-coordinator") if m[1] == b"forged"] == []

        # a1 cannot read a2's task, not by name and not through a wildcard (mosquitto grants the
        # SUBSCRIBE and checks read access on every message it would deliver)
        a1.subscribe(T.tasks("a2"))
        a1.subscribe(f"{T.prefix}/agents/+/tasks")
        a1.subscribe(f"{T.prefix}/#")
        a1.subscribe(T.tasks("a1"))
        coordinator.publish(T.tasks("a2"), b"secret-task-for-a2")
        coordinator.publish(T.tasks("a1"), b"barrier-task-a1")
        seen = a1.expect(b"barrier-task-a1")
        assert [m for m in seen if m[1] == b"secret-task-for-a2"] == []
        assert (T.tasks("a2"), b"secret-task-for-a2") in a2.expect(b"secret-task-for-a2")
    finally:
        a1.close()
        a2.close()


def test_client_id_is_forced_to_the_certificate_cn(fleet: Fleet, coordinator: Peer) -> None:
    """a1 connecting with client id "a2" neither becomes a2 nor kicks a2's session off."""
    a2 = fleet.peer("a2").connect()
    spoof = fleet.peer("a1", client_id="a2").connect()
    try:
        assert spoof.publish(T.status("a2"), b"spoofed").getName() == "Not authorized"
        assert not spoof.publish(T.status("a1"), b"still-a1").is_failure
        coordinator.expect(b"still-a1")
        assert a2.client.is_connected()
        assert not a2.publish(T.status("a2"), b"a2-alive").is_failure
        coordinator.expect(b"a2-alive")
    finally:
        spoof.close()
        a2.close()


def test_revocation_takes_effect_on_sighup(fleet: Fleet) -> None:
    """Revoke a2, rewrite the CRL, SIGHUP mosquitto: a2 can no longer connect (a1 still can)."""
    fleet.peer("a2").connect().close()
    fleet.pki.revoke("a2")
    fleet.proc.send_signal(1)  # SIGHUP: mosquitto reloads certificates, CRL and ACL
    deadline = time.monotonic() + WAIT
    while True:
        try:
            fleet.peer("a2").connect().close()
        except Refused:
            break
        assert time.monotonic() < deadline, "revoked a2 still connects after SIGHUP"
        time.sleep(0.1)
    fleet.peer("a1").connect().close()

"""Transport interface, the paho-mqtt implementation and its in-memory twin.

Handlers never run on paho's network thread: callbacks only enqueue, and one dispatcher
thread per transport calls the handlers in arrival order. Every publish and subscribe return
code is checked. The paho client uses the VERSION2 callback API, MQTT 3.1.1 (the embedded
broker speaks only that), persistent sessions (``clean_session=False``), QoS 1 by default,
a retained status topic with a Last Will, and reconnects by itself with jittered, bounded
backoff. Payload bytes are counted per direction for the traffic report.

A transport is given one broker or a cluster (``protocol.broker_address.BrokerList``): it
starts at an address picked by its client id and, whenever the connection is lost or a try
fails, moves to the next address after a jittered backoff (paho's own reconnect loop does the
reconnecting; the callbacks only point it at the next host). MQTT may travel over TCP, TLS,
or WebSockets (``ws://``/``wss://``, e.g. through a hospital firewall that opens only 443),
optionally through an HTTP ``CONNECT`` proxy (PySocks, paho's own proxy support).

Plain (non-TLS) MQTT is used only towards a loopback broker unless the caller passes
``allow_plaintext=True`` (the CLI's development-only ``--insecure-plaintext-mqtt``): anything else
is refused with ``TransportError`` ``plaintext_refused`` before a socket opens (``mqtts://`` and
``wss://`` addresses are TLS). Memory stays bounded in long-running processes: the handles of
QoS>0 publishes are kept only until the broker acknowledges them (pruned as more are published),
so a coordinator that never calls ``drain`` does not grow.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol.broker_address import BrokerAddress, BrokerList, BrokerScheme, ProxyAddress, backoff_delay, start_index
from protocol.dispatch import Dispatcher, Handler, TrafficCounter, topic_matches
from protocol.errors import Reason, TransportError
from protocol.memory_transport import MemoryBroker, MemoryTransport

__all__ = [
    "Handler",
    "MemoryBroker",
    "MemoryTransport",
    "MqttTransport",
    "TlsConfig",
    "TrafficCounter",
    "Transport",
    "check_plaintext",
    "is_loopback",
    "topic_matches",
]

log = logging.getLogger(__name__)

_PRUNE_MIN = 256  # acknowledged publish handles are dropped once this many are kept


@dataclass(frozen=True)
class TlsConfig:
    """The fleet CA (to verify the broker) and, for mutual TLS, this client's certificate and key."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def from_paths(cls, ca: Path | None, cert: Path | None, key: Path | None) -> TlsConfig | None:
        """Mutual-TLS settings from CLI paths: all three (each an existing file), or none.

        ``None`` means plain TCP (a loopback broker only). Anything else is a ``ValueError`` naming the problem.
        """
        given = [p is not None for p in (ca, cert, key)]
        if not any(given):
            return None
        if not all(given):
            raise ValueError("--tls-ca, --tls-cert and --tls-key go together")
        files = [p for p in (ca, cert, key) if p is not None]
        for p in files:
            if not p.is_file():
                raise ValueError(f"TLS file {p} does not exist")
        return cls(*(str(p) for p in files))


class Transport(Protocol):
    """What agents and the coordinator need of a broker connection (paho client or in-memory twin)."""

    traffic: TrafficCounter

    def connect(self) -> None:
        """Connect, or raise ``TransportError``."""

    def close(self) -> None:
        """Disconnect and stop delivering."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish one message."""

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        """Call ``handler(topic, payload)`` for each message matching ``topic_filter``."""

    @property
    def connected(self) -> bool:
        """Whether the connection is up."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine without leaving it: ``localhost`` or a loopback address.

    Other names are not resolved (a name that resolves to loopback today may not tomorrow).
    """
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_plaintext(host: str, *, tls: TlsConfig | None, allow_plaintext: bool, encrypted: bool = False) -> None:
    """Refuse plain MQTT to a broker beyond this machine unless explicitly allowed.

    ``encrypted``: the address itself asks for TLS (``mqtts://``, ``wss://``).
    """
    if tls is None and not encrypted and not allow_plaintext and not is_loopback(host):
        raise TransportError(
            f"plain MQTT to {host} would send updates and models unencrypted: configure TLS (--tls-ca, --tls-cert, "
            "--tls-key, or an mqtts:// / wss:// address) or, for development only, --insecure-plaintext-mqtt",
            reason=Reason.PLAINTEXT_REFUSED)


class MqttTransport:
    """paho-mqtt client wrapper. ``connect`` retries a bounded number of times, then raises.

    ``host``/``port`` name a single plain-MQTT broker; ``brokers`` (which wins) names one broker
    or a cluster by URL, including WebSockets; ``proxy`` tunnels through an HTTP proxy.
    """

    def __init__(
        self,
        client_id: str,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        brokers: BrokerList | None = None,
        proxy: ProxyAddress | None = None,
        will: tuple[str, bytes] | None = None,
        clean_session: bool = False,
        tls: TlsConfig | None = None,
        keepalive: int = 15,
        connect_attempts: int = 5,
        max_backoff: float = 8.0,
        max_queued: int = 100_000,
        rng: random.Random | None = None,
        allow_plaintext: bool = False,
    ) -> None:
        """Configure the client (nothing is sent before :meth:`connect`); see the module for ``allow_plaintext``."""
        self.client_id = client_id
        self.brokers = brokers or BrokerList((BrokerAddress(BrokerScheme.MQTT, host, port),))
        for addr in self.brokers.addresses:
            check_plaintext(addr.host, tls=tls, allow_plaintext=allow_plaintext, encrypted=addr.scheme.tls)
        self._index = start_index(client_id, len(self.brokers))
        self.keepalive = keepalive
        self.connect_attempts = max(connect_attempts, len(self.brokers))
        self.max_backoff = max_backoff
        self.traffic = TrafficCounter()
        self._rng = rng or random.Random()
        self._failures = 0  # consecutive failed tries since the last CONNACK (drives the backoff)
        self._connected = threading.Event()
        self._started = False  # paho's thread owns the connection (reconnects, failovers) once True
        self._closing = False
        self._dispatch = Dispatcher(client_id)
        self._sub_qos: dict[str, int] = {}
        self._pending: list[mqtt.MQTTMessageInfo] = []  # QoS>0 publishes not known to be acknowledged
        self._pending_lock = threading.Lock()
        self._prune_at = _PRUNE_MIN
        self._acked = 0  # PUBACKs (and QoS 0 sends) since the last prune
        scheme = self.brokers.scheme
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            transport="websockets" if scheme.websockets else "tcp",
        )
        self._client.max_queued_messages_set(max_queued)
        self._client.max_inflight_messages_set(64)
        self._client.reconnect_delay_set(min_delay=1, max_delay=int(max_backoff))
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        if tls is not None:
            self._client.tls_set(
                ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file, tls_version=ssl.PROTOCOL_TLS_CLIENT
            )
        elif scheme.tls:  # mqtts:// or wss:// without a fleet CA: the system's trusted CAs
            self._client.tls_set(tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if proxy is not None:
            _set_proxy(self._client, proxy)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish

    @property
    def address(self) -> BrokerAddress:
        """The broker address the client is connected to, or tries next."""
        return self.brokers.addresses[self._index]

    @property
    def host(self) -> str:
        """Host of the current broker address."""
        return self.address.host

    @property
    def port(self) -> int:
        """Port of the current broker address."""
        return self.address.port

    def _fail_over(self, why: str) -> None:
        """After a loss or a failed try: aim paho at the next address, with a jittered backoff.

        Runs on paho's network thread once the socket is closed. ``connect_async`` only records the
        next host and port (no I/O); paho's reconnect loop then waits the delay and connects there,
        keeping the session state (queued QoS-1 messages, subscriptions renewed in ``_on_connect``).
        """
        self._failures += 1
        previous = self.address
        if len(self.brokers) > 1:
            self._index = self.brokers.after(self._index)
            addr = self.address
            if addr.scheme.websockets:
                self._client.ws_set_options(path=addr.path)
            self._client.connect_async(addr.host, addr.port, keepalive=self.keepalive)
        delay = backoff_delay(self._failures, base=0.5, cap=self.max_backoff, rng=self._rng)
        # paho annotates the delays as int but computes with float seconds; the jitter needs fractions
        self._client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]
        log.warning("mqtt %s: %s at %s; next try %s in %.1f s", self.client_id, why, previous, self.address, delay)

    # -- paho callbacks: enqueue / flag only ------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("mqtt %s: connection refused: %s", self.client_id, reason)
            return
        for f, qos in list(self._sub_qos.items()):
            rc, _ = client.subscribe(f, qos)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                log.warning("mqtt %s: re-subscribe %s failed rc=%s", self.client_id, f, rc)
        self._failures = 0
        self._connected.set()
        log.info("mqtt %s connected to %s", self.client_id, self.address)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
                       ) -> None:
        self._connected.clear()
        if self._started and not self._closing:
            self._fail_over(f"disconnected ({reason})")

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        if self._started and not self._closing:
            self._fail_over("connection failed")

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: object, props: object) -> None:
        with self._pending_lock:
            self._acked += 1

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.traffic.received(len(msg.payload))
        self._dispatch.put(msg.topic, bytes(msg.payload))

    # -- API ------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether a CONNACK was received and the connection has not been lost since."""
        return self._connected.is_set()

    def connect(self) -> None:
        """Connect, trying the addresses in turn with jittered exponential backoff.

        Each try runs paho's network loop by hand until the CONNACK; only a connected client hands
        its socket to paho's thread, whose reconnects (and failovers) start from then on. Raise
        ``TransportError`` after ``connect_attempts`` tries (at least one per address).
        """
        last: Exception | None = None
        for attempt in range(1, self.connect_attempts + 1):
            addr = self.address
            try:
                if addr.scheme.websockets:
                    self._client.ws_set_options(path=addr.path)
                self._client.connect(addr.host, addr.port, keepalive=self.keepalive)
                deadline = time.monotonic() + 10
                while not self._connected.is_set() and time.monotonic() < deadline:
                    rc = self._client.loop(timeout=0.2)
                    if rc != mqtt.MQTT_ERR_SUCCESS:
                        raise ConnectionError(f"connection refused or closed: {mqtt.error_string(rc)}")
                if self._connected.is_set():
                    self._started = True
                    self._client.loop_start()
                    return
                last = TimeoutError("no CONNACK within 10 s (refused or not an MQTT broker)")
            except (OSError, ValueError) as exc:
                last = exc
            log.warning(
                "mqtt %s: broker %s unreachable (attempt %d/%d): %s",
                self.client_id, addr, attempt, self.connect_attempts, last,
            )
            self._index = self.brokers.after(self._index)
            if attempt < self.connect_attempts:
                time.sleep(backoff_delay(attempt, base=0.25, cap=self.max_backoff, rng=self._rng))
        raise TransportError(f"MQTT broker {self.brokers} unreachable after {self.connect_attempts} attempts: {last}")

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a connection; whether there is one."""
        return self._connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish; while disconnected paho queues QoS>0 messages and sends them after reconnecting."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        # MQTT_ERR_NO_CONN: paho keeps QoS>0 messages queued and sends them after reconnecting.
        self.traffic.sent(len(payload))
        if qos > 0:
            with self._pending_lock:
                self._pending.append(info)
                if len(self._pending) >= self._prune_at or self._acked >= _PRUNE_MIN:
                    self._pending = [i for i in self._pending if not i.is_published()]
                    self._prune_at = max(_PRUNE_MIN, 2 * len(self._pending))
                    self._acked = 0

    @property
    def pending_count(self) -> int:
        """Return how many QoS>0 publish handles are kept.

        The unacknowledged ones, plus at most a few hundred acknowledged since the last prune (pruning
        runs on publish, every 256 acknowledgements or when the list doubles).
        """
        with self._pending_lock:
            return len(self._pending)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until the broker acknowledged every QoS>0 message published so far (upload pacing)."""
        deadline = time.monotonic() + timeout
        with self._pending_lock:
            pending, self._pending = self._pending, []
            self._prune_at = _PRUNE_MIN
        for info in pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=left)
        return all(i.is_published() for i in pending)

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        """Add a handler; the subscription is renewed on every (re)connect."""
        self._dispatch.add(topic_filter, handler)
        self._sub_qos[topic_filter] = qos
        if self.connected:
            rc, _ = self._client.subscribe(topic_filter, qos)
            if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                raise TransportError(f"subscribe {topic_filter} failed: {mqtt.error_string(rc)}")

    def close(self, *, graceful_payload: tuple[str, bytes] | None = None) -> None:
        """Disconnect; optionally publish a last retained message (e.g. ``offline``) first."""
        self._closing = True
        if graceful_payload is not None and self.connected:
            info = self._client.publish(graceful_payload[0], graceful_payload[1], qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2)
        self._client.disconnect()
        # paho's network thread clears its own handle (client._thread = None) as it ends after a
        # disconnect; loop_stop() can read the handle, see it cleared before its join(), and raise
        # AttributeError. The thread has then ended, which is all loop_stop() waits for. (Seen with
        # 100 clients closing at once in tests/test_queue_overflow.py on a loaded machine.)
        with contextlib.suppress(AttributeError):
            self._client.loop_stop()
        self._dispatch.stop()


def _set_proxy(client: mqtt.Client, proxy: ProxyAddress) -> None:
    """Route every connection through an HTTP ``CONNECT`` proxy (paho's proxy support, PySocks)."""
    try:
        import socks  # PySocks: paho's documented proxy dependency (optional: only --proxy needs it)
    except ImportError as exc:
        raise TransportError(f"--proxy {proxy} needs the PySocks package (pip install pysocks)",
                             reason=Reason.BAD_CONFIG) from exc
    client.proxy_set(proxy_type=socks.HTTP, proxy_addr=proxy.host, proxy_port=proxy.port)

"""Transport interface, the paho-mqtt implementation and its in-memory twin.

Handlers never run on paho's network thread: callbacks only enqueue, and one dispatcher
thread per transport calls the handlers in arrival order. Every publish and subscribe return
code is checked. The paho client uses the VERSION2 callback API, MQTT 3.1.1 (the embedded
broker speaks only that), persistent sessions (``clean_session=False``), QoS 1 by default,
a retained status topic with a Last Will, and reconnects by itself with jittered, bounded
backoff. Payload bytes are counted per direction for the traffic report.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import paho.mqtt.client as mqtt

from protocol.errors import TransportError

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]


@dataclass
class TrafficCounter:
    """Payload bytes and messages per direction (topic and MQTT framing excluded)."""

    tx_bytes: int = 0
    rx_bytes: int = 0
    tx_messages: int = 0
    rx_messages: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def sent(self, n: int) -> None:
        with self._lock:
            self.tx_bytes += n
            self.tx_messages += 1

    def received(self, n: int) -> None:
        with self._lock:
            self.rx_bytes += n
            self.rx_messages += 1


@dataclass(frozen=True)
class TlsConfig:
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None


class Transport(Protocol):
    traffic: TrafficCounter

    def connect(self) -> None: ...
    def close(self) -> None: ...
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None: ...
    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None: ...
    @property
    def connected(self) -> bool: ...


def topic_matches(topic_filter: str, topic: str) -> bool:
    return bool(mqtt.topic_matches_sub(topic_filter, topic))


class _Dispatcher:
    """One worker thread calling handlers for queued messages; exceptions are logged, not fatal."""

    def __init__(self, name: str) -> None:
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._subs: list[tuple[str, Handler]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"dispatch-{name}", daemon=True)
        self._thread.start()

    def add(self, topic_filter: str, handler: Handler) -> None:
        with self._lock:
            self._subs.append((topic_filter, handler))

    def filters(self) -> list[str]:
        with self._lock:
            return [f for f, _ in self._subs]

    def put(self, topic: str, payload: bytes) -> None:
        self._queue.put((topic, payload))

    def stop(self) -> None:
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            topic, payload = item
            with self._lock:
                handlers = [h for f, h in self._subs if topic_matches(f, topic)]
            for h in handlers:
                try:
                    h(topic, payload)
                except Exception:
                    log.exception("handler for %s failed", topic)


class MqttTransport:
    """paho-mqtt client wrapper. ``connect`` retries a bounded number of times, then raises."""

    def __init__(
        self,
        client_id: str,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        will: tuple[str, bytes] | None = None,
        clean_session: bool = False,
        tls: TlsConfig | None = None,
        keepalive: int = 15,
        connect_attempts: int = 5,
        max_backoff: float = 8.0,
        max_queued: int = 100_000,
    ) -> None:
        self.client_id = client_id
        self.host, self.port = host, port
        self.keepalive = keepalive
        self.connect_attempts = connect_attempts
        self.max_backoff = max_backoff
        self.traffic = TrafficCounter()
        self._connected = threading.Event()
        self._closing = False
        self._dispatch = _Dispatcher(client_id)
        self._sub_qos: dict[str, int] = {}
        self._pending: list[mqtt.MQTTMessageInfo] = []
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
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
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- paho callbacks: enqueue / flag only ------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("mqtt %s: connection refused: %s", self.client_id, reason)
            return
        for f, qos in list(self._sub_qos.items()):
            rc, _ = client.subscribe(f, qos)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                log.warning("mqtt %s: re-subscribe %s failed rc=%s", self.client_id, f, rc)
        self._connected.set()
        log.debug("mqtt %s connected to %s:%s", self.client_id, self.host, self.port)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
                       ) -> None:
        self._connected.clear()
        if not self._closing:
            log.warning("mqtt %s: disconnected (%s); paho reconnects with backoff", self.client_id, reason)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.traffic.received(len(msg.payload))
        self._dispatch.put(msg.topic, bytes(msg.payload))

    # -- API ------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def connect(self) -> None:
        """Connect with jittered exponential backoff; raise ``TransportError`` after the last try."""
        delay = 0.25
        last: Exception | None = None
        for attempt in range(1, self.connect_attempts + 1):
            try:
                self._client.connect(self.host, self.port, keepalive=self.keepalive)
                self._client.loop_start()
                if self._connected.wait(timeout=10):
                    return
                self._client.loop_stop()
                last = TimeoutError("no CONNACK within 10 s (refused or not an MQTT broker)")
            except (OSError, ValueError) as exc:
                last = exc
            log.warning(
                "mqtt %s: broker %s:%s unreachable (attempt %d/%d): %s",
                self.client_id, self.host, self.port, attempt, self.connect_attempts, last,
            )
            if attempt < self.connect_attempts:
                time.sleep(min(self.max_backoff, delay) * (0.5 + random.random()))
                delay *= 2
        raise TransportError(
            f"MQTT broker {self.host}:{self.port} unreachable after {self.connect_attempts} attempts: {last}"
        )

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        # MQTT_ERR_NO_CONN: paho keeps QoS>0 messages queued and sends them after reconnecting.
        self.traffic.sent(len(payload))
        if qos > 0:
            self._pending.append(info)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until the broker acknowledged every QoS>0 message published so far (upload pacing)."""
        deadline = time.monotonic() + timeout
        pending, self._pending = self._pending, []
        for info in pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=left)
        return all(i.is_published() for i in pending)

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
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
        self._client.loop_stop()
        self._dispatch.stop()


class MemoryBroker:
    """In-process broker for unit tests: topic wildcards, retained messages, QoS ignored."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[str, MemoryTransport] = {}
        self._retained: dict[str, bytes] = {}
        self.log: list[tuple[str, bytes]] = []

    def attach(self, client: MemoryTransport) -> None:
        with self._lock:
            self._clients[client.client_id] = client

    def detach(self, client: MemoryTransport, *, abnormal: bool) -> None:
        with self._lock:
            self._clients.pop(client.client_id, None)
        if abnormal and client.will is not None:
            self.publish(client.will[0], client.will[1], retain=True)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        with self._lock:
            self.log.append((topic, payload))
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            clients = list(self._clients.values())
        for c in clients:
            c._deliver(topic, payload)

    def retained(self, topic_filter: str) -> list[tuple[str, bytes]]:
        with self._lock:
            return [(t, p) for t, p in self._retained.items() if topic_matches(topic_filter, t)]


class MemoryTransport:
    """The in-memory twin of ``MqttTransport``, same semantics for handlers."""

    def __init__(self, broker: MemoryBroker, client_id: str, *, will: tuple[str, bytes] | None = None) -> None:
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self.traffic = TrafficCounter()
        self._dispatch = _Dispatcher(client_id)
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        self.broker.attach(self)
        self._connected = True

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        if not self._connected:
            raise TransportError("memory transport not connected")
        self.traffic.sent(len(payload))
        self.broker.publish(topic, payload, retain=retain)

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        self._dispatch.add(topic_filter, handler)
        for topic, payload in self.broker.retained(topic_filter):
            self.traffic.received(len(payload))
            self._dispatch.put(topic, payload)

    def _deliver(self, topic: str, payload: bytes) -> None:
        if any(topic_matches(f, topic) for f in self._dispatch.filters()):
            self.traffic.received(len(payload))
            self._dispatch.put(topic, payload)

    def crash(self) -> None:
        """Drop the connection abnormally: the broker publishes the Last Will."""
        self._connected = False
        self.broker.detach(self, abnormal=True)

    def close(self, *, graceful_payload: tuple[str, bytes] | None = None) -> None:
        if graceful_payload is not None and self._connected:
            self.publish(graceful_payload[0], graceful_payload[1], retain=True)
        self._connected = False
        self.broker.detach(self, abnormal=False)
        self._dispatch.stop()

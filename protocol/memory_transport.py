"""The in-memory twin of the MQTT transport, for unit tests: same handler semantics, no network.

:class:`MemoryBroker` keeps retained messages and routes by topic filter (QoS ignored);
:class:`MemoryTransport` speaks the ``Transport`` protocol and can ``crash`` to fire its Last Will.
"""

from __future__ import annotations

import threading

from protocol.dispatch import Dispatcher, Handler, TrafficCounter, topic_matches
from protocol.errors import TransportError


class MemoryBroker:
    """In-process broker for unit tests: topic wildcards, retained messages, QoS ignored."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[str, MemoryTransport] = {}
        self._retained: dict[str, bytes] = {}
        self.log: list[tuple[str, bytes]] = []

    def attach(self, client: MemoryTransport) -> None:
        """Connect ``client`` (a second client with its id replaces the first)."""
        with self._lock:
            self._clients[client.client_id] = client

    def detach(self, client: MemoryTransport, *, abnormal: bool) -> None:
        """Disconnect ``client``; an abnormal loss publishes its Last Will."""
        with self._lock:
            self._clients.pop(client.client_id, None)
        if abnormal and client.will is not None:
            self.publish(client.will[0], client.will[1], retain=True)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Deliver to every matching subscriber; keep (or clear, if empty) a retained payload."""
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
        """The retained messages whose topics match ``topic_filter``."""
        with self._lock:
            return [(t, p) for t, p in self._retained.items() if topic_matches(topic_filter, t)]


class MemoryTransport:
    """The in-memory twin of ``MqttTransport``, same semantics for handlers."""

    def __init__(self, broker: MemoryBroker, client_id: str, *, will: tuple[str, bytes] | None = None) -> None:
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self.traffic = TrafficCounter()
        self._dispatch = Dispatcher(client_id)
        self._connected = False

    @property
    def connected(self) -> bool:
        """Whether the client is attached to its broker."""
        return self._connected

    def connect(self) -> None:
        """Attach to the broker."""
        self.broker.attach(self)
        self._connected = True

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish through the broker; ``TransportError`` when not connected."""
        if not self._connected:
            raise TransportError("memory transport not connected")
        self.traffic.sent(len(payload))
        self.broker.publish(topic, payload, retain=retain)

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        """Add a handler and deliver the matching retained messages to it."""
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
        """Detach cleanly, after publishing ``graceful_payload`` (retained) if given."""
        if graceful_payload is not None and self._connected:
            self.publish(graceful_payload[0], graceful_payload[1], retain=True)
        self._connected = False
        self.broker.detach(self, abnormal=False)
        self._dispatch.stop()

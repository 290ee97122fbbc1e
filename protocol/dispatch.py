"""Delivery plumbing shared by the MQTT transport and its in-memory twin.

Handlers never run on a network thread: a transport's callbacks put messages on a queue and one
:class:`Dispatcher` thread per transport calls the handlers in arrival order. Also the payload
byte counters per direction (:class:`TrafficCounter`) and MQTT topic-filter matching.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

log = logging.getLogger("protocol.transport")

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
        """Count one outgoing payload of ``n`` bytes."""
        with self._lock:
            self.tx_bytes += n
            self.tx_messages += 1

    def received(self, n: int) -> None:
        """Count one incoming payload of ``n`` bytes."""
        with self._lock:
            self.rx_bytes += n
            self.rx_messages += 1


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches the MQTT subscription filter ``topic_filter`` (``+``, ``#``)."""
    return bool(mqtt.topic_matches_sub(topic_filter, topic))


class Dispatcher:
    """One worker thread calling handlers for queued messages; exceptions are logged, not fatal."""

    def __init__(self, name: str) -> None:
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._subs: list[tuple[str, Handler]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"dispatch-{name}", daemon=True)
        self._thread.start()

    def add(self, topic_filter: str, handler: Handler) -> None:
        """Call ``handler`` for every later message matching ``topic_filter``."""
        with self._lock:
            self._subs.append((topic_filter, handler))

    def filters(self) -> list[str]:
        """The topic filters that have a handler."""
        with self._lock:
            return [f for f, _ in self._subs]

    def put(self, topic: str, payload: bytes) -> None:
        """Queue a message for the handlers (never blocks: safe on a network thread)."""
        self._queue.put((topic, payload))

    def stop(self) -> None:
        """Stop the worker after the messages already queued."""
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

"""Telemetry on the wire: compact encoding and the periodic QoS-0 publisher thread.

Messages are published with QoS 0 (telemetry is periodic; a lost sample is replaced by the next)
and encoded compactly: ``None`` and empty sections dropped, short numbers (timestamps to 1 ms,
other floats to 4 significant digits), no whitespace. The result still parses with
``parse_message(Telemetry, payload)``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from edge_agent.telemetry.sampler import TelemetrySampler
from edge_agent.telemetry.samples import ResourceSample
from firmware.profile import FirmwareProfile
from protocol.messages import Telemetry
from protocol.transport import Transport

log = logging.getLogger("edge_agent.telemetry")


def _compact(value: Any, key: str = "") -> Any:
    """Timestamps (``at``, ``*_at``) to 1 ms; other floats to 4 significant digits or 0.1; integral floats as ints."""
    if isinstance(value, float):
        if key == "at" or key.endswith("_at"):
            value = round(value, 3)
        else:
            value = float(f"{value:.4g}") if abs(value) < 1000 else round(value, 1)
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {k: _compact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    return value


def encode_telemetry(message: Telemetry) -> bytes:
    """Compact JSON: no ``None``, no empty sections, short numbers (see :func:`_compact`)."""
    data = message.model_dump(exclude_none=True)
    out = {k: _compact(v, k) for k, v in data.items() if not (isinstance(v, dict | list) and not v)}
    return json.dumps(out, separators=(",", ":"), allow_nan=False).encode("utf-8")


def period_from_profile(profile: FirmwareProfile, default: float = 5.0) -> float:
    """Return the profile's ``telemetry.period_s``, else ``default``."""
    return profile.telemetry.period_s if profile.telemetry is not None else default


class TelemetryPublisher:
    """Samples every ``period_s`` and publishes on ``topic`` with QoS 0, on its own daemon thread.

    ``latest`` is the newest :class:`ResourceSample`; ``listeners`` are called with it after every
    sample (the gate controller subscribes here, so gates and telemetry share one reading).
    """

    def __init__(
        self,
        sampler: TelemetrySampler,
        transport: Transport,
        topic: str,
        *,
        period_s: float = 5.0,
    ) -> None:
        """Publish ``sampler``'s readings on ``topic`` every ``period_s`` seconds."""
        if period_s <= 0:
            raise ValueError("period_s must be > 0")
        self.sampler = sampler
        self.transport = transport
        self.topic = topic
        self.period_s = period_s
        self.listeners: list[Callable[[ResourceSample], None]] = []
        self.latest: ResourceSample | None = None
        self.messages = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish_once(self) -> bytes:
        """Sample, tell the listeners, publish; return the payload sent."""
        sample = self.sampler.sample()
        self.latest = sample
        for listener in list(self.listeners):
            try:
                listener(sample)
            except Exception as exc:
                log.warning("telemetry listener failed: %s", exc.__class__.__name__)
        payload = encode_telemetry(self.sampler.to_message(sample))
        self.transport.publish(self.topic, payload, qos=0, retain=False)
        self.messages += 1
        self.bytes += len(payload)
        return payload

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.publish_once()
            except Exception as exc:  # broker away etc.: keep sampling, the next one may get through
                log.warning("telemetry publish failed: %s", exc.__class__.__name__)
            next_at += self.period_s
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (suspended box): do not burst, restart the schedule
                next_at, delay = time.monotonic(), 0.0
            self._stop.wait(delay)

    def start(self) -> None:
        """Start the publishing thread (no-op when running)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the publishing thread and wait for it (5 s at most)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

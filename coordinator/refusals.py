"""Refusals on the record without letting a flood of them fill the disk.

Every refusal (a bad chunk, a frame that does not decode, a message from an unknown agent) is
counted in memory; the first ``per_window`` of one agent in each ``window_s`` also become an
audit event (an fsync'd database write), and the rest of that window are summed into one
``refusals_suppressed`` event (how many, by reason) written once the window is over — by the
next refusal from that agent or by :meth:`RefusalLog.flush`, which the round loop calls. So an
enrolled box sending junk as fast as the broker lets it costs the database at most
``per_window + 1`` writes a minute, and the record still says how much it sent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from coordinator.store import Store

log = logging.getLogger("fedscan.coordinator.refusals")

#: Agents tracked one by one; refusals naming more ids than this share one window (ids on
#: topics are chosen by the sender, so they cannot grow memory without bound).
MAX_TRACKED: Final = 10_000
_OTHERS: Final = "*"


@dataclass
class _Window:
    started: float
    written: int = 0
    suppressed: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)


class RefusalLog:
    """Counts every refusal; records at most ``per_window`` events per agent per window, plus a summary."""

    def __init__(self, store: Store, *, per_window: int = 10, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_window < 1 or not window_s > 0:
            raise ValueError("per_window must be >= 1 and window_s > 0")
        self.store, self.per_window, self.window_s, self.clock = store, per_window, window_s, clock
        self.counts: Counter[str] = Counter()  # "{kind}:{reason}" -> refusals, written or not
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def refuse(self, kind: str, agent: str | None, round_id: int | None, reason: str, message: str) -> bool:
        """Count a refusal of a ``kind`` message (``update``, ``shadow``, ...); True if it was recorded."""
        key = f"{kind}:{reason}"
        now = self.clock()
        with self._lock:
            self.counts[key] += 1
            bucket = agent if agent is not None else _OTHERS
            if bucket not in self._windows and len(self._windows) >= MAX_TRACKED:
                bucket = _OTHERS
            w = self._windows.get(bucket)
            due = self._close_if_over(bucket, w, now) if w is not None else None
            w = self._windows.get(bucket)
            if w is None:
                w = self._windows[bucket] = _Window(started=now)
            record = w.written < self.per_window
            if record:
                w.written += 1
            else:
                w.suppressed[key] += 1
                w.kinds[kind] += 1
        if due is not None:
            self._write_summary(*due)
        if record:
            self.store.record_event(f"{kind}_rejected", agent_id=agent, round_id=round_id, reason=reason[:128],
                                    detail={"message": message[:500]})
        return record

    def flush(self) -> int:
        """Write the summaries of windows that are over; returns how many were written."""
        now = self.clock()
        with self._lock:
            due = [d for b, w in list(self._windows.items()) if (d := self._close_if_over(b, w, now)) is not None]
        for d in due:
            self._write_summary(*d)
        return len(due)

    def _close_if_over(self, bucket: str, w: _Window, now: float) -> tuple[str, _Window] | None:
        """Drop a window that is over; return it when it has suppressed refusals to summarise. Lock held."""
        if now - w.started < self.window_s:
            return None
        del self._windows[bucket]
        return (bucket, w) if w.suppressed else None

    def _write_summary(self, bucket: str, w: _Window) -> None:
        total = sum(w.suppressed.values())
        log.warning("%d more refusals from %s in %.0f s not recorded one by one: %s", total, bucket, self.window_s,
                    dict(w.suppressed))
        self.store.record_event("refusals_suppressed", agent_id=None if bucket == _OTHERS else bucket,
                                reason=w.kinds.most_common(1)[0][0][:128],
                                detail={"suppressed": total, "by_reason": dict(w.suppressed),
                                        "window_s": self.window_s})

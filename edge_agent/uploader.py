"""Update upload with end-to-end acknowledgement: a window of chunks in flight, resend until acked.

QoS 1 is not end-to-end delivery (docs/protocol.md): the coordinator acknowledges each complete
update on this agent's ``acks`` topic, or names the chunks it still misses; this module resends
what is missing (everything when no ack came in time) until the update is accepted, refused, or
the round's deadline passes. Each unanswered attempt doubles the wait for the next one (up to
``MAX_BACKOFF`` times ``ack_timeout_s``, with ±20 % jitter): a coordinator that is only slow (1,000
agents uploading at once, ``bench/load.py``) is not buried under whole-update resends from every
box at the same moment, while a lost chunk is still resent after ``ack_timeout_s``.
"""

from __future__ import annotations

import logging
import random
import threading
import time

from protocol.chunks import split
from protocol.errors import MalformedMessage
from protocol.frame import read_header
from protocol.messages import Ack, Task, parse_message
from protocol.topics import Topics
from protocol.transport import Transport

log = logging.getLogger("fedscan.agent.uploader")

#: seconds after a task's deadline that an upload keeps trying (the coordinator may be late too)
DEADLINE_GRACE_S = 5.0
#: the longest wait for an ack, in multiples of ``ack_timeout_s`` (the wait doubles per unanswered attempt)
MAX_BACKOFF = 8


def ack_wait(ack_timeout_s: float, unanswered: int, rng: random.Random) -> float:
    """Seconds to wait for an ack after ``unanswered`` attempts in a row got none (jittered ±20 %)."""
    return float(ack_timeout_s * min(2 ** unanswered, MAX_BACKOFF) * rng.uniform(0.8, 1.2))


class Uploader:
    """Sends one update frame per call and waits for its acknowledgement."""

    def __init__(self, agent_id: str, transport: Transport, topics: Topics, *, ack_timeout_s: float = 20.0,
                 rng: random.Random | None = None) -> None:
        """Upload for ``agent_id``; wait ``ack_timeout_s`` (then longer, see the module) for each ack before resending."""
        self.agent_id, self.transport, self.topics = agent_id, transport, topics
        self.ack_timeout_s = ack_timeout_s
        self._rng = rng or random.Random()
        self._acks: dict[str, Ack] = {}
        self._cond = threading.Condition()

    def attach(self) -> None:
        """Subscribe to this agent's acks."""
        self.transport.subscribe(self.topics.acks(self.agent_id), self.on_ack)

    def wake(self) -> None:
        """Wake a waiting upload (the agent is stopping)."""
        with self._cond:
            self._cond.notify_all()

    def on_ack(self, topic: str, payload: bytes) -> None:
        """Record an ack (dispatcher thread)."""
        try:
            ack = parse_message(Ack, payload)
        except MalformedMessage as exc:
            log.warning("ignoring malformed ack: %s", exc)
            return
        with self._cond:
            self._acks[ack.update_id] = ack
            self._cond.notify_all()

    def _flush(self) -> None:
        drain = getattr(self.transport, "drain", None)
        if drain is not None:
            drain(timeout=10)

    def upload(self, task: Task, frame: bytes, stop: threading.Event) -> Ack | None:
        """Send ``frame`` for ``task`` until acknowledged.

        Returns the final ack (accepted, duplicate or rejected), or ``None`` when stopped or out of
        time.
        """
        update_id = read_header(frame)[0].update_id
        chunks = split(frame, update_id, task.chunk_bytes)
        topic = self.topics.updates(self.agent_id, task.round_id)
        todo = list(range(len(chunks)))
        attempt = unanswered = 0
        while not stop.is_set() and time.time() < task.deadline + DEADLINE_GRACE_S:
            attempt += 1
            with self._cond:
                self._acks.pop(update_id, None)
            for n, i in enumerate(todo):
                self.transport.publish(topic, chunks[i])
                if (n + 1) % task.window == 0:
                    self._flush()
            wait = ack_wait(self.ack_timeout_s, unanswered, self._rng)
            with self._cond:
                self._cond.wait_for(lambda: update_id in self._acks or stop.is_set(), timeout=wait)
                ack = self._acks.pop(update_id, None)
            if stop.is_set():
                return None
            if ack is None:
                unanswered += 1
                log.info("agent %s: no ack for round %d after %.0fs, resending (attempt %d)", self.agent_id,
                         task.round_id, wait, attempt)
                todo = list(range(len(chunks)))
                continue
            unanswered = 0
            if ack.status == "incomplete":
                todo = [i for i in ack.missing if 0 <= i < len(chunks)] or list(range(len(chunks)))
                continue
            if ack.status in ("accepted", "duplicate"):
                log.info("agent %s: round %d update %s (%d bytes, %d chunks)", self.agent_id, task.round_id,
                         ack.status, len(frame), len(chunks))
            else:
                log.warning("agent %s: round %d update rejected: %s %s", self.agent_id, task.round_id, ack.reason,
                            ack.detail or "")
            return ack
        return None

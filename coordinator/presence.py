"""Agent presence, kept in the store: the one answer the dashboard, metrics and ``fleet ls`` give.

An agent is :attr:`~coordinator.states.AgentPresence.ONLINE` when its retained status (birth message,
or Last Will / clean exit ``offline``) says online **and** it was heard from within
:data:`STALE_AFTER_S`; an agent that vanished without its Last Will (broker restarted, state
restored from a backup) goes :attr:`~coordinator.states.AgentPresence.STALE` by itself.
:func:`presence_of` is that rule, pure.

:class:`PresenceTracker` writes it: it subscribes to every agent's status (retained: a restarted
coordinator gets each agent's current status from the broker at once) and telemetry (the
heartbeat, every few seconds), and is told of every other message (updates, reports, model
requests). The status flag is written when it changes; ``last_seen`` only moves forward and is
written at most every ``write_every_s`` per agent, so a thousand boxes sending telemetry every
5 s cost the database a few writes a second, not hundreds. A live birth message counts as being
heard at the time it carries (never later than now); a retained one from long ago does not make
a box look fresh.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final

from coordinator.states import AgentPresence
from coordinator.store import AgentRecord, NotFoundError, Store
from protocol.errors import MalformedMessage, UnknownTopic
from protocol.messages import Status, parse_message
from protocol.topics import Kind, Topics
from protocol.transport import Transport

log = logging.getLogger("fedscan.coordinator.presence")

#: Heard from within this long (and status online): online. Telemetry comes every 5 s by default.
STALE_AFTER_S: Final = 60.0


def presence_of(online: bool, last_seen: float | None, now: float, stale_after_s: float = STALE_AFTER_S) -> AgentPresence:
    """The presence of an agent whose status says ``online`` and who was last heard at ``last_seen``."""
    if last_seen is None:
        return AgentPresence.UNSEEN
    if not online:
        return AgentPresence.OFFLINE
    return AgentPresence.ONLINE if now - last_seen <= stale_after_s else AgentPresence.STALE


def agent_presence(agent: AgentRecord, now: float, stale_after_s: float = STALE_AFTER_S) -> AgentPresence:
    """:func:`presence_of` for a store record."""
    return presence_of(agent.online, agent.last_seen, now, stale_after_s)


class PresenceTracker:
    """Writes each enrolled agent's status flag and last-seen time to the store, sparingly."""

    def __init__(self, store: Store, topics: Topics, *, write_every_s: float = STALE_AFTER_S / 4,
                 clock: Callable[[], float] = time.time,
                 on_online: Callable[[str], None] | None = None) -> None:
        self.store, self.topics, self.clock = store, topics, clock
        self.write_every_s = write_every_s
        self.on_online = on_online
        self._lock = threading.Lock()
        self._written: dict[str, float] = {}  # agent -> last_seen last written by us
        self.counts: dict[str, int] = {"status": 0, "heard": 0, "writes": 0, "refused": 0, "malformed": 0}

    def attach(self, transport: Transport) -> None:
        """Subscribe to every agent's status (QoS 1, retained) and telemetry (QoS 0)."""
        transport.subscribe(self.topics.all_agents(Kind.STATUS), self.on_status_message, qos=1)
        transport.subscribe(self.topics.all_agents(Kind.TELEMETRY), self.on_telemetry_message, qos=0)

    def _agent(self, topic: str) -> str | None:
        try:
            return self.topics.parse(topic).agent
        except UnknownTopic:
            with self._lock:
                self.counts["malformed"] += 1
            return None

    def on_status_message(self, topic: str, payload: bytes) -> None:
        """A status message (retained or live); an empty payload (retained message cleared) is ignored."""
        agent = self._agent(topic)
        if agent is None or not payload:
            return
        try:
            st = parse_message(Status, payload)
        except MalformedMessage as exc:
            with self._lock:
                self.counts["malformed"] += 1
            log.warning("presence: dropped status on %s: %s", topic, exc)
            return
        if st.role != "agent":
            return
        self.status(agent, online=st.state == "online", at=st.at)

    def on_telemetry_message(self, topic: str, payload: bytes) -> None:
        """Telemetry is the heartbeat: only its arrival counts here (the fleet view reads its content)."""
        agent = self._agent(topic)
        if agent is not None:
            self.heard(agent)

    def status(self, agent: str, *, online: bool, at: float) -> None:
        """Record an agent's status, heard at ``min(at, now)`` (``last_seen`` never moves back).

        A Last Will carries the time its agent connected, a clean exit the time it left: either
        way the box was there then.
        """
        now = self.clock()
        seen = min(at, now)
        try:
            self.store.record_presence(agent, online=online, seen_at=seen)
        except NotFoundError:
            with self._lock:
                self.counts["refused"] += 1
            return
        with self._lock:
            self.counts["status"] += 1
            self.counts["writes"] += 1
            self._written[agent] = max(seen, self._written.get(agent, seen))
        if online and self.on_online is not None:
            self.on_online(agent)

    def heard(self, agent: str) -> None:
        """Any message from ``agent``: last seen is now (written when the stored value is getting old)."""
        now = self.clock()
        with self._lock:
            self.counts["heard"] += 1
            written = self._written.get(agent)
            if written is not None and now - written < self.write_every_s:
                return
            self._written[agent] = now  # claimed before writing: concurrent calls write once
        try:
            self.store.record_presence(agent, seen_at=now)
        except NotFoundError:
            with self._lock:
                self._written.pop(agent, None)
                self.counts["refused"] += 1
            return
        with self._lock:
            self.counts["writes"] += 1

    def forget(self, agent: str) -> None:
        """Drop what is kept in memory for ``agent`` (e.g. after it was removed from the fleet)."""
        with self._lock:
            self._written.pop(agent, None)

"""Who sent it: what every handler of agent messages does first.

:class:`Inbound` parses the topic (the agent is the one the topic names: the broker's ACL keeps
each agent to its own topics), refuses messages from agents that are not enrolled, notes that an
enrolled agent was heard from (presence), and records refusals through the
:class:`~coordinator.refusals.RefusalLog` (every one counted, written sparingly).
"""

from __future__ import annotations

import logging

from coordinator.presence import PresenceTracker
from coordinator.refusals import RefusalLog
from coordinator.store import Store
from protocol.errors import FedscanError, Reason, UnknownTopic
from protocol.topics import Topics

log = logging.getLogger("fedscan.coordinator")


class Inbound:
    """Topic parsing, the enrollment check and refusal recording shared by every handler."""

    def __init__(self, store: Store, topics: Topics, refusals: RefusalLog, presence: PresenceTracker) -> None:
        self.store, self.topics, self.refusals, self.presence = store, topics, refusals, presence
        self.accepted = 0  # updates accepted since start (the refusals are counted by the refusal log)

    def reject(self, kind: str, agent: str | None, round_id: int | None, err: FedscanError) -> None:
        """Count a refused ``kind`` message (``update``, ``shadow``, ...); recorded and logged sparingly."""
        if self.refusals.refuse(kind, agent, round_id, err.reason, str(err)):
            log.warning("rejected %s from %s (round %s): %s", kind, agent, round_id, err)

    def sender(self, topic: str, kind: str) -> tuple[str, int | None] | None:
        """``(agent, round)`` named by ``topic``; None (refused and recorded) when it is no agent topic."""
        try:
            parsed = self.topics.parse(topic)
        except UnknownTopic as exc:
            self.reject(kind, None, None, exc)
            return None
        assert parsed.agent is not None
        return parsed.agent, parsed.round_id

    def enrolled(self, agent: str, kind: str, round_id: int | None = None) -> FedscanError | None:
        """None for an enrolled agent (now heard from); the refusal, recorded, for anyone else."""
        if self.store.get_agent(agent) is None:
            err = FedscanError(f"agent {agent!r} is not enrolled", reason=Reason.NOT_ENROLLED)
            self.reject(kind, agent, round_id, err)
            return err
        self.presence.heard(agent)
        return None

"""The coordinator's state names as enums: round status and mode, model lifecycle, rollout state, presence.

Each is a :class:`~enum.StrEnum`, so a member compares equal to (and is stored as) the same
string the database has always held: ``RoundStatus.COMPLETE == "complete"``. Readers of the
store get members back; writers may pass a member or its string, which the store checks.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from protocol.messages import RoundMode  # on the wire in every task; defined there once


class RoundStatus(StrEnum):
    """Where a round is: collecting updates, aggregating them, done, or given up."""

    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    COMPLETE = "complete"
    FAILED = "failed"


class ModelState(StrEnum):
    """A model version's place in its lifecycle (``coordinator.lifecycle``)."""

    CANDIDATE = "candidate"
    APPROVED = "approved"
    CANARY = "canary"
    ACTIVE = "active"
    RETIRED = "retired"


class RolloutState(StrEnum):
    """A staged rollout's state (``coordinator.rollout``)."""

    RUNNING = "running"
    PAUSED = "paused"
    ROLLING_BACK = "rolling_back"
    COMPLETE = "complete"
    ROLLED_BACK = "rolled_back"


class AgentPresence(StrEnum):
    """Whether an agent is there: its retained status, bounded by when it was last heard from.

    The status is the wire's ``protocol.messages.Presence`` (online/offline); this adds staleness.
    """

    ONLINE = "online"  # status online and heard from within the staleness bound
    STALE = "stale"  # status says online, but nothing heard for longer than the bound
    OFFLINE = "offline"  # status offline (clean exit or Last Will)
    UNSEEN = "unseen"  # enrolled, never heard from


__all__ = ["OPEN_ROLLOUT_STATES", "AgentPresence", "ModelState", "RolloutState", "RoundMode", "RoundStatus",
           "parse_state"]

#: Rollouts that still hold the fleet: at most one at a time.
OPEN_ROLLOUT_STATES: frozenset[RolloutState] = frozenset(
    {RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ROLLING_BACK}
)

E = TypeVar("E", bound=StrEnum)


def parse_state(kind: type[E], value: object, what: str) -> E:
    """``value`` as a member of ``kind``; ValueError naming ``what`` and the allowed values otherwise."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    allowed = sorted(m.value for m in kind)
    raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")

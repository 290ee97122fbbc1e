"""Plain dataclasses returned by :class:`coordinator.store.Store`.

No ORM/Core row objects leak out of the store: every read returns one of
these frozen records, built from fresh copies of the JSON columns.
Timestamps are POSIX seconds (``time.time()``) as ``float``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

ROUND_STATUSES: Final[frozenset[str]] = frozenset({"collecting", "aggregating", "complete", "failed"})
MODEL_STATES: Final[frozenset[str]] = frozenset({"candidate", "approved", "canary", "active", "retired"})


@dataclass(frozen=True, slots=True)
class AgentRecord:
    agent_id: str
    profile: str
    tags: list[str]
    cert_fingerprint: str | None
    enrolled_at: float
    last_seen: float | None
    online: bool
    reported_version: str | None
    desired_version: str | None


@dataclass(frozen=True, slots=True)
class RoundRecord:
    round_id: int
    base_version: str
    config: dict[str, Any]
    deadline: float
    mode: str
    status: str
    result_version: str | None
    detail: dict[str, Any] | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class UpdateRecord:
    seq: int  # acceptance order (monotonic per store)
    update_id: str
    round_id: int
    agent_id: str
    sample_count: int
    metrics: dict[str, Any]
    blob_sha256: str
    nbytes: int
    staleness: int
    received_at: float


@dataclass(frozen=True, slots=True)
class ModelRecord:
    seq: int  # creation order
    version: str
    parent: str | None
    round_id: int | None
    manifest: dict[str, Any]
    participants: list[str]
    state: str
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class EventRecord:
    seq: int
    kind: str
    agent_id: str | None
    round_id: int | None
    reason: str | None
    detail: dict[str, Any] | None
    at: float


ROLLOUT_STATES: Final[frozenset[str]] = frozenset(
    {"running", "paused", "rolling_back", "complete", "rolled_back"}
)


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    rollout_id: int
    version: str
    state: str
    cohort: dict[str, Any]
    stages: list[int]  # cumulative number of agents reached by each stage
    agents: list[str]  # the cohort, in rollout order
    previous: dict[str, str | None]  # agent -> version desired before the rollout
    stage: int  # index into ``stages``
    stage_started_at: float | None
    healthy_since: float | None
    config: dict[str, Any]
    reason: str | None
    detail: dict[str, Any] | None
    created_at: float
    updated_at: float

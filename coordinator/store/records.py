"""Plain records returned by :class:`coordinator.store.Store`, and how each is read from a row.

No ORM/Core row objects leak out of the store: every read returns one of these frozen records,
built by its ``from_row`` from fresh copies of the JSON columns. Timestamps are POSIX seconds
(``time.time()``) as ``float``; states are the enums of :mod:`coordinator.states`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy.engine import RowMapping

from coordinator.states import ModelState, RolloutState, RoundMode, RoundStatus

ROUND_STATUSES: Final[frozenset[str]] = frozenset(s.value for s in RoundStatus)
MODEL_STATES: Final[frozenset[str]] = frozenset(s.value for s in ModelState)
ROLLOUT_STATES: Final[frozenset[str]] = frozenset(s.value for s in RolloutState)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_dict(value: Any) -> dict[str, Any] | None:
    return None if value is None else dict(value)


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """An enrolled agent: its profile and tags, liveness, and the versions it runs and should run."""

    agent_id: str
    profile: str
    tags: list[str]
    cert_fingerprint: str | None
    enrolled_at: float
    last_seen: float | None
    online: bool
    reported_version: str | None
    desired_version: str | None

    @classmethod
    def from_row(cls, row: RowMapping) -> AgentRecord:
        """The record of one ``agents`` row."""
        return cls(
            agent_id=row["agent_id"],
            profile=row["profile"],
            tags=list(row["tags"]),
            cert_fingerprint=row["cert_fingerprint"],
            enrolled_at=float(row["enrolled_at"]),
            last_seen=_opt_float(row["last_seen"]),
            online=bool(row["online"]),
            reported_version=row["reported_version"],
            desired_version=row["desired_version"],
        )


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One round: the model it trains from, its config and deadline, where it is and what it produced."""

    round_id: int
    base_version: str
    config: dict[str, Any]
    deadline: float
    mode: RoundMode
    status: RoundStatus
    result_version: str | None
    detail: dict[str, Any] | None
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: RowMapping) -> RoundRecord:
        """The record of one ``rounds`` row."""
        return cls(
            round_id=int(row["round_id"]),
            base_version=row["base_version"],
            config=dict(row["config"]),
            deadline=float(row["deadline"]),
            mode=RoundMode(row["mode"]),
            status=RoundStatus(row["status"]),
            result_version=row["result_version"],
            detail=_opt_dict(row["detail"]),
            created_at=float(row["created_at"]),
            updated_at=float(row["updated_at"]),
        )


@dataclass(frozen=True, slots=True)
class UpdateRecord:
    """One accepted update; its frame is the blob ``blob_sha256``."""

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

    @classmethod
    def from_row(cls, row: RowMapping) -> UpdateRecord:
        """The record of one ``updates`` row."""
        return cls(
            seq=int(row["seq"]),
            update_id=row["update_id"],
            round_id=int(row["round_id"]),
            agent_id=row["agent_id"],
            sample_count=int(row["sample_count"]),
            metrics=dict(row["metrics"]),
            blob_sha256=row["blob_sha256"],
            nbytes=int(row["nbytes"]),
            staleness=int(row["staleness"]),
            received_at=float(row["received_at"]),
        )


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """A model version: its parent, the round that made it, its signed manifest and lifecycle state."""

    seq: int  # creation order
    version: str
    parent: str | None
    round_id: int | None
    manifest: dict[str, Any]
    participants: list[str]
    state: ModelState
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: RowMapping) -> ModelRecord:
        """The record of one ``models`` row."""
        return cls(
            seq=int(row["seq"]),
            version=row["version"],
            parent=row["parent"],
            round_id=_opt_int(row["round_id"]),
            manifest=dict(row["manifest"]),
            participants=list(row["participants"]),
            state=ModelState(row["state"]),
            created_at=float(row["created_at"]),
            updated_at=float(row["updated_at"]),
        )


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One audit event: what happened, to whom, in which round, and why."""

    seq: int
    kind: str
    agent_id: str | None
    round_id: int | None
    reason: str | None
    detail: dict[str, Any] | None
    at: float

    @classmethod
    def from_row(cls, row: RowMapping) -> EventRecord:
        """The record of one ``events`` row."""
        return cls(
            seq=int(row["seq"]),
            kind=row["kind"],
            agent_id=row["agent_id"],
            round_id=_opt_int(row["round_id"]),
            reason=row["reason"],
            detail=_opt_dict(row["detail"]),
            at=float(row["at"]),
        )


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    """A staged rollout of one version to a cohort, and how far it has come."""

    rollout_id: int
    version: str
    state: RolloutState
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

    @classmethod
    def from_row(cls, row: RowMapping) -> RolloutRecord:
        """The record of one ``rollouts`` row."""
        return cls(
            rollout_id=int(row["rollout_id"]),
            version=row["version"],
            state=RolloutState(row["state"]),
            cohort=dict(row["cohort"]),
            stages=[int(n) for n in row["stages"]],
            agents=list(row["agents"]),
            previous=dict(row["previous"]),
            stage=int(row["stage"]),
            stage_started_at=_opt_float(row["stage_started_at"]),
            healthy_since=_opt_float(row["healthy_since"]),
            config=dict(row["config"]),
            reason=row["reason"],
            detail=_opt_dict(row["detail"]),
            created_at=float(row["created_at"]),
            updated_at=float(row["updated_at"]),
        )

"""The coordinator's state store façade: one object holding the four repositories.

:class:`Store` owns the database and exposes one repository per aggregate — ``agents``
(:class:`~coordinator.store.agents.Agents`), ``rounds`` (rounds + updates,
:class:`~coordinator.store.rounds.Rounds`), ``models`` (models + rollouts,
:class:`~coordinator.store.models.Models`) and ``events``
(:class:`~coordinator.store.events.Events`) — plus the flat method names callers have used
since the first version (``store.enroll_agent(...)`` is ``store.agents.enroll(...)``).

Every call runs as exactly one database transaction and returns only after it has committed
(durably: see :mod:`coordinator.store.db`), so the coordinator may be SIGKILLed at any instant
and a reopened store sees every call that returned and none that did not.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import exc as sa_exc

from coordinator.states import ModelState, RolloutState, RoundMode, RoundStatus
from coordinator.store.agents import Agents
from coordinator.store.db import make_engine, upgrade_to_head
from coordinator.store.errors import StoreError
from coordinator.store.events import Events
from coordinator.store.models import Models
from coordinator.store.records import (
    AgentRecord,
    EventRecord,
    ModelRecord,
    RolloutRecord,
    RoundRecord,
    UpdateRecord,
)
from coordinator.store.rounds import Rounds
from coordinator.store.transactions import Database


def open_store(url: str) -> Store:
    """Open (creating if needed) the store at ``url`` and migrate it to head.

    Idempotent and safe to call from several processes at once.
    """
    engine = make_engine(url)
    try:
        upgrade_to_head(engine)
    except StoreError:
        engine.dispose()
        raise
    except sa_exc.SQLAlchemyError as exc:
        engine.dispose()
        raise StoreError(f"cannot open store: {exc}") from exc
    except BaseException:
        engine.dispose()
        raise
    return Store(Database(engine))


class Store:
    """Transactional state of one coordinator.  Thread-safe; obtain via :func:`open_store`."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._engine = db.engine
        self.agents = Agents(db)
        self.rounds = Rounds(db)
        self.models = Models(db)
        self.events = Events(db)

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._db.url

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._db.dialect

    def close(self) -> None:
        """Release all connections.  Idempotent; later calls raise StoreError."""
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ agents (see Agents)

    def enroll_agent(
        self, agent_id: str, profile: str, tags: list[str], cert_fingerprint: str | None = None
    ) -> AgentRecord:
        """Enroll or re-enroll an agent (:meth:`Agents.enroll`)."""
        return self.agents.enroll(agent_id, profile, tags, cert_fingerprint)

    def get_agent(self, agent_id: str) -> AgentRecord | None:
        """The agent's record, or None (:meth:`Agents.get`)."""
        return self.agents.get(agent_id)

    def list_agents(self) -> list[AgentRecord]:
        """All enrolled agents by id (:meth:`Agents.all`)."""
        return self.agents.all()

    def remove_agent(self, agent_id: str) -> None:
        """Remove an enrollment (:meth:`Agents.remove`)."""
        self.agents.remove(agent_id)

    def mark_seen(self, agent_id: str, *, online: bool | None = None, at: float | None = None) -> None:
        """Record liveness (:meth:`Agents.mark_seen`)."""
        self.agents.mark_seen(agent_id, online=online, at=at)

    def record_presence(self, agent_id: str, *, online: bool | None = None, seen_at: float | None = None) -> None:
        """Status flag and last seen, never moved back (:meth:`Agents.record_presence`)."""
        self.agents.record_presence(agent_id, online=online, seen_at=seen_at)

    def set_reported_version(self, agent_id: str, version: str | None) -> None:
        """The version the agent serves (:meth:`Agents.set_reported_version`)."""
        self.agents.set_reported_version(agent_id, version)

    def set_desired_version(self, agent_id: str, version: str | None) -> None:
        """The version the agent should serve (:meth:`Agents.set_desired_version`)."""
        self.agents.set_desired_version(agent_id, version)

    # ------------------------------------------------------------------ rounds + updates (see Rounds)

    def create_round(
        self, round_id: int, *, base_version: str, config: dict[str, Any], deadline: float,
        mode: RoundMode | str = RoundMode.SYNC,
    ) -> RoundRecord:
        """Create a collecting round (:meth:`Rounds.create`)."""
        return self.rounds.create(round_id, base_version=base_version, config=config, deadline=deadline, mode=mode)

    def get_round(self, round_id: int) -> RoundRecord | None:
        """The round, or None (:meth:`Rounds.get`)."""
        return self.rounds.get(round_id)

    def latest_round(self) -> RoundRecord | None:
        """The newest round (:meth:`Rounds.latest`)."""
        return self.rounds.latest()

    def set_round_status(
        self, round_id: int, status: RoundStatus | str, *, result_version: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Move a round on (:meth:`Rounds.set_status`)."""
        self.rounds.set_status(round_id, status, result_version=result_version, detail=detail)

    def add_update(
        self, *, round_id: int, agent_id: str, update_id: str, sample_count: int, metrics: dict[str, Any],
        blob_sha256: str, nbytes: int, staleness: int = 0,
    ) -> UpdateRecord:
        """Accept one update (:meth:`Rounds.add_update`)."""
        return self.rounds.add_update(round_id=round_id, agent_id=agent_id, update_id=update_id,
                                      sample_count=sample_count, metrics=metrics, blob_sha256=blob_sha256,
                                      nbytes=nbytes, staleness=staleness)

    def get_update(self, agent_id: str, update_id: str) -> UpdateRecord | None:
        """The update ``agent_id`` recorded under ``update_id`` (:meth:`Rounds.get_update`)."""
        return self.rounds.get_update(agent_id, update_id)

    def list_updates(self, round_id: int) -> list[UpdateRecord]:
        """A round's updates in acceptance order (:meth:`Rounds.list_updates`)."""
        return self.rounds.list_updates(round_id)

    def has_update(self, round_id: int, agent_id: str) -> bool:
        """Whether the agent has an update in the round (:meth:`Rounds.has_update`)."""
        return self.rounds.has_update(round_id, agent_id)

    # ------------------------------------------------------------------ models + rollouts (see Models)

    def add_model(
        self, *, version: str, parent: str | None, round_id: int | None, manifest: dict[str, Any],
        participants: list[str], state: ModelState | str = ModelState.CANDIDATE,
    ) -> ModelRecord:
        """Record a model version (:meth:`Models.add`)."""
        return self.models.add(version=version, parent=parent, round_id=round_id, manifest=manifest,
                               participants=participants, state=state)

    def get_model(self, version: str) -> ModelRecord | None:
        """The model, or None (:meth:`Models.get`)."""
        return self.models.get(version)

    def list_models(self) -> list[ModelRecord]:
        """All models in creation order (:meth:`Models.all`)."""
        return self.models.all()

    def latest_model(self, *, state: ModelState | str | None = None) -> ModelRecord | None:
        """The newest model (in ``state``) (:meth:`Models.latest`)."""
        return self.models.latest(state=state)

    def set_model_state(self, version: str, state: ModelState | str) -> None:
        """Set a model's lifecycle state, unchecked (:meth:`Models.set_state`)."""
        self.models.set_state(version, state)

    def create_rollout(
        self, *, version: str, cohort: dict[str, Any], stages: list[int], agents: list[str],
        previous: dict[str, str | None], config: dict[str, Any], at: float | None = None,
    ) -> RolloutRecord:
        """Record a new running rollout (:meth:`Models.create_rollout`)."""
        return self.models.create_rollout(version=version, cohort=cohort, stages=stages, agents=agents,
                                          previous=previous, config=config, at=at)

    def get_rollout(self, rollout_id: int) -> RolloutRecord | None:
        """The rollout, or None (:meth:`Models.get_rollout`)."""
        return self.models.get_rollout(rollout_id)

    def list_rollouts(self) -> list[RolloutRecord]:
        """All rollouts, oldest first (:meth:`Models.list_rollouts`)."""
        return self.models.list_rollouts()

    def update_rollout(
        self, rollout_id: int, *, expect_state: RolloutState | str | None = None, **values: Any
    ) -> RolloutRecord:
        """Change a rollout's progress, compare-and-set (:meth:`Models.update_rollout`)."""
        return self.models.update_rollout(rollout_id, expect_state=expect_state, **values)

    # ------------------------------------------------------------------ events (see Events)

    def record_event(
        self, kind: str, *, agent_id: str | None = None, round_id: int | None = None, reason: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append an audit event (:meth:`Events.record`)."""
        self.events.record(kind, agent_id=agent_id, round_id=round_id, reason=reason, detail=detail)

    def list_events(self, kind: str | None = None, limit: int = 1000) -> list[EventRecord]:
        """The newest ``limit`` events, oldest first (:meth:`Events.newest`)."""
        return self.events.newest(kind, limit)

    def count_events(self, kind: str | None = None, reason: str | None = None) -> int:
        """How many events (of ``kind``, with ``reason``) (:meth:`Events.count`)."""
        return self.events.count(kind, reason)

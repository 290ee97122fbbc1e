"""The coordinator's state store: agents, rounds, updates, models, events.

Every public method runs as exactly one database transaction and returns only
after it has committed (durably: see :mod:`coordinator.store.db`), so the
coordinator may be SIGKILLed at any instant and a reopened store sees every
call that returned and none that did not.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine, RowMapping

from coordinator.store import schema as t
from coordinator.store.db import WRITE_OPTION, make_engine, upgrade_to_head
from coordinator.store.errors import DuplicateError, NotFoundError, StoreError
from coordinator.store.records import (
    MODEL_STATES,
    ROLLOUT_STATES,
    ROUND_STATUSES,
    AgentRecord,
    EventRecord,
    ModelRecord,
    RolloutRecord,
    RoundRecord,
    UpdateRecord,
)

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


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
    return Store(engine)


def _check_json(value: object, field: str) -> None:
    """Reject values that would not round-trip identically on both backends."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field} is not JSON-serialisable (no NaN/inf, str keys): {exc}") from exc
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise ValueError(f"{field}: JSON object keys must be str, got {key!r}")


def _check_id(value: object, field: str, max_len: int = 255) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field} must be a non-empty str, got {value!r}")
    if len(value) > max_len:
        raise ValueError(f"{field} longer than {max_len} characters")
    return value


def _check_nonneg(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{field} must be a non-negative int, got {value!r}")
    return value


def _check_float(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r}")
    return float(value)


def _agent(row: RowMapping) -> AgentRecord:
    return AgentRecord(
        agent_id=row["agent_id"],
        profile=row["profile"],
        tags=list(row["tags"]),
        cert_fingerprint=row["cert_fingerprint"],
        enrolled_at=float(row["enrolled_at"]),
        last_seen=None if row["last_seen"] is None else float(row["last_seen"]),
        online=bool(row["online"]),
        reported_version=row["reported_version"],
        desired_version=row["desired_version"],
    )


def _round(row: RowMapping) -> RoundRecord:
    return RoundRecord(
        round_id=int(row["round_id"]),
        base_version=row["base_version"],
        config=dict(row["config"]),
        deadline=float(row["deadline"]),
        mode=row["mode"],
        status=row["status"],
        result_version=row["result_version"],
        detail=None if row["detail"] is None else dict(row["detail"]),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )


def _update(row: RowMapping) -> UpdateRecord:
    return UpdateRecord(
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


def _model(row: RowMapping) -> ModelRecord:
    return ModelRecord(
        seq=int(row["seq"]),
        version=row["version"],
        parent=row["parent"],
        round_id=None if row["round_id"] is None else int(row["round_id"]),
        manifest=dict(row["manifest"]),
        participants=list(row["participants"]),
        state=row["state"],
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )


def _rollout(row: RowMapping) -> RolloutRecord:
    return RolloutRecord(
        rollout_id=int(row["rollout_id"]),
        version=row["version"],
        state=row["state"],
        cohort=dict(row["cohort"]),
        stages=[int(n) for n in row["stages"]],
        agents=list(row["agents"]),
        previous=dict(row["previous"]),
        stage=int(row["stage"]),
        stage_started_at=None if row["stage_started_at"] is None else float(row["stage_started_at"]),
        healthy_since=None if row["healthy_since"] is None else float(row["healthy_since"]),
        config=dict(row["config"]),
        reason=row["reason"],
        detail=None if row["detail"] is None else dict(row["detail"]),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )


def _event(row: RowMapping) -> EventRecord:
    return EventRecord(
        seq=int(row["seq"]),
        kind=row["kind"],
        agent_id=row["agent_id"],
        round_id=None if row["round_id"] is None else int(row["round_id"]),
        reason=row["reason"],
        detail=None if row["detail"] is None else dict(row["detail"]),
        at=float(row["at"]),
    )


class Store:
    """Transactional state of one coordinator.  Thread-safe; obtain via :func:`open_store`."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._closed = False
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self._engine.url.render_as_string(hide_password=True)

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._engine.dialect.name

    def close(self) -> None:
        """Release all connections.  Idempotent; later calls raise StoreError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[Connection]:
        """One transaction; commits on normal exit, rolls back on any error."""
        if self._closed:
            raise StoreError("store is closed")
        try:
            with self._engine.connect() as conn:
                if write:
                    conn.execution_options(**{WRITE_OPTION: True})
                with conn.begin():
                    yield conn
        except StoreError:
            raise
        except sa_exc.SQLAlchemyError as exc:
            raise StoreError(f"database error: {exc}") from exc

    def _insert(self, table: sa.Table) -> Any:
        """Dialect-specific INSERT supporting ``on_conflict_do_update``."""
        if self._engine.dialect.name == "postgresql":
            return pg_dialect.insert(table)
        return sqlite_dialect.insert(table)

    @staticmethod
    def _require(conn: Connection, table: sa.Table, column: sa.Column[Any], key: object, what: str) -> None:
        found = conn.execute(sa.select(sa.literal(1)).select_from(table).where(column == key)).first()
        if found is None:
            raise NotFoundError(f"{what} {key!r} not found")

    # ------------------------------------------------------------------ agents

    def enroll_agent(
        self, agent_id: str, profile: str, tags: list[str], cert_fingerprint: str | None = None
    ) -> AgentRecord:
        """Enroll ``agent_id``, or re-enroll it.

        Re-enrolling replaces ``profile`` and ``tags``, and the certificate
        fingerprint when one is given (``None`` keeps the stored one).
        ``enrolled_at``, liveness and versions are preserved.
        """
        _check_id(agent_id, "agent_id")
        _check_id(profile, "profile")
        if isinstance(tags, str) or not all(isinstance(tag, str) for tag in tags):
            raise ValueError("tags must be a list of str")
        tag_list = list(tags)
        if cert_fingerprint is not None:
            _check_id(cert_fingerprint, "cert_fingerprint")
        stmt = self._insert(t.agents).values(
            agent_id=agent_id,
            profile=profile,
            tags=tag_list,
            cert_fingerprint=cert_fingerprint,
            enrolled_at=time.time(),
            last_seen=None,
            online=False,
        )
        updates: dict[str, Any] = {"profile": stmt.excluded.profile, "tags": stmt.excluded.tags}
        if cert_fingerprint is not None:
            updates["cert_fingerprint"] = stmt.excluded.cert_fingerprint
        stmt = stmt.on_conflict_do_update(index_elements=[t.agents.c.agent_id], set_=updates)
        with self._tx(write=True) as conn:
            conn.execute(stmt)
            row = conn.execute(sa.select(t.agents).where(t.agents.c.agent_id == agent_id)).mappings().one()
            return _agent(row)

    def get_agent(self, agent_id: str) -> AgentRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(sa.select(t.agents).where(t.agents.c.agent_id == agent_id)).mappings().first()
            return None if row is None else _agent(row)

    def list_agents(self) -> list[AgentRecord]:
        """All enrolled agents, ordered by ``agent_id``."""
        with self._tx(write=False) as conn:
            rows = conn.execute(sa.select(t.agents).order_by(t.agents.c.agent_id)).mappings().all()
            return [_agent(row) for row in rows]

    def remove_agent(self, agent_id: str) -> None:
        """Remove an enrollment (NotFoundError if absent).  Its updates and events are kept."""
        with self._tx(write=True) as conn:
            result = conn.execute(sa.delete(t.agents).where(t.agents.c.agent_id == agent_id))
            if result.rowcount == 0:
                raise NotFoundError(f"agent {agent_id!r} not found")

    def _update_agent(self, agent_id: str, values: dict[str, Any]) -> None:
        with self._tx(write=True) as conn:
            result = conn.execute(sa.update(t.agents).where(t.agents.c.agent_id == agent_id).values(**values))
            if result.rowcount == 0:
                raise NotFoundError(f"agent {agent_id!r} not found")

    def mark_seen(self, agent_id: str, *, online: bool | None = None, at: float | None = None) -> None:
        """Set ``last_seen`` to ``at`` (default: now); also ``online`` unless it is ``None``."""
        values: dict[str, Any] = {"last_seen": time.time() if at is None else _check_float(at, "at")}
        if online is not None:
            values["online"] = bool(online)
        self._update_agent(agent_id, values)

    def set_reported_version(self, agent_id: str, version: str | None) -> None:
        if version is not None:
            _check_id(version, "version")
        self._update_agent(agent_id, {"reported_version": version})

    def set_desired_version(self, agent_id: str, version: str | None) -> None:
        if version is not None:
            _check_id(version, "version")
        self._update_agent(agent_id, {"desired_version": version})

    # ------------------------------------------------------------------ rounds

    def create_round(
        self, round_id: int, *, base_version: str, config: dict[str, Any], deadline: float, mode: str = "sync"
    ) -> RoundRecord:
        """Create a round in status ``"collecting"``; DuplicateError if ``round_id`` exists."""
        _check_nonneg(round_id, "round_id")
        _check_id(base_version, "base_version")
        _check_json(config, "config")
        _check_id(mode, "mode", 32)
        now = time.time()
        values = {
            "round_id": round_id,
            "base_version": base_version,
            "config": dict(config),
            "deadline": _check_float(deadline, "deadline"),
            "mode": mode,
            "status": "collecting",
            "result_version": None,
            "detail": None,
            "created_at": now,
            "updated_at": now,
        }
        with self._tx(write=True) as conn:
            if conn.execute(sa.select(t.rounds.c.round_id).where(t.rounds.c.round_id == round_id)).first():
                raise DuplicateError(f"round {round_id} already exists")
            try:
                conn.execute(sa.insert(t.rounds).values(**values))
            except sa_exc.IntegrityError as exc:  # lost a race with another writer
                raise DuplicateError(f"round {round_id} already exists") from exc
            row = conn.execute(sa.select(t.rounds).where(t.rounds.c.round_id == round_id)).mappings().one()
            return _round(row)

    def get_round(self, round_id: int) -> RoundRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(sa.select(t.rounds).where(t.rounds.c.round_id == round_id)).mappings().first()
            return None if row is None else _round(row)

    def latest_round(self) -> RoundRecord | None:
        """The round with the highest ``round_id``."""
        with self._tx(write=False) as conn:
            stmt = sa.select(t.rounds).order_by(t.rounds.c.round_id.desc()).limit(1)
            row = conn.execute(stmt).mappings().first()
            return None if row is None else _round(row)

    def set_round_status(
        self,
        round_id: int,
        status: str,
        *,
        result_version: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Set the status; ``result_version``/``detail`` are replaced only when not ``None``."""
        if status not in ROUND_STATUSES:
            raise ValueError(f"unknown round status {status!r}; expected one of {sorted(ROUND_STATUSES)}")
        values: dict[str, Any] = {"status": status, "updated_at": time.time()}
        if result_version is not None:
            values["result_version"] = _check_id(result_version, "result_version")
        if detail is not None:
            _check_json(detail, "detail")
            values["detail"] = dict(detail)
        with self._tx(write=True) as conn:
            result = conn.execute(sa.update(t.rounds).where(t.rounds.c.round_id == round_id).values(**values))
            if result.rowcount == 0:
                raise NotFoundError(f"round {round_id} not found")

    # ------------------------------------------------------------------ updates

    def add_update(
        self,
        *,
        round_id: int,
        agent_id: str,
        update_id: str,
        sample_count: int,
        metrics: dict[str, Any],
        blob_sha256: str,
        nbytes: int,
        staleness: int = 0,
    ) -> UpdateRecord:
        """Accept one update.  At most one per (round, agent), each ``update_id`` once.

        DuplicateError on either repeat; NotFoundError if the round does not
        exist or the agent is not enrolled.  The blob must already be in the
        :class:`~coordinator.store.blobs.BlobStore`.
        """
        _check_id(agent_id, "agent_id")
        _check_id(update_id, "update_id")
        _check_nonneg(sample_count, "sample_count")
        _check_nonneg(nbytes, "nbytes")
        _check_nonneg(staleness, "staleness")
        _check_json(metrics, "metrics")
        if not (isinstance(blob_sha256, str) and _SHA256_RE.fullmatch(blob_sha256)):
            raise ValueError(f"blob_sha256 must be a lowercase 64-character hex digest, got {blob_sha256!r}")
        u = t.updates
        with self._tx(write=True) as conn:
            self._require(conn, t.rounds, t.rounds.c.round_id, round_id, "round")
            self._require(conn, t.agents, t.agents.c.agent_id, agent_id, "agent")
            if conn.execute(sa.select(u.c.seq).where(u.c.update_id == update_id)).first():
                raise DuplicateError(f"update_id {update_id!r} already recorded")
            if conn.execute(sa.select(u.c.seq).where(u.c.round_id == round_id, u.c.agent_id == agent_id)).first():
                raise DuplicateError(f"agent {agent_id!r} already has an update in round {round_id}")
            try:
                seq = conn.execute(
                    sa.insert(u)
                    .values(
                        update_id=update_id,
                        round_id=round_id,
                        agent_id=agent_id,
                        sample_count=sample_count,
                        metrics=dict(metrics),
                        blob_sha256=blob_sha256,
                        nbytes=nbytes,
                        staleness=staleness,
                        received_at=time.time(),
                    )
                    .returning(u.c.seq)
                ).scalar_one()
            except sa_exc.IntegrityError as exc:  # lost a race with another writer
                raise DuplicateError(f"update {update_id!r} ({agent_id!r}, round {round_id}) already recorded") from exc
            return _update(conn.execute(sa.select(u).where(u.c.seq == seq)).mappings().one())

    def get_update(self, update_id: str) -> UpdateRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(sa.select(t.updates).where(t.updates.c.update_id == update_id)).mappings().first()
            return None if row is None else _update(row)

    def list_updates(self, round_id: int) -> list[UpdateRecord]:
        """Updates of ``round_id`` in acceptance order."""
        u = t.updates
        with self._tx(write=False) as conn:
            rows = conn.execute(sa.select(u).where(u.c.round_id == round_id).order_by(u.c.seq)).mappings().all()
            return [_update(row) for row in rows]

    def has_update(self, round_id: int, agent_id: str) -> bool:
        u = t.updates
        with self._tx(write=False) as conn:
            stmt = sa.select(u.c.seq).where(u.c.round_id == round_id, u.c.agent_id == agent_id)
            return conn.execute(stmt).first() is not None

    # ------------------------------------------------------------------ models

    def add_model(
        self,
        *,
        version: str,
        parent: str | None,
        round_id: int | None,
        manifest: dict[str, Any],
        participants: list[str],
        state: str = "candidate",
    ) -> ModelRecord:
        """Record a model version.  DuplicateError if ``version`` exists;
        NotFoundError if ``parent`` or ``round_id`` is given but unknown."""
        _check_id(version, "version")
        if state not in MODEL_STATES:
            raise ValueError(f"unknown model state {state!r}; expected one of {sorted(MODEL_STATES)}")
        _check_json(manifest, "manifest")
        if isinstance(participants, str) or not all(isinstance(p, str) for p in participants):
            raise ValueError("participants must be a list of str")
        m = t.models
        now = time.time()
        with self._tx(write=True) as conn:
            if conn.execute(sa.select(m.c.seq).where(m.c.version == version)).first():
                raise DuplicateError(f"model {version!r} already exists")
            if parent is not None:
                self._require(conn, m, m.c.version, parent, "parent model")
            if round_id is not None:
                self._require(conn, t.rounds, t.rounds.c.round_id, round_id, "round")
            try:
                seq = conn.execute(
                    sa.insert(m)
                    .values(
                        version=version,
                        parent=parent,
                        round_id=round_id,
                        manifest=dict(manifest),
                        participants=list(participants),
                        state=state,
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(m.c.seq)
                ).scalar_one()
            except sa_exc.IntegrityError as exc:
                raise DuplicateError(f"model {version!r} already exists") from exc
            return _model(conn.execute(sa.select(m).where(m.c.seq == seq)).mappings().one())

    def get_model(self, version: str) -> ModelRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(sa.select(t.models).where(t.models.c.version == version)).mappings().first()
            return None if row is None else _model(row)

    def list_models(self) -> list[ModelRecord]:
        """All model versions in creation order."""
        with self._tx(write=False) as conn:
            rows = conn.execute(sa.select(t.models).order_by(t.models.c.seq)).mappings().all()
            return [_model(row) for row in rows]

    def latest_model(self, *, state: str | None = None) -> ModelRecord | None:
        """The most recently created model (optionally: in ``state``)."""
        m = t.models
        stmt = sa.select(m).order_by(m.c.seq.desc()).limit(1)
        if state is not None:
            stmt = stmt.where(m.c.state == state)
        with self._tx(write=False) as conn:
            row = conn.execute(stmt).mappings().first()
            return None if row is None else _model(row)

    def set_model_state(self, version: str, state: str) -> None:
        if state not in MODEL_STATES:
            raise ValueError(f"unknown model state {state!r}; expected one of {sorted(MODEL_STATES)}")
        with self._tx(write=True) as conn:
            result = conn.execute(
                sa.update(t.models).where(t.models.c.version == version).values(state=state, updated_at=time.time())
            )
            if result.rowcount == 0:
                raise NotFoundError(f"model {version!r} not found")

    # ------------------------------------------------------------------ rollouts

    _ROLLOUT_FIELDS = frozenset({"state", "stage", "stage_started_at", "healthy_since", "reason", "detail"})

    def create_rollout(
        self,
        *,
        version: str,
        cohort: dict[str, Any],
        stages: list[int],
        agents: list[str],
        previous: dict[str, str | None],
        config: dict[str, Any],
        at: float | None = None,
    ) -> RolloutRecord:
        """Record a new ``running`` rollout at stage 0 (created and stage started ``at``, default now).  NotFoundError if the model is unknown;
        DuplicateError if another rollout is still running, paused or rolling back."""
        _check_id(version, "version")
        for value, name in ((cohort, "cohort"), (stages, "stages"), (agents, "agents"), (previous, "previous"),
                            (config, "config")):
            _check_json(value, name)
        if not stages or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in stages):
            raise ValueError("stages must be a non-empty list of positive ints")
        if any(b <= a for a, b in itertools.pairwise(stages)) or stages[-1] > len(agents):
            raise ValueError("stages must increase strictly and not exceed the number of agents")
        r = t.rollouts
        now = time.time() if at is None else _check_float(at, "at")
        with self._tx(write=True) as conn:
            self._require(conn, t.models, t.models.c.version, version, "model")
            open_ = conn.execute(sa.select(r.c.rollout_id).where(r.c.state.in_(("running", "paused", "rolling_back")))
                                 ).first()
            if open_ is not None:
                raise DuplicateError(f"rollout {open_[0]} is still open; finish, roll back or wait for it first")
            rid = conn.execute(
                sa.insert(r)
                .values(version=version, state="running", cohort=dict(cohort), stages=list(stages),
                        agents=list(agents), previous=dict(previous), stage=0, stage_started_at=now,
                        healthy_since=None, config=dict(config), reason=None, detail=None, created_at=now,
                        updated_at=now)
                .returning(r.c.rollout_id)
            ).scalar_one()
            return _rollout(conn.execute(sa.select(r).where(r.c.rollout_id == rid)).mappings().one())

    def get_rollout(self, rollout_id: int) -> RolloutRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(sa.select(t.rollouts).where(t.rollouts.c.rollout_id == rollout_id)).mappings().first()
            return None if row is None else _rollout(row)

    def list_rollouts(self) -> list[RolloutRecord]:
        """All rollouts, oldest first."""
        with self._tx(write=False) as conn:
            rows = conn.execute(sa.select(t.rollouts).order_by(t.rollouts.c.rollout_id)).mappings().all()
            return [_rollout(row) for row in rows]

    def update_rollout(self, rollout_id: int, *, expect_state: str | None = None, **values: Any) -> RolloutRecord:
        """Change progress fields (state, stage, stage_started_at, healthy_since, reason, detail).

        With ``expect_state`` the change applies only if the rollout is still in that state
        (compare-and-set between the CLI and the coordinator's driver); otherwise StoreError."""
        unknown = set(values) - self._ROLLOUT_FIELDS
        if unknown:
            raise ValueError(f"cannot update rollout fields {sorted(unknown)}")
        if "state" in values and values["state"] not in ROLLOUT_STATES:
            raise ValueError(f"unknown rollout state {values['state']!r}; expected one of {sorted(ROLLOUT_STATES)}")
        if values.get("detail") is not None:
            _check_json(values["detail"], "detail")
        r = t.rollouts
        with self._tx(write=True) as conn:
            stmt = sa.update(r).where(r.c.rollout_id == rollout_id)
            if expect_state is not None:
                stmt = stmt.where(r.c.state == expect_state)
            result = conn.execute(stmt.values(**values, updated_at=time.time()))
            if result.rowcount == 0:
                row = conn.execute(sa.select(r.c.state).where(r.c.rollout_id == rollout_id)).first()
                if row is None:
                    raise NotFoundError(f"rollout {rollout_id} not found")
                raise StoreError(f"rollout {rollout_id} is {row[0]}, not {expect_state}")
            return _rollout(conn.execute(sa.select(r).where(r.c.rollout_id == rollout_id)).mappings().one())

    # ------------------------------------------------------------------ events

    def record_event(
        self,
        kind: str,
        *,
        agent_id: str | None = None,
        round_id: int | None = None,
        reason: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append an audit event (e.g. ``kind="update_rejected", reason="stale"``).

        ``agent_id``/``round_id`` are free references: they need not exist
        (a rejection may be *because* they do not).
        """
        _check_id(kind, "kind", 64)
        if reason is not None:
            _check_id(reason, "reason", 128)
        if agent_id is not None:
            _check_id(agent_id, "agent_id")
        if detail is not None:
            _check_json(detail, "detail")
        values = {
            "kind": kind,
            "agent_id": agent_id,
            "round_id": round_id,
            "reason": reason,
            "detail": None if detail is None else dict(detail),
            "at": time.time(),
        }
        with self._tx(write=True) as conn:
            conn.execute(sa.insert(t.events).values(**values))

    def list_events(self, kind: str | None = None, limit: int = 1000) -> list[EventRecord]:
        """The newest ``limit`` events (of ``kind``), returned oldest first."""
        e = t.events
        stmt = sa.select(e).order_by(e.c.seq.desc()).limit(max(0, int(limit)))
        if kind is not None:
            stmt = stmt.where(e.c.kind == kind)
        with self._tx(write=False) as conn:
            rows = conn.execute(stmt).mappings().all()
            return [_event(row) for row in reversed(rows)]

    def count_events(self, kind: str | None = None, reason: str | None = None) -> int:
        e = t.events
        stmt = sa.select(sa.func.count()).select_from(e)
        if kind is not None:
            stmt = stmt.where(e.c.kind == kind)
        if reason is not None:
            stmt = stmt.where(e.c.reason == reason)
        with self._tx(write=False) as conn:
            return int(conn.execute(stmt).scalar_one())

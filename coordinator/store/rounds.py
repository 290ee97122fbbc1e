"""The rounds repository: rounds and the updates accepted into them (one aggregate)."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from coordinator.states import RoundMode, RoundStatus, parse_state
from coordinator.store import schema as t
from coordinator.store.checks import INT32_MAX, check_float, check_id, check_json, check_nonneg, check_sha256
from coordinator.store.errors import DuplicateError, NotFoundError
from coordinator.store.records import RoundRecord, UpdateRecord
from coordinator.store.transactions import Database, require


class Rounds:
    """Rounds and their accepted updates.  Each method is one transaction, durable when it returns."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # ------------------------------------------------------------------ rounds

    def create(
        self, round_id: int, *, base_version: str, config: dict[str, Any], deadline: float,
        mode: RoundMode | str = RoundMode.SYNC,
    ) -> RoundRecord:
        """Create a round in status ``collecting``; DuplicateError if ``round_id`` exists."""
        check_nonneg(round_id, "round_id")
        check_id(base_version, "base_version")
        check_json(config, "config")
        round_mode = parse_state(RoundMode, mode, "round mode")
        now = time.time()
        values = {
            "round_id": round_id,
            "base_version": base_version,
            "config": dict(config),
            "deadline": check_float(deadline, "deadline"),
            "mode": round_mode.value,
            "status": RoundStatus.COLLECTING.value,
            "result_version": None,
            "detail": None,
            "created_at": now,
            "updated_at": now,
        }
        with self._db.tx(write=True) as conn:
            if conn.execute(sa.select(t.rounds.c.round_id).where(t.rounds.c.round_id == round_id)).first():
                raise DuplicateError(f"round {round_id} already exists")
            try:
                conn.execute(sa.insert(t.rounds).values(**values))
            except sa_exc.IntegrityError as exc:  # lost a race with another writer
                raise DuplicateError(f"round {round_id} already exists") from exc
            row = conn.execute(sa.select(t.rounds).where(t.rounds.c.round_id == round_id)).mappings().one()
            return RoundRecord.from_row(row)

    def get(self, round_id: int) -> RoundRecord | None:
        """The round, or None."""
        with self._db.tx(write=False) as conn:
            row = conn.execute(sa.select(t.rounds).where(t.rounds.c.round_id == round_id)).mappings().first()
            return None if row is None else RoundRecord.from_row(row)

    def latest(self) -> RoundRecord | None:
        """The round with the highest ``round_id``."""
        with self._db.tx(write=False) as conn:
            stmt = sa.select(t.rounds).order_by(t.rounds.c.round_id.desc()).limit(1)
            row = conn.execute(stmt).mappings().first()
            return None if row is None else RoundRecord.from_row(row)

    def count(self, status: RoundStatus | str | None = None) -> int:
        """How many rounds there are (in ``status``)."""
        stmt = sa.select(sa.func.count()).select_from(t.rounds)
        if status is not None:
            stmt = stmt.where(t.rounds.c.status == parse_state(RoundStatus, status, "round status").value)
        with self._db.tx(write=False) as conn:
            return int(conn.execute(stmt).scalar_one())

    def set_status(
        self,
        round_id: int,
        status: RoundStatus | str,
        *,
        result_version: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Set the status; ``result_version``/``detail`` are replaced only when not ``None``."""
        values: dict[str, Any] = {"status": parse_state(RoundStatus, status, "round status").value,
                                  "updated_at": time.time()}
        if result_version is not None:
            values["result_version"] = check_id(result_version, "result_version")
        if detail is not None:
            check_json(detail, "detail")
            values["detail"] = dict(detail)
        with self._db.tx(write=True) as conn:
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
        """Accept one update.  At most one per (round, agent); each agent uses an ``update_id`` once.

        Update ids belong to their agent: two agents may use the same id, and an id is only ever
        compared with the same agent's earlier ones. DuplicateError on either repeat; NotFoundError if the round does not
        exist or the agent is not enrolled.  The blob must already be in the
        :class:`~coordinator.store.blobs.BlobStore`.
        """
        check_id(agent_id, "agent_id")
        check_id(update_id, "update_id")
        check_nonneg(sample_count, "sample_count", INT32_MAX)
        check_nonneg(nbytes, "nbytes")
        check_nonneg(staleness, "staleness", INT32_MAX)
        check_json(metrics, "metrics")
        check_sha256(blob_sha256, "blob_sha256")
        u = t.updates
        with self._db.tx(write=True) as conn:
            require(conn, t.rounds, t.rounds.c.round_id, round_id, "round")
            require(conn, t.agents, t.agents.c.agent_id, agent_id, "agent")
            if conn.execute(sa.select(u.c.seq).where(u.c.agent_id == agent_id, u.c.update_id == update_id)).first():
                raise DuplicateError(f"agent {agent_id!r} already used update_id {update_id!r}")
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
            return UpdateRecord.from_row(conn.execute(sa.select(u).where(u.c.seq == seq)).mappings().one())

    def get_update(self, agent_id: str, update_id: str) -> UpdateRecord | None:
        """The update ``agent_id`` recorded under ``update_id``, or None."""
        u = t.updates
        with self._db.tx(write=False) as conn:
            row = conn.execute(sa.select(u).where(u.c.agent_id == agent_id, u.c.update_id == update_id)
                               ).mappings().first()
            return None if row is None else UpdateRecord.from_row(row)

    def list_updates(self, round_id: int) -> list[UpdateRecord]:
        """Updates of ``round_id`` in acceptance order."""
        u = t.updates
        with self._db.tx(write=False) as conn:
            rows = conn.execute(sa.select(u).where(u.c.round_id == round_id).order_by(u.c.seq)).mappings().all()
            return [UpdateRecord.from_row(row) for row in rows]

    def has_update(self, round_id: int, agent_id: str) -> bool:
        """Whether ``agent_id`` has an update accepted into ``round_id``."""
        u = t.updates
        with self._db.tx(write=False) as conn:
            stmt = sa.select(u.c.seq).where(u.c.round_id == round_id, u.c.agent_id == agent_id)
            return conn.execute(stmt).first() is not None

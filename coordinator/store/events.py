"""The events repository: the append-only audit trail (rejections, rollouts, lifecycle changes)."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from coordinator.store import schema as t
from coordinator.store.checks import check_id, check_json
from coordinator.store.records import EventRecord
from coordinator.store.transactions import Database


class Events:
    """Audit events.  Each method is one transaction, durable when it returns."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def record(
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
        check_id(kind, "kind", 64)
        if reason is not None:
            check_id(reason, "reason", 128)
        if agent_id is not None:
            check_id(agent_id, "agent_id")
        if detail is not None:
            check_json(detail, "detail")
        values = {
            "kind": kind,
            "agent_id": agent_id,
            "round_id": round_id,
            "reason": reason,
            "detail": None if detail is None else dict(detail),
            "at": time.time(),
        }
        with self._db.tx(write=True) as conn:
            conn.execute(sa.insert(t.events).values(**values))

    def newest(self, kind: str | None = None, limit: int = 1000) -> list[EventRecord]:
        """The newest ``limit`` events (of ``kind``), returned oldest first."""
        e = t.events
        stmt = sa.select(e).order_by(e.c.seq.desc()).limit(max(0, int(limit)))
        if kind is not None:
            stmt = stmt.where(e.c.kind == kind)
        with self._db.tx(write=False) as conn:
            rows = conn.execute(stmt).mappings().all()
            return [EventRecord.from_row(row) for row in reversed(rows)]

    def count(self, kind: str | None = None, reason: str | None = None) -> int:
        """How many events there are (of ``kind``, with ``reason``)."""
        e = t.events
        stmt = sa.select(sa.func.count()).select_from(e)
        if kind is not None:
            stmt = stmt.where(e.c.kind == kind)
        if reason is not None:
            stmt = stmt.where(e.c.reason == reason)
        with self._db.tx(write=False) as conn:
            return int(conn.execute(stmt).scalar_one())

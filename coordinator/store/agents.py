"""The agents repository: enrollment, liveness and the model versions each box runs and should run."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from coordinator.store import schema as t
from coordinator.store.checks import check_float, check_id, check_str_list
from coordinator.store.errors import NotFoundError
from coordinator.store.records import AgentRecord
from coordinator.store.transactions import Database


class Agents:
    """Enrolled agents.  Each method is one transaction, durable when it returns."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def enroll(self, agent_id: str, profile: str, tags: list[str], cert_fingerprint: str | None = None) -> AgentRecord:
        """Enroll ``agent_id``, or re-enroll it.

        Re-enrolling replaces ``profile`` and ``tags``, and the certificate
        fingerprint when one is given (``None`` keeps the stored one).
        ``enrolled_at``, liveness and versions are preserved.
        """
        check_id(agent_id, "agent_id")
        check_id(profile, "profile")
        tag_list = check_str_list(tags, "tags")
        if cert_fingerprint is not None:
            check_id(cert_fingerprint, "cert_fingerprint")
        stmt = self._db.insert(t.agents).values(
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
        with self._db.tx(write=True) as conn:
            conn.execute(stmt)
            row = conn.execute(sa.select(t.agents).where(t.agents.c.agent_id == agent_id)).mappings().one()
            return AgentRecord.from_row(row)

    def get(self, agent_id: str) -> AgentRecord | None:
        """The agent's record, or None when it is not enrolled."""
        with self._db.tx(write=False) as conn:
            row = conn.execute(sa.select(t.agents).where(t.agents.c.agent_id == agent_id)).mappings().first()
            return None if row is None else AgentRecord.from_row(row)

    def all(self) -> list[AgentRecord]:
        """All enrolled agents, ordered by ``agent_id``."""
        with self._db.tx(write=False) as conn:
            rows = conn.execute(sa.select(t.agents).order_by(t.agents.c.agent_id)).mappings().all()
            return [AgentRecord.from_row(row) for row in rows]

    def remove(self, agent_id: str) -> None:
        """Remove an enrollment (NotFoundError if absent).  Its updates and events are kept."""
        with self._db.tx(write=True) as conn:
            result = conn.execute(sa.delete(t.agents).where(t.agents.c.agent_id == agent_id))
            if result.rowcount == 0:
                raise NotFoundError(f"agent {agent_id!r} not found")

    def _set(self, agent_id: str, values: dict[str, Any]) -> None:
        with self._db.tx(write=True) as conn:
            result = conn.execute(sa.update(t.agents).where(t.agents.c.agent_id == agent_id).values(**values))
            if result.rowcount == 0:
                raise NotFoundError(f"agent {agent_id!r} not found")

    def mark_seen(self, agent_id: str, *, online: bool | None = None, at: float | None = None) -> None:
        """Set ``last_seen`` to ``at`` (default: now); also ``online`` unless it is ``None``."""
        values: dict[str, Any] = {"last_seen": time.time() if at is None else check_float(at, "at")}
        if online is not None:
            values["online"] = bool(online)
        self._set(agent_id, values)

    def record_presence(self, agent_id: str, *, online: bool | None = None, seen_at: float | None = None) -> None:
        """Set ``online`` (unless None) and move ``last_seen`` forward to ``seen_at`` (never back)."""
        values: dict[str, Any] = {}
        if online is not None:
            values["online"] = bool(online)
        if seen_at is not None:
            at = check_float(seen_at, "seen_at")
            last = t.agents.c.last_seen
            values["last_seen"] = sa.case((last.is_(None), at), (last < at, at), else_=last)
        if values:
            self._set(agent_id, values)

    def page(
        self, *, offset: int = 0, limit: int = 100, query: str | None = None, online_since: float | None = None,
        online: bool | None = None,
    ) -> tuple[list[AgentRecord], int]:
        """One page of enrolled agents by id, and how many match in all.

        ``query`` keeps agents whose id contains it (case-insensitive); with ``online`` True
        (False) only the agents whose status is online and who were heard from at or after
        ``online_since`` (the others).
        """
        a = t.agents
        cond: list[sa.ColumnElement[bool]] = []
        if query:
            escaped = query.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            cond.append(sa.func.lower(a.c.agent_id).like(f"%{escaped}%", escape="\\"))
        if online is not None:
            if online_since is None:
                raise ValueError("filtering by online needs online_since")
            up = self.online_clause(online_since)
            cond.append(up if online else sa.not_(up))
        with self._db.tx(write=False) as conn:
            total = int(conn.execute(sa.select(sa.func.count()).select_from(a).where(*cond)).scalar_one())
            stmt = sa.select(a).where(*cond).order_by(a.c.agent_id).offset(max(0, offset)).limit(max(0, limit))
            return [AgentRecord.from_row(row) for row in conn.execute(stmt).mappings().all()], total

    def count_online(self, online_since: float) -> tuple[int, int]:
        """(enrolled agents, those online and heard from at or after ``online_since``)."""
        a = t.agents
        with self._db.tx(write=False) as conn:
            total = int(conn.execute(sa.select(sa.func.count()).select_from(a)).scalar_one())
            up = int(conn.execute(sa.select(sa.func.count()).select_from(a).where(self.online_clause(online_since))
                                  ).scalar_one())
            return total, up

    @staticmethod
    def online_clause(online_since: float) -> sa.ColumnElement[bool]:
        """SQL for "status online and heard from at or after ``online_since``"."""
        a = t.agents
        return sa.and_(a.c.online.is_(True), a.c.last_seen.is_not(None), a.c.last_seen >= online_since)

    def set_reported_version(self, agent_id: str, version: str | None) -> None:
        """The version the agent says it serves (None: none)."""
        if version is not None:
            check_id(version, "version")
        self._set(agent_id, {"reported_version": version})

    def set_desired_version(self, agent_id: str, version: str | None) -> None:
        """The version the agent should serve (None: none)."""
        if version is not None:
            check_id(version, "version")
        self._set(agent_id, {"desired_version": version})

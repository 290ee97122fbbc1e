"""The models repository: model versions and the staged rollouts that serve them (one aggregate)."""

from __future__ import annotations

import itertools
import time
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from coordinator.states import OPEN_ROLLOUT_STATES, ModelState, RolloutState, parse_state
from coordinator.store import schema as t
from coordinator.store.checks import check_float, check_id, check_json, check_str_list
from coordinator.store.errors import DuplicateError, NotFoundError, StoreError
from coordinator.store.records import ModelRecord, RolloutRecord
from coordinator.store.transactions import Database, require

ROLLOUT_FIELDS: Final = frozenset({"state", "stage", "stage_started_at", "healthy_since", "reason", "detail"})


class Models:
    """Model versions and rollouts.  Each method is one transaction, durable when it returns."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # ------------------------------------------------------------------ models

    def add(
        self,
        *,
        version: str,
        parent: str | None,
        round_id: int | None,
        manifest: dict[str, Any],
        participants: list[str],
        state: ModelState | str = ModelState.CANDIDATE,
    ) -> ModelRecord:
        """Record a model version.

        DuplicateError if ``version`` exists; NotFoundError if ``parent`` or ``round_id`` is
        given but unknown.
        """
        check_id(version, "version")
        model_state = parse_state(ModelState, state, "model state")
        check_json(manifest, "manifest")
        names = check_str_list(participants, "participants")
        m = t.models
        now = time.time()
        with self._db.tx(write=True) as conn:
            if conn.execute(sa.select(m.c.seq).where(m.c.version == version)).first():
                raise DuplicateError(f"model {version!r} already exists")
            if parent is not None:
                require(conn, m, m.c.version, parent, "parent model")
            if round_id is not None:
                require(conn, t.rounds, t.rounds.c.round_id, round_id, "round")
            try:
                seq = conn.execute(
                    sa.insert(m)
                    .values(
                        version=version,
                        parent=parent,
                        round_id=round_id,
                        manifest=dict(manifest),
                        participants=names,
                        state=model_state.value,
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(m.c.seq)
                ).scalar_one()
            except sa_exc.IntegrityError as exc:
                raise DuplicateError(f"model {version!r} already exists") from exc
            return ModelRecord.from_row(conn.execute(sa.select(m).where(m.c.seq == seq)).mappings().one())

    def get(self, version: str) -> ModelRecord | None:
        """The model ``version``, or None."""
        with self._db.tx(write=False) as conn:
            row = conn.execute(sa.select(t.models).where(t.models.c.version == version)).mappings().first()
            return None if row is None else ModelRecord.from_row(row)

    def all(self) -> list[ModelRecord]:
        """All model versions in creation order."""
        with self._db.tx(write=False) as conn:
            rows = conn.execute(sa.select(t.models).order_by(t.models.c.seq)).mappings().all()
            return [ModelRecord.from_row(row) for row in rows]

    def latest(self, *, state: ModelState | str | None = None) -> ModelRecord | None:
        """The most recently created model (optionally: in ``state``)."""
        m = t.models
        stmt = sa.select(m).order_by(m.c.seq.desc()).limit(1)
        if state is not None:
            stmt = stmt.where(m.c.state == parse_state(ModelState, state, "model state").value)
        with self._db.tx(write=False) as conn:
            row = conn.execute(stmt).mappings().first()
            return None if row is None else ModelRecord.from_row(row)

    def set_state(self, version: str, state: ModelState | str) -> None:
        """Set the lifecycle state, unchecked (``coordinator.lifecycle.transition`` checks it)."""
        value = parse_state(ModelState, state, "model state").value
        with self._db.tx(write=True) as conn:
            result = conn.execute(
                sa.update(t.models).where(t.models.c.version == version).values(state=value, updated_at=time.time())
            )
            if result.rowcount == 0:
                raise NotFoundError(f"model {version!r} not found")

    # ------------------------------------------------------------------ rollouts

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
        """Record a new ``running`` rollout at stage 0, created and started ``at`` (default now).

        NotFoundError if the model is unknown; DuplicateError if another rollout is still
        running, paused or rolling back.
        """
        check_id(version, "version")
        for value, name in ((cohort, "cohort"), (stages, "stages"), (agents, "agents"), (previous, "previous"),
                            (config, "config")):
            check_json(value, name)
        if not stages or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in stages):
            raise ValueError("stages must be a non-empty list of positive ints")
        if any(b <= a for a, b in itertools.pairwise(stages)) or stages[-1] > len(agents):
            raise ValueError("stages must increase strictly and not exceed the number of agents")
        r = t.rollouts
        now = time.time() if at is None else check_float(at, "at")
        open_values = [s.value for s in OPEN_ROLLOUT_STATES]
        with self._db.tx(write=True) as conn:
            require(conn, t.models, t.models.c.version, version, "model")
            open_ = conn.execute(sa.select(r.c.rollout_id).where(r.c.state.in_(open_values))).first()
            if open_ is not None:
                raise DuplicateError(f"rollout {open_[0]} is still open; finish, roll back or wait for it first")
            rid = conn.execute(
                sa.insert(r)
                .values(version=version, state=RolloutState.RUNNING.value, cohort=dict(cohort), stages=list(stages),
                        agents=list(agents), previous=dict(previous), stage=0, stage_started_at=now,
                        healthy_since=None, config=dict(config), reason=None, detail=None, created_at=now,
                        updated_at=now)
                .returning(r.c.rollout_id)
            ).scalar_one()
            return RolloutRecord.from_row(conn.execute(sa.select(r).where(r.c.rollout_id == rid)).mappings().one())

    def get_rollout(self, rollout_id: int) -> RolloutRecord | None:
        """The rollout, or None."""
        with self._db.tx(write=False) as conn:
            row = conn.execute(sa.select(t.rollouts).where(t.rollouts.c.rollout_id == rollout_id)).mappings().first()
            return None if row is None else RolloutRecord.from_row(row)

    def list_rollouts(self) -> list[RolloutRecord]:
        """All rollouts, oldest first."""
        with self._db.tx(write=False) as conn:
            rows = conn.execute(sa.select(t.rollouts).order_by(t.rollouts.c.rollout_id)).mappings().all()
            return [RolloutRecord.from_row(row) for row in rows]

    def update_rollout(
        self, rollout_id: int, *, expect_state: RolloutState | str | None = None, **values: Any
    ) -> RolloutRecord:
        """Change progress fields (state, stage, stage_started_at, healthy_since, reason, detail).

        With ``expect_state`` the change applies only if the rollout is still in that state
        (compare-and-set between the CLI and the coordinator's driver); otherwise StoreError.
        """
        unknown = set(values) - ROLLOUT_FIELDS
        if unknown:
            raise ValueError(f"cannot update rollout fields {sorted(unknown)}")
        if "state" in values:
            values["state"] = parse_state(RolloutState, values["state"], "rollout state").value
        if values.get("detail") is not None:
            check_json(values["detail"], "detail")
        r = t.rollouts
        with self._db.tx(write=True) as conn:
            stmt = sa.update(r).where(r.c.rollout_id == rollout_id)
            if expect_state is not None:
                stmt = stmt.where(r.c.state == parse_state(RolloutState, expect_state, "rollout state").value)
            result = conn.execute(stmt.values(**values, updated_at=time.time()))
            if result.rowcount == 0:
                row = conn.execute(sa.select(r.c.state).where(r.c.rollout_id == rollout_id)).first()
                if row is None:
                    raise NotFoundError(f"rollout {rollout_id} not found")
                raise StoreError(f"rollout {rollout_id} is {row[0]}, not {expect_state}")
            return RolloutRecord.from_row(conn.execute(sa.select(r).where(r.c.rollout_id == rollout_id)).mappings().one())

"""Current table definitions (SQLAlchemy Core) used by the store's queries.

This module describes the schema *at migration head*.  It is **not** used to
create tables: the database is only ever changed by the Alembic scripts in
``coordinator/store/migrations/versions``.  ``tests/test_store.py`` compares
this metadata with a freshly migrated database on every backend, so a table
or column added here without a migration (or vice versa) fails the suite.
"""

from __future__ import annotations

import sqlalchemy as sa

# Deterministic constraint names: needed by later migrations that alter or
# drop constraints (SQLite batch mode rebuilds tables and must find them).
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

# Identifiers (agent ids, versions, update ids) are bounded strings; JSON
# columns use the portable JSON type (``json`` on PostgreSQL, which keeps the
# document byte-for-byte; TEXT on SQLite).
ID = sa.String(255)
JSON_DOC = sa.JSON()
JSON_OPT = sa.JSON(none_as_null=True)

agents = sa.Table(
    "agents",
    metadata,
    sa.Column("agent_id", ID, primary_key=True),
    sa.Column("profile", ID, nullable=False),
    sa.Column("tags", JSON_DOC, nullable=False),
    sa.Column("cert_fingerprint", ID, nullable=True),
    sa.Column("enrolled_at", sa.Double(), nullable=False),
    sa.Column("last_seen", sa.Double(), nullable=True),
    sa.Column("online", sa.Boolean(), nullable=False),
    sa.Column("reported_version", ID, nullable=True),
    sa.Column("desired_version", ID, nullable=True),
)

rounds = sa.Table(
    "rounds",
    metadata,
    sa.Column("round_id", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("base_version", ID, nullable=False),
    sa.Column("config", JSON_DOC, nullable=False),
    sa.Column("deadline", sa.Double(), nullable=False),
    sa.Column("mode", sa.String(32), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("result_version", ID, nullable=True),
    sa.Column("detail", JSON_OPT, nullable=True),
    sa.Column("created_at", sa.Double(), nullable=False),
    sa.Column("updated_at", sa.Double(), nullable=False),
)

# Agent ids in updates/events are deliberately *not* foreign keys: removing an
# agent must not rewrite or block the audit trail of what it contributed.
updates = sa.Table(
    "updates",
    metadata,
    sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("update_id", ID, nullable=False),
    sa.Column("round_id", sa.Integer(), sa.ForeignKey("rounds.round_id"), nullable=False),
    sa.Column("agent_id", ID, nullable=False),
    sa.Column("sample_count", sa.Integer(), nullable=False),
    sa.Column("metrics", JSON_DOC, nullable=False),
    sa.Column("blob_sha256", sa.String(64), nullable=False),
    sa.Column("nbytes", sa.BigInteger(), nullable=False),
    sa.Column("staleness", sa.Integer(), nullable=False),
    sa.Column("received_at", sa.Double(), nullable=False),
    sa.UniqueConstraint("agent_id", "update_id"),  # ids are the agent's own (migration 0003)
    sa.UniqueConstraint("round_id", "agent_id"),
    sa.Index(None, "blob_sha256"),
    sqlite_autoincrement=True,
)

models = sa.Table(
    "models",
    metadata,
    sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("version", ID, nullable=False),
    sa.Column("parent", ID, sa.ForeignKey("models.version"), nullable=True),
    sa.Column("round_id", sa.Integer(), sa.ForeignKey("rounds.round_id"), nullable=True),
    sa.Column("manifest", JSON_DOC, nullable=False),
    sa.Column("participants", JSON_DOC, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("created_at", sa.Double(), nullable=False),
    sa.Column("updated_at", sa.Double(), nullable=False),
    sa.UniqueConstraint("version"),
    sqlite_autoincrement=True,
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("agent_id", ID, nullable=True),
    sa.Column("round_id", sa.Integer(), nullable=True),
    sa.Column("reason", sa.String(128), nullable=True),
    sa.Column("detail", JSON_OPT, nullable=True),
    sa.Column("at", sa.Double(), nullable=False),
    sa.Index(None, "kind", "reason"),
    sa.Index(None, "round_id"),
    sqlite_autoincrement=True,
)

# Staged rollouts (migration 0002). ``agents`` is the cohort in rollout order,
# frozen at start; ``stages`` the cumulative agent counts per stage;
# ``previous`` maps each agent to the version it was desired to serve before.
rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("rollout_id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("version", ID, sa.ForeignKey("models.version"), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("cohort", JSON_DOC, nullable=False),
    sa.Column("stages", JSON_DOC, nullable=False),
    sa.Column("agents", JSON_DOC, nullable=False),
    sa.Column("previous", JSON_DOC, nullable=False),
    sa.Column("stage", sa.Integer(), nullable=False),
    sa.Column("stage_started_at", sa.Double(), nullable=True),
    sa.Column("healthy_since", sa.Double(), nullable=True),
    sa.Column("config", JSON_DOC, nullable=False),
    sa.Column("reason", sa.String(128), nullable=True),
    sa.Column("detail", JSON_OPT, nullable=True),
    sa.Column("created_at", sa.Double(), nullable=False),
    sa.Column("updated_at", sa.Double(), nullable=False),
    sa.Index(None, "state"),
    sqlite_autoincrement=True,
)

"""Initial coordinator state: agents, rounds, updates, models, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

Written out in full (not imported from ``coordinator.store.schema``) so the
migration stays frozen when the current schema evolves.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("agent_id", sa.String(255), nullable=False),
        sa.Column("profile", sa.String(255), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("cert_fingerprint", sa.String(255), nullable=True),
        sa.Column("enrolled_at", sa.Double(), nullable=False),
        sa.Column("last_seen", sa.Double(), nullable=True),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("reported_version", sa.String(255), nullable=True),
        sa.Column("desired_version", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("agent_id", name="pk_agents"),
    )
    op.create_table(
        "rounds",
        sa.Column("round_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("base_version", sa.String(255), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("deadline", sa.Double(), nullable=False),
        sa.Column("mode", sa.String(32), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("result_version", sa.String(255), nullable=True),
        sa.Column("detail", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("round_id", name="pk_rounds"),
    )
    op.create_table(
        "updates",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("update_id", sa.String(255), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("agent_id", sa.String(255), nullable=False),
        sa.Column("sample_count", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("blob_sha256", sa.String(64), nullable=False),
        sa.Column("nbytes", sa.BigInteger(), nullable=False),
        sa.Column("staleness", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_updates"),
        sa.UniqueConstraint("update_id", name="uq_updates_update_id"),
        sa.UniqueConstraint("round_id", "agent_id", name="uq_updates_round_id_agent_id"),
        sa.ForeignKeyConstraint(["round_id"], ["rounds.round_id"], name="fk_updates_round_id_rounds"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_updates_blob_sha256", "updates", ["blob_sha256"])
    op.create_table(
        "models",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("version", sa.String(255), nullable=False),
        sa.Column("parent", sa.String(255), nullable=True),
        sa.Column("round_id", sa.Integer(), nullable=True),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("participants", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_models"),
        sa.UniqueConstraint("version", name="uq_models_version"),
        sa.ForeignKeyConstraint(["parent"], ["models.version"], name="fk_models_parent_models"),
        sa.ForeignKeyConstraint(["round_id"], ["rounds.round_id"], name="fk_models_round_id_rounds"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "events",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("agent_id", sa.String(255), nullable=True),
        sa.Column("round_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.String(128), nullable=True),
        sa.Column("detail", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_events"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_events_kind_reason", "events", ["kind", "reason"])
    op.create_index("ix_events_round_id", "events", ["round_id"])


def downgrade() -> None:
    op.drop_index("ix_events_round_id", table_name="events")
    op.drop_index("ix_events_kind_reason", table_name="events")
    op.drop_table("events")
    op.drop_table("models")
    op.drop_index("ix_updates_blob_sha256", table_name="updates")
    op.drop_table("updates")
    op.drop_table("rounds")
    op.drop_table("agents")

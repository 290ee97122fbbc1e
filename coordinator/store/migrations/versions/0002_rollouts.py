"""Staged rollouts (fleet issue): one row per rollout, its plan and progress.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

Written out in full (not imported from ``coordinator.store.schema``) so the
migration stays frozen when the current schema evolves.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("rollout_id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("version", sa.String(255), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("cohort", sa.JSON(), nullable=False),
        sa.Column("stages", sa.JSON(), nullable=False),
        sa.Column("agents", sa.JSON(), nullable=False),
        sa.Column("previous", sa.JSON(), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("stage_started_at", sa.Double(), nullable=True),
        sa.Column("healthy_since", sa.Double(), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("reason", sa.String(128), nullable=True),
        sa.Column("detail", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("rollout_id", name="pk_rollouts"),
        sa.ForeignKeyConstraint(["version"], ["models.version"], name="fk_rollouts_version_models"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_rollouts_state", "rollouts", ["state"])


def downgrade() -> None:
    op.drop_index("ix_rollouts_state", table_name="rollouts")
    op.drop_table("rollouts")

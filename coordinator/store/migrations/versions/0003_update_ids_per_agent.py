"""Update ids are unique per agent, not across the fleet (issue 15 item 1).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

An agent chooses its own update ids; with one fleet-wide unique key an agent that uploaded
under another agent's id made the coordinator answer the victim ``duplicate``. The key is now
(agent_id, update_id). Written out in full so the migration stays frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite rebuilds the table (keeping AUTOINCREMENT), PostgreSQL alters it in place
    with op.batch_alter_table("updates", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_constraint("uq_updates_update_id", type_="unique")
        batch.create_unique_constraint("uq_updates_agent_id_update_id", ["agent_id", "update_id"])


def downgrade() -> None:
    with op.batch_alter_table("updates", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_constraint("uq_updates_agent_id_update_id", type_="unique")
        batch.create_unique_constraint("uq_updates_update_id", ["update_id"])

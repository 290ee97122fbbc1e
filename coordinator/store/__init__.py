"""Coordinator state store: SQLAlchemy 2 + Alembic, SQLite or PostgreSQL.

Public API::

    from coordinator.store import open_store, BlobStore

    store = open_store("sqlite:///var/lib/fedscan/state.db")  # migrates to head
    blobs = BlobStore("/var/lib/fedscan/blobs")
    sha = blobs.put(frame)                       # 1. durable blob first
    store.add_update(round_id=r, agent_id=a, update_id=u, sample_count=n,
                     metrics={...}, blob_sha256=sha, nbytes=len(frame))  # 2. row

Every :class:`Store` method is one transaction, durable when it returns.
Records are frozen dataclasses (:mod:`coordinator.store.records`); errors derive
from :class:`StoreError`; invalid arguments raise :class:`ValueError`.

Layout
------
``schema.py``
    SQLAlchemy Core tables at migration head (used by queries only).
``migrations/versions/NNNN_*.py``
    Alembic revisions; the only thing that ever changes the database.
``db.py``
    Engine setup (SQLite WAL/FULL sync/foreign keys/busy timeout, PostgreSQL)
    and the programmatic ``upgrade_to_head`` run by :func:`open_store`.
``transactions.py``
    :class:`Database`: one transaction per call, driver errors as :class:`StoreError`.
``checks.py``
    Argument checks (pure functions) shared by the repositories.
``records.py``
    The frozen records and how each is read from a row (``from_row``).
``agents.py`` / ``rounds.py`` / ``models.py`` / ``events.py``
    One repository per aggregate: agents; rounds + updates; models + rollouts; events.
``store.py``
    :class:`Store`, the façade holding the four repositories, and :func:`open_store`;
    ``blobs.py``: :class:`BlobStore`.

Adding a table later (e.g. rollouts)
------------------------------------
1. Add ``migrations/versions/0002_rollouts.py`` with ``revision = "0002"``,
   ``down_revision = "0001"`` and ``upgrade()``/``downgrade()`` written out
   in full with ``op.create_table(...)`` / ``op.create_index(...)`` -- do not
   import ``schema.py`` from a migration, migrations must stay frozen.
   Use explicit constraint names following ``schema.NAMING_CONVENTION``
   (``pk_rollouts``, ``fk_rollouts_<col>_<table>``, ``uq_...``, ``ix_...``).
   To alter an existing table use ``with op.batch_alter_table("agents") as b:``
   so SQLite can rebuild the table (migrations run with SQLite foreign keys
   off, followed by ``PRAGMA foreign_key_check`` before commit).
   ``0001_initial.py`` is the template to copy.
2. Add the same ``sa.Table("rollouts", metadata, ...)`` to ``schema.py``.
   ``test_schema_matches_migrations`` fails until 1 and 2 agree, on both
   backends.
3. Add a ``RolloutRecord`` dataclass (with ``from_row``) to ``records.py`` and
   the methods to the repository of its aggregate (one
   ``with self._db.tx(write=True)`` block per method), plus contract tests in
   ``tests/test_store.py``.
Existing databases pick the revision up automatically on the next
:func:`open_store`.  A database migrated by *newer* code is refused with
:class:`StoreError` rather than touched.
"""

from __future__ import annotations

from coordinator.store.blobs import BlobStore
from coordinator.store.errors import BlobCorruptError, DuplicateError, NotFoundError, StoreError
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
from coordinator.store.store import Store, open_store

__all__ = [
    "MODEL_STATES",
    "ROLLOUT_STATES",
    "ROUND_STATUSES",
    "AgentRecord",
    "BlobCorruptError",
    "BlobStore",
    "DuplicateError",
    "EventRecord",
    "ModelRecord",
    "NotFoundError",
    "RolloutRecord",
    "RoundRecord",
    "Store",
    "StoreError",
    "UpdateRecord",
    "open_store",
]

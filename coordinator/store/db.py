"""Engine construction and schema migration for the state store.

SQLite (embedded default)
    ``sqlite:///path/state.db``.  Every connection runs with
    ``journal_mode=WAL``, ``synchronous=FULL`` (a commit is fsynced to the WAL
    before it returns, so it survives SIGKILL *and* power loss),
    ``foreign_keys=ON`` and a busy timeout.  The pysqlite driver's own
    transaction handling is disabled and transactions are begun explicitly:
    read transactions with ``BEGIN`` (deferred: concurrent with writers under
    WAL), write transactions with ``BEGIN IMMEDIATE`` so two writers never
    deadlock on a lock upgrade; they queue on the busy timeout instead.

PostgreSQL (scale-out)
    ``postgresql+psycopg://user@host/db`` (``postgresql://`` and
    ``postgres://`` are mapped to the psycopg 3 driver).  READ COMMITTED;
    concurrent migrations are serialised with a transaction-scoped advisory
    lock.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from coordinator.store.errors import StoreError

MIGRATIONS_DIR: Final[Path] = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_S: Final[float] = 30.0
# Execution option marking a connection whose transactions will write.
WRITE_OPTION: Final[str] = "fedscan_store_write"
# Arbitrary constant key for pg_advisory_xact_lock while migrating.
_PG_MIGRATION_LOCK: Final[int] = 0x0FED5CA0


def normalize_url(url: str) -> sa.URL:
    """The URL with PostgreSQL names mapped to the psycopg 3 driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str) -> Engine:
    """Create an engine configured for the store's durability contract."""
    parsed = normalize_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _make_sqlite_engine(parsed)
    if backend == "postgresql":
        return sa.create_engine(parsed, pool_pre_ping=True)
    raise StoreError(f"unsupported database backend {backend!r} (use sqlite or postgresql+psycopg)")


def _make_sqlite_engine(url: sa.URL) -> Engine:
    database = url.database or ""
    in_memory = database in ("", ":memory:") or url.query.get("mode") == "memory"
    kwargs: dict[str, Any] = {
        "connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
    }
    if in_memory:
        kwargs["poolclass"] = StaticPool  # one shared connection, else each would see its own DB
    else:
        Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        # Take transaction control away from pysqlite; see module docstring.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = bool(conn.get_execution_options().get(WRITE_OPTION))
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def alembic_config() -> Config:
    """Alembic configuration pointing at this package's migrations."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str | None:
    """The newest revision of the migrations."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: not migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_to_head(engine: Engine) -> None:
    """Migrate the database to the newest revision, in one transaction.

    Safe to call concurrently from several processes: SQLite serialises on
    ``BEGIN IMMEDIATE``, PostgreSQL on an advisory lock, and the current
    revision is read only after the lock is held.
    """
    head = head_revision()
    cfg = alembic_config()
    is_sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})
        if is_sqlite:
            # Table rebuilds (batch migrations) must run with FK enforcement
            # off; integrity is re-checked below before committing.  This
            # PRAGMA is a no-op inside a transaction, so issue it on the raw
            # driver connection, which is in autocommit mode.
            _sqlite_pragma(conn, "PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                if engine.dialect.name == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
                before = MigrationContext.configure(conn).get_current_revision()
                if before == head:
                    return
                if before is not None and not _known_revision(before):
                    raise StoreError(
                        f"database schema is at revision {before!r}, unknown to this code "
                        f"(head {head!r}); refusing to touch a newer database"
                    )
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                if is_sqlite:
                    bad = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if bad:
                        raise StoreError(f"foreign key violations after migration: {bad[:5]}")
        finally:
            if is_sqlite:
                _sqlite_pragma(conn, "PRAGMA foreign_keys=ON")


def _known_revision(rev: str) -> bool:
    script = ScriptDirectory.from_config(alembic_config())
    try:
        return script.get_revision(rev) is not None
    except Exception:  # alembic raises various ResolutionError subclasses
        return False


def _sqlite_pragma(conn: Connection, sql: str) -> None:
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    cursor = dbapi.cursor()
    try:
        cursor.execute(sql)
    finally:
        cursor.close()

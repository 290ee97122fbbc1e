"""One database transaction per store call: the plumbing every repository shares.

:class:`Database` wraps the engine built by :mod:`coordinator.store.db`. ``tx(write=...)``
yields a connection inside one transaction that commits on normal exit and rolls back on any
error; driver errors become :class:`StoreError`. A write transaction returns only after its
commit is durable (see :mod:`coordinator.store.db`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine

from coordinator.store.db import WRITE_OPTION
from coordinator.store.errors import NotFoundError, StoreError


class Database:
    """The engine, its closed flag and the transaction helper. Thread-safe."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._closed = False
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self.engine.url.render_as_string(hide_password=True)

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.engine.dialect.name

    def close(self) -> None:
        """Release all connections.  Idempotent; later transactions raise StoreError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.engine.dispose()

    @contextmanager
    def tx(self, *, write: bool) -> Iterator[Connection]:
        """One transaction; commits on normal exit, rolls back on any error."""
        if self._closed:
            raise StoreError("store is closed")
        try:
            with self.engine.connect() as conn:
                if write:
                    conn.execution_options(**{WRITE_OPTION: True})
                with conn.begin():
                    yield conn
        except StoreError:
            raise
        except sa_exc.SQLAlchemyError as exc:
            raise StoreError(f"database error: {exc}") from exc

    def insert(self, table: sa.Table) -> Any:
        """Dialect-specific INSERT supporting ``on_conflict_do_update``."""
        if self.engine.dialect.name == "postgresql":
            return pg_dialect.insert(table)
        return sqlite_dialect.insert(table)


def require(conn: Connection, table: sa.Table, column: sa.Column[Any], key: object, what: str) -> None:
    """NotFoundError unless ``table`` has a row whose ``column`` equals ``key``."""
    found = conn.execute(sa.select(sa.literal(1)).select_from(table).where(column == key)).first()
    if found is None:
        raise NotFoundError(f"{what} {key!r} not found")

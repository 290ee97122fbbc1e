"""Alembic environment for the coordinator state store.

Normally driven by :func:`coordinator.store.open_store`, which passes an open
connection (already inside a write transaction) as
``config.attributes["connection"]``; every pending revision then runs in that
single transaction.  For ad-hoc CLI use (``alembic upgrade``, ``alembic
revision``) pass the database with ``-x url=sqlite:///state.db``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from coordinator.store.db import WRITE_OPTION, make_engine
from coordinator.store.schema import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        _run(connection)
        return

    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("pass the database with: alembic -x url=<sqlalchemy url> ...")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                _run(conn)
    finally:
        engine.dispose()


_main()

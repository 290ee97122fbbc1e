"""Alembic migration environment of the coordinator state store.

Not a regular import target: Alembic loads ``env.py`` and ``versions/*.py``
from this folder by path.  See :mod:`coordinator.store` for how to add a
migration.
"""

"""Alembic revision scripts (loaded by path, one file per revision)."""

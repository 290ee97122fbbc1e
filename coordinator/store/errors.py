"""Exceptions raised by the coordinator state store."""

from __future__ import annotations


class StoreError(Exception):
    """Base class for every error raised by :mod:`coordinator.store`.

    Database driver failures (connection lost, lock timeout, ...) are wrapped
    in a plain :class:`StoreError` with the original exception chained as
    ``__cause__``.
    """


class DuplicateError(StoreError):
    """The record (or a uniqueness key of it) already exists."""


class NotFoundError(StoreError):
    """The record addressed by the call, or one it references, does not exist."""


class BlobCorruptError(StoreError):
    """A stored blob no longer hashes to its name."""

"""The state store's family of the error model (``protocol.errors.FedscanError``)."""

from __future__ import annotations

from protocol.errors import FedscanError, Reason


class StoreError(FedscanError):
    """Base class for every error raised by :mod:`coordinator.store` (reason ``store_error``).

    Database driver failures (connection lost, lock timeout, ...) are wrapped
    in a plain :class:`StoreError` with the original exception chained as
    ``__cause__``.
    """

    reason = Reason.STORE_ERROR


class DuplicateError(StoreError):
    """The record (or a uniqueness key of it) already exists."""

    reason = Reason.DUPLICATE


class NotFoundError(StoreError):
    """The record addressed by the call, or one it references, does not exist."""

    reason = Reason.NOT_FOUND


class BlobCorruptError(StoreError):
    """A stored blob no longer hashes to its name."""

    reason = Reason.BLOB_CORRUPT

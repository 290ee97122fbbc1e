"""The model slot a job's server keeps: what is served now, swapped whole on activation."""

from __future__ import annotations

import threading
from typing import Generic, Protocol, TypeVar

from protocol.manifest import Manifest

__all__ = ["JobModelSlot"]


class _HasManifest(Protocol):
    @property
    def manifest(self) -> Manifest: ...


S = TypeVar("S", bound=_HasManifest)


class JobModelSlot(Generic[S]):
    """Holds the served model of one job (``_current``, replaced atomically) and its inference lock."""

    def __init__(self) -> None:
        """Start with nothing served."""
        self._current: S | None = None
        self._lock = threading.Lock()  # one inference at a time: torch on a small box

    @property
    def ready(self) -> bool:
        """A model of this job is loaded."""
        return self._current is not None

    @property
    def version(self) -> str | None:
        """The served model's version."""
        return self._current.manifest.version if self._current else None

"""Which inference engine serves the active model, and why faster ones were skipped.

Whoever activates an engine (the composition root's activation listener) records it here; the
agent reads it into every reported shadow (the rollout and the fleet view show it).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping


class EngineReport:
    """The engine of the active model (``None`` before the first activation) and the skip reasons."""

    def __init__(self) -> None:
        """Start with no engine recorded."""
        self._lock = threading.Lock()
        self._engine: str | None = None
        self._skipped: dict[str, str] = {}

    def set(self, engine: str, skipped: Mapping[str, str] | None = None) -> None:
        """Record the engine now serving and, per engine skipped on the way, why."""
        with self._lock:
            self._engine, self._skipped = engine, dict(skipped or {})

    @property
    def engine(self) -> str:
        """The engine's name (``torch`` before any engine was recorded)."""
        return self._engine or "torch"

    def detail(self) -> dict[str, object]:
        """``{"engine", "skipped"}`` for the reported shadow's detail; empty before the first activation."""
        with self._lock:
            if self._engine is None:
                return {}
            return {"engine": self._engine, "skipped": dict(self._skipped)}

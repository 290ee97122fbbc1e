"""Cooperative pause for the training loop: inference requests and resource gates stop training between batches."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TrainingCancelled(RuntimeError):
    """Raised from :meth:`PauseHook.wait_if_paused` after :meth:`PauseHook.cancel`."""


class PauseHook:
    """Cooperative pause switch checked by the training loop before every batch.

    Paused when :meth:`pause` was called (until :meth:`resume`) or when the optional
    ``should_pause()`` predicate returns True (polled every ``poll_s`` while waiting), e.g.
    "an inference request is queued" or "GPU above its temperature gate". Thread-safe.
    """

    def __init__(self, should_pause: Callable[[], bool] | None = None, *, poll_s: float = 0.05) -> None:
        """Start unpaused; ``should_pause`` is polled every ``poll_s`` seconds while waiting."""
        self._should_pause = should_pause
        self._poll_s = poll_s
        self._cond = threading.Condition()
        self._manual = False
        self._cancelled = False
        self.pauses = 0  # how many times the loop actually waited

    def pause(self) -> None:
        """Pause the loop before its next batch, until :meth:`resume`."""
        with self._cond:
            self._manual = True

    def resume(self) -> None:
        """Lift a :meth:`pause` (a ``should_pause`` predicate may still hold the loop)."""
        with self._cond:
            self._manual = False
            self._cond.notify_all()

    def cancel(self) -> None:
        """Make the waiting (or next) :meth:`wait_if_paused` raise :class:`TrainingCancelled`."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    @property
    def cancelled(self) -> bool:
        """Tell whether :meth:`cancel` was called."""
        return self._cancelled

    @property
    def paused(self) -> bool:
        """Tell whether the loop should stop before its next batch (paused, cancelled or the predicate holds)."""
        return self._manual or self._cancelled or bool(self._should_pause and self._should_pause())

    def wait_if_paused(self, timeout: float | None = None) -> float:
        """Block while paused; return the seconds waited.

        Raises :class:`TrainingCancelled` when cancelled, ``TimeoutError`` when still paused after
        ``timeout`` seconds.
        """
        t0 = time.monotonic()
        waited = False
        with self._cond:
            while True:
                if self._cancelled:
                    raise TrainingCancelled("training cancelled while paused")
                if not (self._manual or (self._should_pause and self._should_pause())):
                    break
                waited = True
                left = None if timeout is None else timeout - (time.monotonic() - t0)
                if left is not None and left <= 0:
                    raise TimeoutError(f"still paused after {timeout} s")
                step = self._poll_s if self._should_pause else None
                self._cond.wait(step if left is None else min(left, step or left))
        if waited:
            self.pauses += 1
        return time.monotonic() - t0

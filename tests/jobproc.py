"""Helpers of the job integration tests that run ``python -m fedscan`` processes over a real broker."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tools import forkserver


def spawn_fedscan(args: list[str], log: Path, *, forked: bool = True, **env: str) -> subprocess.Popen[bytes]:
    """Start ``python -m fedscan ARGS`` (one torch thread, unbuffered) with its output appended to ``log``;
    forked from the fork server unless ``forked`` is False (tools/forkserver.py)."""
    with open(log, "ab") as fh:
        return subprocess.Popen([*forkserver.command(forked=forked), *args], stdout=fh, stderr=subprocess.STDOUT,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env))


def wait_logged(cond: Callable[[], bool], timeout: float, what: str, logs: list[Path]) -> None:
    """Wait for ``cond``; on timeout fail with the tails of ``logs``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    tails = "\n".join(f"===== {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tails}")

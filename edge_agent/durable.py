"""Writes that survive a power loss: the file's bytes and its directory entry reach the disk.

``atomic_write`` writes a temporary file beside the target, fsyncs it, renames it over the
target and fsyncs the directory, so after a crash the target holds either the old or the new
bytes, never a torn mix, and a rename that was acknowledged is not lost. Used for everything the
agent must not forget: installed models and the ``ACTIVE`` pointer, the outbox, the privacy
budget.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (creations, renames, deletions in it) to the disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (file and directory fsynced)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def durable_unlink(path: Path) -> bool:
    """Delete ``path`` (if present) and flush its directory; whether it existed."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def durable_mkdir(path: Path) -> None:
    """Create ``path`` (and parents) and flush the parent's entry for it."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True)
    fsync_dir(path.parent)

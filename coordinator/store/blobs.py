"""Content-addressed blob folder for accepted update frames and model files.

Layout: ``<root>/<sha[:2]>/<sha>``.  Writes go to a temp file in the same
directory, are fsynced, renamed into place and the directory is fsynced, so a
blob either exists completely under its final name or not at all, even if the
process is SIGKILLed or the box loses power.  The coordinator writes a frame
here *before* recording the update in the database; a crash in between leaves
an orphan blob (harmless, collectable by comparing :meth:`BlobStore.iter_shas`
with the database), never a database row without its blob.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from coordinator.store.errors import BlobCorruptError, NotFoundError

_SHA_RE: Final = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX: Final = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Blobs named by the lowercase hex sha256 of their content."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _check(sha: str) -> str:
        if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
            raise ValueError(f"not a lowercase hex sha256: {sha!r}")
        return sha

    def path(self, sha: str) -> Path:
        """Final location of blob ``sha`` (which may not exist)."""
        self._check(sha)
        return self.root / sha[:2] / sha

    def put(self, data: bytes) -> str:
        """Store ``data`` durably and return its sha256.  Idempotent."""
        view = memoryview(data)
        sha = hashlib.sha256(view).hexdigest()
        final = self.path(sha)
        try:
            if final.stat().st_size == len(view) and self._intact(final, sha):
                return sha  # already stored (a corrupt copy is rewritten below)
        except FileNotFoundError:
            pass
        if not final.parent.is_dir():
            final.parent.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.root)  # the new shard folder's entry must survive a power loss too
        fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(view)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        _fsync_dir(final.parent)
        return sha

    @staticmethod
    def _intact(path: Path, sha: str) -> bool:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest() == sha

    def get(self, sha: str) -> bytes:
        """Return the content of ``sha``; BlobCorruptError if it no longer hashes to ``sha``."""
        try:
            data = self.path(sha).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"blob {sha} not found") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha:
            raise BlobCorruptError(f"blob {sha} is corrupt (content hashes to {actual})")
        return data

    def has(self, sha: str) -> bool:
        """Whether blob ``sha`` exists (not checked for corruption)."""
        return self.path(sha).is_file()

    def delete(self, sha: str) -> bool:
        """Remove blob ``sha``; returns whether it existed."""
        final = self.path(sha)
        try:
            final.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(final.parent)
        return True

    def iter_shas(self) -> Iterator[str]:
        """Every stored blob name (for garbage collection against the database)."""
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                for entry in sorted(sub.iterdir()):
                    if _SHA_RE.fullmatch(entry.name) and entry.name.startswith(sub.name):
                        yield entry.name

    def sweep_temp(self, max_age_s: float = 3600.0) -> int:
        """Remove temp files left by writers killed mid-``put``; returns how many.

        Only files older than ``max_age_s`` go, so a writer still at work keeps its file; the
        coordinator sweeps with 0 at start-up, when nothing of its own is writing yet.
        """
        cutoff = time.time() - max_age_s
        removed = 0
        for tmp in self.root.glob(f"*/{_TMP_PREFIX}*"):
            try:
                if tmp.stat().st_mtime <= cutoff:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

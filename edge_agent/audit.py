"""Append-only JSONL audit of every diagnosis (and every refusal and finding).

One JSON object per line: ``time`` (UTC ISO 8601), ``event``, ``caller`` (the token's name or
``dicom:<AE title>``), ``study_id``, ``model_version``, ``engine`` and the result. The record
type only has fields for these, so no pixels and no patient identifiers can reach the file; the
only free text is a refusal reason, which is one of the decoder's fixed codes. Each line is
written with one ``write`` on a file opened ``O_APPEND`` (lines from threads never interleave)
and flushed to the OS before the caller answers.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

Event = Literal["diagnosis", "segmentation", "anomaly", "rejected", "finding", "stored"]  # stored: kept, diagnosed once a model is in


@dataclass(frozen=True)
class AuditRecord:
    """One audit line: what happened to which study, for whom, by which model (never pixels or identifiers)."""

    event: Event
    caller: str
    study_id: str | None = None
    model_version: str | None = None
    engine: str | None = None
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    source: str | None = None
    reason: str | None = None
    status_code: int | None = None
    request_id: str | None = None  # the id in the answer's X-Request-ID and in the box's log
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))


class AuditLog:
    """The append-only JSONL audit file."""

    def __init__(self, path: str | Path, *, fsync: bool = False) -> None:
        """Open (or create, mode 0600) the audit file at ``path``; ``fsync`` each line when asked."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def append(self, record: AuditRecord) -> None:
        """Append one record as one line (one ``write`` on an ``O_APPEND`` file)."""
        line = (json.dumps(asdict(record), separators=(",", ":"), sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            os.write(self._fd, line)
            if self._fsync:
                os.fsync(self._fd)

    def records(self) -> Iterator[dict[str, object]]:
        """Yield every record, oldest first."""
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

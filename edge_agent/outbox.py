"""The agent's outbox: the encoded update of the current round, kept until the coordinator answers.

A restarted agent resends the same bytes (same update id: the coordinator answers ``duplicate``
when it already had them) instead of training again. Each entry is durable (frame and metadata
fsynced with their directory) and bound to its federation: the round, the base version and the
fingerprint of the base model's signed manifest (its canonical bytes include the coordinator's
creation time and tensor hash, the signature names the coordinator's key). A task whose binding
differs (a reset federation that reuses round numbers and version names) never gets an old frame:
the entry is deleted and the round trained afresh. An entry is deleted once the coordinator gives
its final answer, and entries of other rounds are pruned when a new task comes, so full models do
not pile up on the disk the DICOM store uses.

Update ids are random (128 bits), chosen when the entry is made and stored in its frame: nobody
can guess another box's id, and every resend of the same entry carries the same one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_agent.durable import atomic_write, durable_mkdir, durable_unlink
from protocol.manifest import Manifest

log = logging.getLogger("fedscan.agent.outbox")

_ENTRY = re.compile(r"^round-(\d+)\.(fsuf|json)$")


def new_update_id() -> str:
    """Return a fresh, unguessable update id (128 random bits)."""
    return secrets.token_hex(16)


def federation_fingerprint(base: Manifest) -> str:
    """Identify the federation a round belongs to by its base model's signed manifest."""
    signer = base.signature.key_id if base.signature is not None else "unsigned"
    return hashlib.sha256(base.canonical_bytes() + b"\x00" + signer.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Binding:
    """What an outbox entry belongs to: one round of one federation."""

    round_id: int
    base_version: str
    federation: str

    @classmethod
    def of(cls, round_id: int, base: Manifest) -> Binding:
        """Return the binding of a round trained from ``base``."""
        return cls(round_id, base.version, federation_fingerprint(base))


class Outbox:
    """Update frames by round under ``root``: ``round-N.fsuf`` (the frame), ``round-N.json`` (its binding)."""

    def __init__(self, root: Path) -> None:
        """Use ``root`` (created durably) and sweep what a crash left there."""
        self.root = root
        durable_mkdir(self.root)
        self._sweep()

    def _sweep(self) -> None:
        """Delete what a crash can leave: temporary files, frames without their metadata."""
        for p in self.root.iterdir():
            m = _ENTRY.match(p.name)
            if m is None:
                log.info("outbox: removing leftover %s", p.name)
                p.unlink(missing_ok=True)
            elif m.group(2) == "fsuf" and not self._meta(int(m.group(1))).exists():
                p.unlink(missing_ok=True)

    def _frame(self, round_id: int) -> Path:
        return self.root / f"round-{round_id}.fsuf"

    def _meta(self, round_id: int) -> Path:
        return self.root / f"round-{round_id}.json"

    def rounds(self) -> list[int]:
        """Return the rounds with a complete entry."""
        return sorted(int(m.group(1)) for p in self.root.iterdir()
                      if (m := _ENTRY.match(p.name)) is not None and m.group(2) == "json")

    def get(self, binding: Binding) -> bytes | None:
        """Return the stored frame for ``binding``; an entry of another federation is deleted instead."""
        meta, frame = self._meta(binding.round_id), self._frame(binding.round_id)
        if not meta.exists() or not frame.exists():
            return None
        try:
            stored = Binding(**json.loads(meta.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("outbox: unreadable entry for round %d (%s): deleted", binding.round_id, exc)
            stored = None
        if stored != binding:
            if stored is not None:
                log.warning("outbox: the stored update of round %d belongs to another federation (base %s %s, "
                            "now %s %s): deleted, never sent", binding.round_id, stored.base_version,
                            stored.federation[:8], binding.base_version, binding.federation[:8])
            self.remove(binding.round_id)
            return None
        return frame.read_bytes()

    def put(self, binding: Binding, frame: bytes) -> None:
        """Store ``frame`` durably for ``binding`` (the frame first, its metadata last marks it complete)."""
        atomic_write(self._frame(binding.round_id), frame)
        atomic_write(self._meta(binding.round_id), json.dumps(asdict(binding)).encode())

    def remove(self, round_id: int) -> None:
        """Delete the entry of ``round_id`` (metadata first, so a crash leaves no half entry that looks whole)."""
        durable_unlink(self._meta(round_id))
        durable_unlink(self._frame(round_id))

    def prune(self, keep: int) -> None:
        """Delete every entry except the one of round ``keep`` (older rounds are closed)."""
        for r in self.rounds():
            if r != keep:
                log.info("outbox: dropping the unsent update of round %d", r)
                self.remove(r)

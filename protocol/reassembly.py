"""Reassembly of chunked transfers, bounded per sender so that no sender can hurt another.

Transfers are keyed by ``(sender, transfer_id)``: the sender is who the transport says sent the
chunk (the agent of the topic, or ``"coordinator"`` for downloads), never a field of the chunk,
so one agent reusing another's transfer id only ever touches its own transfers. Per sender, the
open transfers and the bytes they *declare* are capped (:class:`ReassemblyLimits`); a chunk never
brings a transfer past the size it declared. A sender over its caps loses its own least recently
active transfers first; a new transfer that alone is too large, or that the whole reassembler
cannot hold, is refused. Transfers idle for longer than ``max_idle_s`` are dropped.

Within a transfer reassembly is idempotent (a duplicate chunk is ignored), names what is
missing, refuses a chunk whose count or totals differ from the transfer's (``transfer_changed``),
and hands out the blob only when every chunk arrived and the whole hash matches.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.chunks import Chunk
from protocol.errors import FrameError, Reason

__all__ = ["Reassembler", "Reassembly", "ReassemblyLimits"]

MiB = 1024 * 1024


@dataclass(frozen=True)
class ReassemblyLimits:
    """Caps of a :class:`Reassembler`; the defaults fit a full ResNet-18 update (≈45 MB) with room."""

    max_transfer_bytes: int = 512 * MiB  # the largest blob one transfer may declare
    max_transfers_per_sender: int = 4  # open transfers one sender may have
    max_bytes_per_sender: int = 1024 * MiB  # sum of the declared sizes of one sender's open transfers
    max_total_bytes: int = 4096 * MiB  # sum over every sender
    max_idle_s: float = 600.0  # an open transfer without a new chunk for this long is dropped

    def __post_init__(self) -> None:
        """Refuse limits that cannot hold a single transfer."""
        if min(self.max_transfer_bytes, self.max_transfers_per_sender, self.max_bytes_per_sender,
               self.max_total_bytes) < 1 or self.max_idle_s <= 0:
            raise ValueError(f"reassembly limits must be positive: {self}")


@dataclass
class Reassembly:
    """The chunks received so far of one transfer from one sender."""

    sender: str
    transfer_id: str
    count: int
    total_sha256: str
    total_bytes: int
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0  # bytes held in ``parts``
    last_active: float = 0.0

    def add(self, chunk: Chunk) -> bool:
        """Add a chunk; return True if it was new. ``FrameError`` if it contradicts the transfer."""
        h = chunk.header
        if (h.count, h.total_sha256, h.total_bytes) != (self.count, self.total_sha256, self.total_bytes):
            raise FrameError(
                f"transfer {self.transfer_id}: chunk {h.index} says count={h.count}, total={h.total_bytes} "
                f"but the transfer started with count={self.count}, total={self.total_bytes}",
                reason=Reason.TRANSFER_CHANGED,
            )
        if h.index in self.parts:
            return False
        if self.received + len(chunk.data) > self.total_bytes:
            raise FrameError(
                f"transfer {self.transfer_id}: chunk {h.index} brings {self.received + len(chunk.data)} bytes, "
                f"more than the {self.total_bytes} declared",
                reason=Reason.SIZE_MISMATCH,
            )
        self.parts[h.index] = chunk.data
        self.received += len(chunk.data)
        return True

    @property
    def missing(self) -> list[int]:
        """Indices not received yet, ascending."""
        return [i for i in range(self.count) if i not in self.parts]

    @property
    def complete(self) -> bool:
        """Whether every chunk arrived."""
        return len(self.parts) == self.count

    def blob(self) -> bytes:
        """Return the whole blob; ``FrameError`` if incomplete or if the whole-transfer hash does not match."""
        if not self.complete:
            raise FrameError(f"transfer {self.transfer_id} incomplete: missing {self.missing[:10]}",
                             reason=Reason.INCOMPLETE)
        data = b"".join(self.parts[i] for i in range(self.count))
        if len(data) != self.total_bytes or hashlib.sha256(data).hexdigest() != self.total_sha256:
            raise FrameError(f"transfer {self.transfer_id}: whole checksum mismatch", reason=Reason.CHECKSUM_MISMATCH)
        return data


class Reassembler:
    """Many concurrent transfers, keyed by (sender, transfer id) and bounded per sender.

    Not thread-safe: one transport dispatcher thread feeds it (callers that share it lock around it).
    """

    def __init__(self, limits: ReassemblyLimits | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        """Start empty; ``clock`` (seconds, monotonic) is for idle expiry and tests."""
        self.limits = limits or ReassemblyLimits()
        self.clock = clock
        self._senders: dict[str, OrderedDict[str, Reassembly]] = {}
        self._swept = clock()
        self.evicted = 0  # transfers dropped to make room or for idleness (their senders resend)

    # -- queries ----------------------------------------------------------------------------------------
    def get(self, sender: str, transfer_id: str) -> Reassembly | None:
        """The open transfer ``transfer_id`` of ``sender``, if any."""
        return self._senders.get(sender, OrderedDict()).get(transfer_id)

    def open_transfers(self, sender: str | None = None) -> int:
        """Open transfers of ``sender`` (of everyone when ``None``)."""
        if sender is not None:
            return len(self._senders.get(sender, ()))
        return sum(len(t) for t in self._senders.values())

    def declared_bytes(self, sender: str | None = None) -> int:
        """Declared sizes of the open transfers of ``sender`` (of everyone when ``None``)."""
        groups = [self._senders.get(sender, OrderedDict())] if sender is not None else list(self._senders.values())
        return sum(r.total_bytes for g in groups for r in g.values())

    def held_bytes(self) -> int:
        """Bytes of chunk data held right now (never more than :meth:`declared_bytes`)."""
        return sum(r.received for g in self._senders.values() for r in g.values())

    # -- updates ----------------------------------------------------------------------------------------
    def add(self, sender: str, chunk: Chunk) -> Reassembly:
        """Add ``chunk`` from ``sender``; return its transfer.

        A ``FrameError`` (``too_large``, ``too_many_transfers``, ``transfer_changed``,
        ``size_mismatch``) leaves every other transfer alone.
        """
        now = self.clock()
        self._expire(now)
        h = chunk.header
        transfers = self._senders.setdefault(sender, OrderedDict())
        r = transfers.get(h.transfer_id)
        if r is None:
            self._make_room(sender, transfers, h.total_bytes)
            r = Reassembly(sender, h.transfer_id, h.count, h.total_sha256, h.total_bytes)
            transfers[h.transfer_id] = r
        r.add(chunk)
        r.last_active = now
        transfers.move_to_end(h.transfer_id)
        return r

    def discard(self, sender: str, transfer_id: str) -> None:
        """Forget a transfer (done, or refused by the caller)."""
        transfers = self._senders.get(sender)
        if transfers is not None:
            transfers.pop(transfer_id, None)
            if not transfers:
                del self._senders[sender]

    def _make_room(self, sender: str, transfers: OrderedDict[str, Reassembly], size: int) -> None:
        lim = self.limits
        if size > lim.max_transfer_bytes or size > lim.max_bytes_per_sender:
            if not transfers:
                del self._senders[sender]
            raise FrameError(f"transfer of {size} bytes exceeds the limit of "
                             f"{min(lim.max_transfer_bytes, lim.max_bytes_per_sender)}", reason=Reason.TOO_LARGE)
        while transfers and (len(transfers) >= lim.max_transfers_per_sender
                             or sum(r.total_bytes for r in transfers.values()) + size > lim.max_bytes_per_sender):
            transfers.popitem(last=False)  # the sender's own least recently active transfer
            self.evicted += 1
        if self.declared_bytes() + size > lim.max_total_bytes:
            if not transfers:
                del self._senders[sender]
            raise FrameError(f"the reassembler holds {self.declared_bytes()} declared bytes; a new transfer of "
                             f"{size} would pass {lim.max_total_bytes}", reason=Reason.TOO_MANY_TRANSFERS)

    def _expire(self, now: float) -> None:
        if now - self._swept < min(1.0, self.limits.max_idle_s):
            return  # sweep at most once a second: the check is over every open transfer
        self._swept = now
        horizon = now - self.limits.max_idle_s
        for sender in list(self._senders):
            transfers = self._senders[sender]
            for tid in [t for t, r in transfers.items() if r.last_active < horizon]:
                del transfers[tid]
                self.evicted += 1
            if not transfers:
                del self._senders[sender]

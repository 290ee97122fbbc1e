"""Chunked transfers: split a blob into numbered, checksummed chunks and reassemble them.

Chunk wire format (binary, one MQTT message per chunk)::

    b"FSCK" | u8 format version | u32 header length (big endian) | header JSON | data

Header: ``transfer_id``, ``index``, ``count``, ``sha256`` (of this chunk's data), ``total_sha256``
and ``total_bytes`` (of the whole blob). Reassembly is idempotent (a duplicate chunk is ignored),
names what is missing, refuses a transfer whose count or total changes half-way, and hands out
the blob only when every chunk arrived and the whole hash matches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol import envelope
from protocol.errors import FrameError

CHUNK_MAGIC = b"FSCK"
CHUNK_FORMAT = 1
MAX_HEADER = 4096


class ChunkHeader(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    transfer_id: str = Field(min_length=1, max_length=128)
    index: int = Field(ge=0)
    count: int = Field(ge=1, le=1_000_000)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    total_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    total_bytes: int = Field(ge=0)


@dataclass(frozen=True)
class Chunk:
    header: ChunkHeader
    data: bytes


def split(blob: bytes, transfer_id: str, chunk_bytes: int) -> list[bytes]:
    """Encode ``blob`` as a list of chunk messages of at most ``chunk_bytes`` data each."""
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be >= 1")
    total = hashlib.sha256(blob).hexdigest()
    count = max(1, -(-len(blob) // chunk_bytes))
    out = []
    for index in range(count):
        data = blob[index * chunk_bytes : (index + 1) * chunk_bytes]
        header = ChunkHeader(
            transfer_id=transfer_id,
            index=index,
            count=count,
            sha256=hashlib.sha256(data).hexdigest(),
            total_sha256=total,
            total_bytes=len(blob),
        )
        head = header.model_dump_json().encode()
        out.append(envelope.pack(CHUNK_MAGIC, CHUNK_FORMAT, head, data))
    return out


def parse_chunk(message: bytes) -> Chunk:
    """Parse one chunk message; raise ``FrameError`` with a reason if anything is off."""
    head, data = envelope.unpack(message, magic=CHUNK_MAGIC, fmt=CHUNK_FORMAT, max_header=MAX_HEADER, what="chunk")
    try:
        header = ChunkHeader.model_validate_json(head)
    except ValidationError as exc:
        raise FrameError(f"chunk header invalid: {exc.errors()[0]['msg']}", reason="bad_header") from exc
    if header.index >= header.count:
        raise FrameError(f"chunk index {header.index} >= count {header.count}", reason="index_out_of_range")
    if hashlib.sha256(data).hexdigest() != header.sha256:
        raise FrameError(f"chunk {header.index} checksum mismatch", reason="checksum_mismatch")
    return Chunk(header, data)


@dataclass
class Reassembly:
    """Collects the chunks of one transfer."""

    transfer_id: str
    count: int
    total_sha256: str
    total_bytes: int
    parts: dict[int, bytes] = field(default_factory=dict)

    def add(self, chunk: Chunk) -> bool:
        """Add a chunk; return True if it was new. Raise if it contradicts the transfer."""
        h = chunk.header
        if (h.count, h.total_sha256, h.total_bytes) != (self.count, self.total_sha256, self.total_bytes):
            raise FrameError(
                f"transfer {self.transfer_id}: chunk {h.index} says count={h.count}, total={h.total_bytes} "
                f"but the transfer started with count={self.count}, total={self.total_bytes}",
                reason="transfer_changed",
            )
        if h.index in self.parts:
            return False
        self.parts[h.index] = chunk.data
        return True

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.count) if i not in self.parts]

    @property
    def complete(self) -> bool:
        return len(self.parts) == self.count

    def blob(self) -> bytes:
        """The whole blob; raises if incomplete or if the whole-transfer hash does not match."""
        if not self.complete:
            raise FrameError(f"transfer {self.transfer_id} incomplete: missing {self.missing[:10]}", reason="incomplete")
        data = b"".join(self.parts[i] for i in range(self.count))
        if len(data) != self.total_bytes or hashlib.sha256(data).hexdigest() != self.total_sha256:
            raise FrameError(f"transfer {self.transfer_id}: whole checksum mismatch", reason="checksum_mismatch")
        return data


class Reassembler:
    """Tracks many concurrent transfers, bounded in number and size."""

    def __init__(self, *, max_transfers: int = 256, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.max_transfers = max_transfers
        self.max_bytes = max_bytes
        self.transfers: dict[str, Reassembly] = {}

    def add(self, chunk: Chunk) -> Reassembly:
        h = chunk.header
        if h.total_bytes > self.max_bytes:
            raise FrameError(f"transfer of {h.total_bytes} bytes exceeds limit {self.max_bytes}", reason="too_large")
        r = self.transfers.get(h.transfer_id)
        if r is None:
            if len(self.transfers) >= self.max_transfers:
                oldest = next(iter(self.transfers))
                del self.transfers[oldest]
            r = Reassembly(h.transfer_id, h.count, h.total_sha256, h.total_bytes)
            self.transfers[h.transfer_id] = r
        r.add(chunk)
        return r

    def discard(self, transfer_id: str) -> None:
        self.transfers.pop(transfer_id, None)

"""Chunks on the wire: split a blob into numbered, checksummed chunk messages and parse one back.

Chunk wire format (binary, one MQTT message per chunk)::

    b"FSCK" | u8 format version | u32 header length (big endian) | header JSON | data

Header: ``transfer_id``, ``index``, ``count``, ``sha256`` (of this chunk's data), ``total_sha256``
and ``total_bytes`` (of the whole blob). A chunk is refused on its own when it contradicts itself:
index past the count, data that does not hash to ``sha256``, more data than the whole blob
declares, an empty chunk of a non-empty blob, or more chunks than the blob has bytes. Putting
chunks back together, bounded per sender, is :mod:`protocol.reassembly`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol import envelope
from protocol.errors import FrameError, Reason

CHUNK_MAGIC = b"FSCK"
CHUNK_FORMAT = 1
MAX_HEADER = 4096


class ChunkHeader(BaseModel):
    """The header of one chunk message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transfer_id: str = Field(min_length=1, max_length=128)
    index: int = Field(ge=0)
    count: int = Field(ge=1, le=1_000_000)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    total_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    total_bytes: int = Field(ge=0)


@dataclass(frozen=True)
class Chunk:
    """One parsed, self-consistent chunk."""

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
        raise FrameError(f"chunk header invalid: {exc.errors()[0]['msg']}", reason=Reason.BAD_HEADER) from exc
    if header.index >= header.count:
        raise FrameError(f"chunk index {header.index} >= count {header.count}", reason=Reason.INDEX_OUT_OF_RANGE)
    if header.count > max(1, header.total_bytes):
        raise FrameError(f"{header.count} chunks for a blob of {header.total_bytes} bytes", reason=Reason.BAD_HEADER)
    if len(data) > header.total_bytes:
        raise FrameError(f"chunk {header.index} holds {len(data)} bytes of a blob declared as {header.total_bytes}",
                         reason=Reason.SIZE_MISMATCH)
    if not data and header.total_bytes:
        raise FrameError(f"chunk {header.index} of a {header.total_bytes}-byte blob is empty", reason=Reason.BAD_HEADER)
    if hashlib.sha256(data).hexdigest() != header.sha256:
        raise FrameError(f"chunk {header.index} checksum mismatch", reason=Reason.CHECKSUM_MISMATCH)
    return Chunk(header, data)

"""The binary envelope shared by update/model frames and chunks.

magic (4 bytes) | u8 format version | u32 big-endian header length | header JSON | body
"""

from __future__ import annotations

import struct

from protocol.errors import FrameError, Reason

PREFIX = struct.Struct(">4sBI")


def pack(magic: bytes, fmt: int, header: bytes, body: bytes) -> bytes:
    """Join magic, format, header length, header and body into one message."""
    return PREFIX.pack(magic, fmt, len(header)) + header + body


def unpack(data: bytes, *, magic: bytes, fmt: int, max_header: int, what: str) -> tuple[bytes, bytes]:
    """Split ``data`` into (header JSON bytes, body).

    Refuses with the v1 reason codes ``truncated``, ``bad_magic``, ``unsupported_version``.
    """
    if len(data) < PREFIX.size:
        raise FrameError(f"{what} of {len(data)} bytes is shorter than its prefix", reason=Reason.TRUNCATED)
    got_magic, got_fmt, head_len = PREFIX.unpack_from(data)
    if got_magic != magic:
        raise FrameError(f"not a {what} (bad magic)", reason=Reason.BAD_MAGIC)
    if got_fmt != fmt:
        raise FrameError(f"{what} format {got_fmt} is not supported (want {fmt})", reason=Reason.UNSUPPORTED_VERSION)
    if head_len > max_header or PREFIX.size + head_len > len(data):
        raise FrameError(f"{what} header truncated or too long", reason=Reason.TRUNCATED)
    return data[PREFIX.size : PREFIX.size + head_len], data[PREFIX.size + head_len :]

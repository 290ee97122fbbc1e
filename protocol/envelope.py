"""The binary envelope shared by update/model frames and chunks:

    magic (4 bytes) | u8 format version | u32 big-endian header length | header JSON | body
"""

from __future__ import annotations

import struct

from protocol.errors import FrameError

PREFIX = struct.Struct(">4sBI")


def pack(magic: bytes, fmt: int, header: bytes, body: bytes) -> bytes:
    return PREFIX.pack(magic, fmt, len(header)) + header + body


def unpack(data: bytes, *, magic: bytes, fmt: int, max_header: int, what: str) -> tuple[bytes, bytes]:
    """Split ``data`` into (header JSON bytes, body), refusing with the v1 reason codes:
    ``truncated``, ``bad_magic``, ``unsupported_version``."""
    if len(data) < PREFIX.size:
        raise FrameError(f"{what} of {len(data)} bytes is shorter than its prefix", reason="truncated")
    got_magic, got_fmt, head_len = PREFIX.unpack_from(data)
    if got_magic != magic:
        raise FrameError(f"not a {what} (bad magic)", reason="bad_magic")
    if got_fmt != fmt:
        raise FrameError(f"{what} format {got_fmt} is not supported (want {fmt})", reason="unsupported_version")
    if head_len > max_header or PREFIX.size + head_len > len(data):
        raise FrameError(f"{what} header truncated or too long", reason="truncated")
    return data[PREFIX.size : PREFIX.size + head_len], data[PREFIX.size + head_len :]

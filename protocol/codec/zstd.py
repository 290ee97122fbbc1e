"""``zstd[:level]`` stage: lossless entropy coding with Zstandard.

Error bound: exact. Frames are written with their content size and a checksum.
Decode refuses frames that do not declare their content size (``bad_frame``),
that declare more than the allowed maximum (``decompression_bomb``; the pipeline
allows 4x the raw float32 size of the expected tensors), carry bytes after the
frame (``trailing_bytes``), or fail to decode / checksum (``truncated``/``corrupt``).
"""

from __future__ import annotations

import zstandard

from protocol.errors import Reason

from .errors import CodecError

__all__ = ["DEFAULT_LEVEL", "MAX_LEVEL", "MIN_LEVEL", "zstd_compress", "zstd_decompress"]

DEFAULT_LEVEL = 3
MIN_LEVEL = 1
MAX_LEVEL = 22
_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_HEADER = 18


def zstd_compress(data: bytes, level: int = DEFAULT_LEVEL) -> bytes:
    """Compress ``data`` as one zstd frame with its content size and a checksum."""
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cctx.compress(data)


def zstd_decompress(payload: bytes | memoryview, max_output: int) -> bytes:
    """Decompress exactly one frame whose declared size is at most ``max_output``."""
    data = bytes(payload)
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        # A short prefix of a real frame is truncation; anything else is garbage.
        short = len(data) < _MAX_HEADER and _MAGIC.startswith(data[:4])
        raise CodecError(f"zstd header: {exc}", reason=Reason.TRUNCATED if short else Reason.CORRUPT) from exc
    size = params.content_size
    if size == zstandard.CONTENTSIZE_UNKNOWN or size == zstandard.CONTENTSIZE_ERROR:
        raise CodecError("zstd frame does not declare its content size", reason=Reason.BAD_FRAME)
    if size > max_output:
        raise CodecError(f"zstd frame declares {size} bytes, limit is {max_output}", reason=Reason.DECOMPRESSION_BOMB)
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=max_output, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        msg = str(exc)
        if "unused data" in msg:
            raise CodecError(f"zstd: {msg}", reason=Reason.TRAILING_BYTES) from exc
        if "full frame" in msg or "incomplete" in msg or "truncated" in msg.lower():
            raise CodecError(f"zstd: {msg}", reason=Reason.TRUNCATED) from exc
        raise CodecError(f"zstd: {msg}", reason=Reason.CORRUPT) from exc
    if len(out) != size:
        raise CodecError(f"zstd produced {len(out)} bytes, frame declared {size}", reason=Reason.CORRUPT)
    return out

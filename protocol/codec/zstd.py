"""``zstd[:level]`` stage: lossless entropy coding with Zstandard.

Error bound: exact. Frames are written with their content size and a checksum.
Decode refuses frames that do not declare their content size (``bad_frame``),
that declare more than the allowed maximum (``decompression_bomb``; the pipeline
allows 4x the raw float32 size of the expected tensors), carry bytes after the
frame (``trailing_bytes``), or fail to decode / checksum (``truncated``/``corrupt``).
"""

from __future__ import annotations

import zstandard

from .errors import CodecError

__all__ = ["DEFAULT_LEVEL", "MAX_LEVEL", "MIN_LEVEL", "zstd_compress", "zstd_decompress"]

DEFAULT_LEVEL = 3
MIN_LEVEL = 1
MAX_LEVEL = 22
_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_HEADER = 18


def zstd_compress(data: bytes, level: int = DEFAULT_LEVEL) -> bytes:
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
        raise CodecError("truncated" if short else "corrupt", f"zstd header: {exc}") from exc
    size = params.content_size
    if size == zstandard.CONTENTSIZE_UNKNOWN or size == zstandard.CONTENTSIZE_ERROR:
        raise CodecError("bad_frame", "zstd frame does not declare its content size")
    if size > max_output:
        raise CodecError("decompression_bomb", f"zstd frame declares {size} bytes, limit is {max_output}")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=max_output, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        msg = str(exc)
        if "unused data" in msg:
            raise CodecError("trailing_bytes", f"zstd: {msg}") from exc
        if "full frame" in msg or "incomplete" in msg or "truncated" in msg.lower():
            raise CodecError("truncated", f"zstd: {msg}") from exc
        raise CodecError("corrupt", f"zstd: {msg}") from exc
    if len(out) != size:
        raise CodecError("corrupt", f"zstd produced {len(out)} bytes, frame declared {size}")
    return out

"""Artifact patches: an inference artifact (ONNX, engine) sent as a binary delta from the one the box holds.

Two successive versions' ONNX files differ only where the weights changed (the graph is the
same), so the new file is zstd-compressed with the old one as a raw-content dictionary (zstd's
``--patch-from``): what both hold is sent as back-references. Layout: one byte, ``0x01`` (a
patch against the base artifact) or ``0x00`` (no base: the whole artifact, zstd-compressed),
then one zstd frame with its content size and checksum.

Error bound: exact -- :func:`patch_decode` returns ``new`` byte for byte; the receiver still
checks the result against the signed manifest's sha256. Refusals (:class:`CodecError`):
``bad_frame`` (unknown kind byte), ``missing_base`` (a patch but no base), the zstd reasons of
:mod:`protocol.codec.zstd` (``decompression_bomb`` above ``max_output`` included).
"""

from __future__ import annotations

import zstandard

from protocol.errors import Reason

from .errors import CodecError
from .zstd import zstd_compress, zstd_decompress

__all__ = ["PATCH_LEVEL", "patch_decode", "patch_encode"]

PATCH_LEVEL = 19  # artifacts are encoded once per (version, base) and cached; the link is the cost
_WHOLE, _PATCH = 0, 1


def patch_encode(new: bytes, base: bytes | None, *, level: int = PATCH_LEVEL) -> bytes:
    """``new`` as a patch against ``base`` (or whole when there is no base)."""
    if base is None:
        return bytes([_WHOLE]) + zstd_compress(new, level)
    cdict = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    # the window must reach back over the whole base for back-references into it
    window_log = max(20, min(30, (len(base) + len(new)).bit_length()))
    params = zstandard.ZstdCompressionParameters.from_level(level, source_size=len(new), dict_size=len(base),
                                                            write_checksum=1, write_content_size=1,
                                                            window_log=window_log)
    return bytes([_PATCH]) + zstandard.ZstdCompressor(dict_data=cdict, compression_params=params).compress(new)


def patch_decode(payload: bytes | memoryview, base: bytes | None, *, max_output: int) -> bytes:
    """Inverse of :func:`patch_encode`; at most ``max_output`` bytes come out."""
    data = bytes(payload)
    if not data:
        raise CodecError("empty artifact patch", reason=Reason.TRUNCATED)
    kind, body = data[0], data[1:]
    if kind == _WHOLE:
        return zstd_decompress(body, max_output)
    if kind != _PATCH:
        raise CodecError(f"artifact patch kind {kind}", reason=Reason.BAD_FRAME)
    if base is None:
        raise CodecError("artifact patch but no base artifact", reason=Reason.MISSING_BASE)
    try:
        size = zstandard.get_frame_parameters(body).content_size
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd header: {exc}", reason=Reason.CORRUPT) from exc
    if size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        raise CodecError("zstd frame does not declare its content size", reason=Reason.BAD_FRAME)
    if size > max_output:
        raise CodecError(f"patch declares {size} bytes, limit is {max_output}", reason=Reason.DECOMPRESSION_BOMB)
    ddict = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    window_log_max = max(27, min(31, (len(base) + size).bit_length() + 1))
    try:
        out = zstandard.ZstdDecompressor(dict_data=ddict, max_window_size=1 << window_log_max).decompress(
            body, max_output_size=max_output, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd: {exc}", reason=Reason.CORRUPT) from exc
    if len(out) != size:
        raise CodecError(f"patch produced {len(out)} bytes, frame declared {size}", reason=Reason.CORRUPT)
    return out

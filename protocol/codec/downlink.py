"""Bit-exact downlink codec (coordinator -> edge): XOR against the base, then zstd.

Each float32's bit pattern is XORed with the base's (or sent as is without a
base); the resulting uint32 stream of all tensors, in spec order, is split into its
four byte planes (byte 0 of every word, then byte 1, ...) so the long runs of zero
high bytes that nearby floats produce compress well, and is then zstd-compressed.

Error bound: exact -- ``downlink_decode(downlink_encode(new, base), specs, base)``
is bit-identical to ``new`` (NaN payloads and -0.0 included).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from protocol.errors import Reason

from .errors import CodecError
from .pipeline import BOMB_FACTOR
from .tensors import F32, Tensors, TensorSpec, base_flats, flatten_tensors, unflatten, validate_specs
from .zstd import DEFAULT_LEVEL, zstd_compress, zstd_decompress

__all__ = ["downlink_decode", "downlink_encode"]

_U32 = np.dtype("<u4")


def _shuffle(words: npt.NDArray[np.uint32]) -> bytes:
    return words.view(np.uint8).reshape(-1, 4).T.tobytes()


def _unshuffle(planes: bytes, total: int) -> npt.NDArray[np.uint32]:
    b = np.frombuffer(planes, dtype=np.uint8).reshape(4, total)
    return np.ascontiguousarray(b.T).view(_U32).reshape(-1)


def downlink_encode(
    new: Mapping[str, np.ndarray],
    base: Mapping[str, np.ndarray] | None,
    *,
    level: int = DEFAULT_LEVEL,
) -> bytes:
    """Encode ``new`` (ordered float32 tensors) relative to ``base`` (or absolutely)."""
    specs, flats = flatten_tensors(new)
    words = np.concatenate(flats).view(_U32) if flats else np.zeros(0, _U32)
    if base is not None:
        b = base_flats(base, specs)
        words = words ^ (np.concatenate(b).view(_U32) if b else np.zeros(0, _U32))
    return zstd_compress(_shuffle(np.ascontiguousarray(words, dtype=_U32)), level)


def downlink_decode(
    payload: bytes | bytearray | memoryview,
    specs: Sequence[TensorSpec],
    base: Mapping[str, np.ndarray] | None,
) -> Tensors:
    """Bit-identical inverse of :func:`downlink_encode`."""
    sizes = validate_specs(specs)
    total = sum(sizes)
    bases = base_flats(base, specs) if base is not None else None
    body = zstd_decompress(memoryview(payload).cast("B"), BOMB_FACTOR * 4 * total + 1024)
    if len(body) < 4 * total:
        raise CodecError(f"downlink body {len(body)} bytes, expected {4 * total}", reason=Reason.TRUNCATED)
    if len(body) > 4 * total:
        raise CodecError(f"downlink body {len(body)} bytes, expected {4 * total}", reason=Reason.TRAILING_BYTES)
    words = _unshuffle(body, total)
    if bases is not None and bases:
        words = words ^ np.concatenate(bases).view(_U32)
    return unflatten(specs, words.view(F32))

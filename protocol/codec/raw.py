"""``raw`` stage: little-endian float32 concatenation (the v1 wire format).

Error bound: exact (bit-identical round trip, NaN payloads and -0.0 included).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from protocol.errors import Reason

from .errors import CodecError
from .tensors import F32

__all__ = ["raw_decode", "raw_encode"]


def raw_encode(flats: Sequence[npt.NDArray[np.float32]]) -> bytes:
    """Concatenate flat float32 arrays as little-endian bytes, no header."""
    if not flats:
        return b""
    return np.concatenate([np.asarray(f, dtype=F32).reshape(-1) for f in flats]).tobytes()


def raw_decode(data: bytes | memoryview, total: int) -> npt.NDArray[np.float32]:
    """Parse exactly ``total`` float32 values; any other length is an error."""
    expected = 4 * total
    if len(data) < expected:
        raise CodecError(f"raw payload has {len(data)} bytes, expected {expected}", reason=Reason.TRUNCATED)
    if len(data) > expected:
        raise CodecError(f"raw payload has {len(data)} bytes, expected {expected}", reason=Reason.TRAILING_BYTES)
    return np.frombuffer(data, dtype=F32).astype(np.float32)

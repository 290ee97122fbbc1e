"""Byte-level helpers: vectorised LEB128 varints and a bounds-checked reader."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from protocol.errors import Reason

from .errors import CodecError

__all__ = ["MAX_VARINT_BYTES", "Reader", "varint_decode", "varint_encode", "varint_scalar"]

#: Varints are capped at 9 bytes (63 bits); larger values never occur in a payload.
MAX_VARINT_BYTES = 9

U64 = npt.NDArray[np.uint64]


def varint_encode(values: npt.ArrayLike) -> bytes:
    """Unsigned LEB128 encoding of a 1-D array of non-negative integers (< 2**63)."""
    v = np.asarray(values).astype(np.uint64, copy=False).reshape(-1)
    if v.size == 0:
        return b""
    if int(v.max()) >= 1 << 63:
        raise CodecError("varint value >= 2**63", reason=Reason.BAD_PARAMETER)
    lens = np.ones(v.shape, dtype=np.int64)
    for j in range(1, MAX_VARINT_BYTES):
        lens += v >= np.uint64(1 << (7 * j))
    starts = np.cumsum(lens) - lens
    out = np.empty(int(lens.sum()), dtype=np.uint8)
    for j in range(int(lens.max())):
        m = lens > j
        group = ((v[m] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        cont = (lens[m] > j + 1).astype(np.uint8) << 7
        out[starts[m] + j] = group | cont
    return out.tobytes()


def varint_decode(buf: bytes | memoryview, count: int) -> U64:
    """Decode exactly ``count`` varints that must fill ``buf`` completely.

    Rejects (``bad_varint``): wrong number of terminators, a dangling continuation
    byte, varints longer than :data:`MAX_VARINT_BYTES`, and non-canonical encodings
    (a multi-byte varint whose last group is zero), so every value has one encoding.
    """
    b = np.frombuffer(buf, dtype=np.uint8)
    term = np.flatnonzero(b < 0x80)
    if term.size != count or (count and int(term[-1]) != b.size - 1) or (not count and b.size):
        raise CodecError(f"expected {count} varints in {b.size} bytes", reason=Reason.BAD_VARINT)
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    starts = np.empty(count, dtype=np.int64)
    starts[0] = 0
    starts[1:] = term[:-1] + 1
    lens = term - starts + 1
    if int(lens.max()) > MAX_VARINT_BYTES:
        raise CodecError("varint longer than 9 bytes", reason=Reason.BAD_VARINT)
    if bool(np.any((b[term] == 0) & (lens > 1))):
        raise CodecError("non-canonical varint", reason=Reason.BAD_VARINT)
    out = np.zeros(count, dtype=np.uint64)
    for j in range(int(lens.max())):
        m = lens > j
        out[m] |= (b[starts[m] + j] & np.uint8(0x7F)).astype(np.uint64) << np.uint64(7 * j)
    return out


def varint_scalar(value: int) -> bytes:
    """Varint encoding of one Python int."""
    return varint_encode(np.array([value], dtype=np.uint64))


class Reader:
    """Sequential, bounds-checked view over a payload."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._mv = memoryview(data).cast("B")
        self.pos = 0

    @property
    def remaining(self) -> int:
        """Bytes not read yet."""
        return len(self._mv) - self.pos

    def take(self, n: int, what: str = "data") -> memoryview:
        """Read ``n`` bytes; ``truncated`` if fewer are left."""
        if n < 0 or n > self.remaining:
            raise CodecError(f"need {n} bytes of {what} at offset {self.pos}, {self.remaining} left", reason=Reason.TRUNCATED)
        out = self._mv[self.pos : self.pos + n]
        self.pos += n
        return out

    def varint(self, what: str = "varint") -> int:
        """Read one canonical unsigned LEB128 varint."""
        value = 0
        for j in range(MAX_VARINT_BYTES):
            if self.pos >= len(self._mv):
                raise CodecError(f"payload ends inside {what}", reason=Reason.TRUNCATED)
            byte = self._mv[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << (7 * j)
            if byte < 0x80:
                if byte == 0 and j > 0:
                    raise CodecError(f"non-canonical {what}", reason=Reason.BAD_VARINT)
                return value
        raise CodecError(f"{what} longer than {MAX_VARINT_BYTES} bytes", reason=Reason.BAD_VARINT)

    def finish(self) -> None:
        """Refuse bytes left after the payload (``trailing_bytes``)."""
        if self.remaining:
            raise CodecError(f"{self.remaining} unexpected bytes after payload", reason=Reason.TRAILING_BYTES)

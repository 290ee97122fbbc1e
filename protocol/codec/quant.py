"""``q:<bits>[:block=<n>]`` stage (``sign`` = ``q:1``): stochastic uniform quantisation.

Each block (the whole value vector of a tensor / top-k section, or consecutive runs
of ``block`` values) gets one float32 scale ``s = max|x|`` over the block. Values are
mapped onto the ``L = 2**bits`` evenly spaced levels ``-s, -s + step, ..., +s`` with
``step = 2*s / (L - 1)`` and rounded *stochastically* to one of the two neighbouring
levels with probabilities that make the result unbiased: ``E[x_hat] = x``
(QSGD / TernGrad-style dithering, deterministic given the seed). ``bits = 1`` is
therefore "sign with scale": ``x_hat = +-s`` with ``P(+s) = (1 + x/s) / 2``.

Error bound per element, with ``s`` its block's scale:
``|x_hat - x| <= step * (1 + 2**-10) = 2*s/(2**bits - 1) * (1 + 2**-10)``
(the ``2**-10`` slack covers float32 arithmetic), i.e. ``2s/255`` for ``q:8``,
``2s/15`` for ``q:4``, ``2s/3`` for ``q:2``, ``2s`` for ``q:1``. Variance per element
is ``<= step**2 / 4``. An all-zero block has ``s = 0`` and is reconstructed exactly.

Wire: scales as little-endian float32 (all sections' scales first), then the codes
of all sections concatenated and bit-packed LSB-first (``bits`` in {1, 2, 4, 8});
padding bits of the last byte must be zero.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .errors import CodecError

__all__ = [
    "SUPPORTED_BITS",
    "block_count",
    "dequantize",
    "error_bound",
    "pack_codes",
    "quantize",
    "unpack_codes",
]

SUPPORTED_BITS = (1, 2, 4, 8)

Flat = npt.NDArray[np.float32]
Codes = npt.NDArray[np.uint8]


def block_count(n: int, block: int | None) -> int:
    """Scales needed for ``n`` values: one per block, none for an empty vector."""
    if n == 0:
        return 0
    return 1 if block is None else -(-n // block)


def _blocked(values: Flat, block: int | None) -> tuple[npt.NDArray[np.float32], int]:
    n = values.size
    b = n if block is None else block
    nb = block_count(n, block)
    padded = np.zeros(nb * b, dtype=np.float32)
    padded[:n] = values
    return padded.reshape(nb, b), b


def quantize(values: Flat, bits: int, block: int | None, rng: np.random.Generator) -> tuple[Flat, Codes]:
    """Return ``(scales, codes)`` for a finite float32 vector; codes in ``[0, 2**bits)``."""
    n = values.size
    if n == 0:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.uint8)
    levels = (1 << bits) - 1
    mat, _ = _blocked(values, block)
    scales = np.max(np.abs(mat), axis=1)
    step = scales * np.float32(2.0 / levels)
    inv = np.divide(
        np.float32(1.0), step, out=np.zeros_like(step), where=step > 0
    )  # zero blocks -> every u = 0 -> code 0, decoded back to exactly 0
    u = (mat + scales[:, None]) * inv[:, None]
    u = u.reshape(-1)[:n]
    u += rng.random(n, dtype=np.float32)
    np.floor(u, out=u)
    np.clip(u, 0, levels, out=u)
    zero = np.repeat(step == 0, mat.shape[1])[:n]
    codes = u.astype(np.uint8)
    # In a zero-scale block the decoder ignores the code; pin it to 0 so the
    # payload stays canonical (a uniform 0 codes compresses best too).
    codes[zero] = 0
    return scales.astype(np.float32), codes


def dequantize(scales: Flat, codes: Codes, bits: int, block: int | None) -> Flat:
    """Inverse map ``code * step - s``; validates the scales."""
    n = codes.size
    if scales.size != block_count(n, block):
        raise CodecError("bad_count", f"{scales.size} scales for {n} values")
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    if not bool(np.all(np.isfinite(scales))) or bool(np.any(scales < 0)):
        raise CodecError("bad_scale", "quantisation scale negative or non-finite")
    levels = (1 << bits) - 1
    if int(codes.max()) > levels:
        raise CodecError("corrupt", f"code > {levels}")
    b = n if block is None else block
    s = np.repeat(scales.astype(np.float64), b)[:n]
    out = codes.astype(np.float64) * (s * (2.0 / levels)) - s
    return out.astype(np.float32)


def error_bound(scales: Flat, n: int, bits: int, block: int | None) -> Flat:
    """Per-element bound ``step * (1 + 2**-10)`` broadcast to ``n`` elements (for tests)."""
    b = n if block is None else block
    s = np.repeat(scales.astype(np.float64), b)[:n]
    return (s * (2.0 / ((1 << bits) - 1)) * (1 + 2.0**-10)).astype(np.float32)


def pack_codes(codes: Codes, bits: int) -> bytes:
    """Pack codes LSB-first, ``8 // bits`` per byte."""
    if bits == 8:
        return codes.tobytes()
    per = 8 // bits
    padded = np.zeros(-(-codes.size // per) * per, dtype=np.uint8)
    padded[: codes.size] = codes
    mat = padded.reshape(-1, per)
    out = np.zeros(mat.shape[0], dtype=np.uint8)
    for j in range(per):
        out |= mat[:, j] << np.uint8(j * bits)
    return out.tobytes()


def packed_size(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def unpack_codes(buf: bytes | memoryview, bits: int, count: int) -> Codes:
    """Inverse of :func:`pack_codes`; ``buf`` must be exactly the packed size."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if raw.size != packed_size(count, bits):
        raise CodecError("truncated", f"{raw.size} code bytes for {count} codes")
    if bits == 8:
        return raw.copy()
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    mat = np.empty((raw.size, per), dtype=np.uint8)
    for j in range(per):
        mat[:, j] = (raw >> np.uint8(j * bits)) & mask
    flat = mat.reshape(-1)
    if bool(np.any(flat[count:])):
        raise CodecError("bad_padding", "non-zero padding bits in packed codes")
    return flat[:count].copy()

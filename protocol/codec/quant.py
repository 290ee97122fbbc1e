"""``q:<bits>[:block=<n>]`` stage (``sign`` = ``q:1``): uniform quantisation, stochastic by default.

Values are split into blocks (the whole value vector of a tensor / top-k section,
or consecutive runs of ``block`` values); each block stores one float32 scale ``s``.

Grid. ``bits >= 2``: the ``2*L + 1`` symmetric levels ``{-L..L} * s/L`` with
``L = 2**(bits-1) - 1`` (255 levels for q:8, 15 for q:4, ternary ``{-s, 0, s}`` for
q:2); zero is a level, so exact zeros stay zero. ``bits = 1``: the two levels
``{-s, +s}`` ("sign with scale"). Code ``c`` is stored as ``c + L`` (resp. 0/1).

Stochastic mode (default, ``s = max|x|`` over the block): each value is rounded to
one of its two neighbouring levels with the probabilities that make it unbiased,
``E[x_hat] = x`` (QSGD / TernGrad-style dithering; deterministic given the seed).
Error bound per element: ``|x_hat - x| <= step * (1 + 2**-10)`` with ``step = s/L``
(``s/127`` for q:8, ``s/7`` for q:4, ``s`` for q:2) and ``step = 2s`` for q:1; the
variance is ``<= step**2 / 4``.

Deterministic mode (used when ``ef`` directly follows ``q``, because error feedback
needs a *contractive* compressor, ``|C(x) - x| < |x|``, and unbiased low-bit rounding
is not one): ``bits >= 2`` rounds to the nearest level (``s = max|x|``), so
``|x_hat - x| <= min(|x|, step/2) * (1 + 2**-10)``; ``bits = 1`` sends
``sign(x) * mean|x|`` of the block (EF-SignSGD, Karimireddy et al. 2019), so
``|x_hat - x| <= |x| + s`` with ``s = mean|x|``. The bias is what ``ef`` removes.

An all-zero block has ``s = 0`` and is reconstructed exactly in both modes.

Wire: scales as little-endian float32 (all sections' scales first), then the codes
of all sections concatenated and bit-packed LSB-first (``bits`` in {1, 2, 4, 8});
padding bits of the last byte must be zero; the unused top code is rejected.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from protocol.errors import Reason

from .errors import CodecError

__all__ = [
    "SUPPORTED_BITS",
    "block_count",
    "dequantize",
    "error_bound",
    "half_levels",
    "pack_codes",
    "packed_size",
    "quantize",
    "unpack_codes",
]

SUPPORTED_BITS = (1, 2, 4, 8)

Flat = npt.NDArray[np.float32]
Codes = npt.NDArray[np.uint8]
_SLACK = 1 + 2.0**-10


def half_levels(bits: int) -> int:
    """``L``: number of positive levels (1 for the sign quantiser)."""
    return 1 if bits == 1 else (1 << (bits - 1)) - 1


def block_count(n: int, block: int | None) -> int:
    """Scales needed for ``n`` values: one per block, none for an empty vector."""
    if n == 0:
        return 0
    return 1 if block is None else -(-n // block)


def _width(n: int, block: int | None) -> int:
    """Elements per block row; a block longer than the vector is just the vector."""
    return n if block is None or block >= n else block


def _blocked(values: Flat, block: int | None) -> npt.NDArray[np.float32]:
    n = values.size
    b = _width(n, block)
    nb = block_count(n, block)
    padded = np.zeros(nb * b, dtype=np.float32)
    padded[:n] = values
    return padded.reshape(nb, b)


def _per_element(scales: npt.NDArray[np.float32], n: int, block: int | None) -> npt.NDArray[np.float64]:
    return np.repeat(scales.astype(np.float64), _width(n, block))[:n]


def quantize(values: Flat, bits: int, block: int | None, rng: np.random.Generator | None) -> tuple[Flat, Codes]:
    """Return ``(scales, codes)`` for a finite float32 vector.

    ``rng`` given: unbiased stochastic rounding. ``rng=None``: deterministic
    (nearest level; mean-magnitude sign for 1 bit), see the module docstring.
    """
    n = values.size
    if n == 0:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.uint8)
    mat = _blocked(values, block)
    if bits == 1 and rng is None:
        counts = np.full(mat.shape[0], mat.shape[1], dtype=np.float64)
        counts[-1] = n - (mat.shape[0] - 1) * mat.shape[1]  # padding is not part of the mean
        scales = (np.sum(np.abs(mat), axis=1, dtype=np.float64) / counts).astype(np.float32)
        return scales, (values >= 0).astype(np.uint8)
    scales = np.max(np.abs(mat), axis=1)
    big = half_levels(bits)
    inv = np.divide(np.float32(big), scales, out=np.zeros_like(scales), where=scales > 0)
    u = (mat * inv[:, None]).reshape(-1)[:n]  # in [-L, L]; 0 in zero-scale blocks
    if bits == 1:
        u = (u + np.float32(1)) * np.float32(0.5)  # in [0, 1]
        lo, hi = 0, 1
    else:
        lo, hi = -big, big
    if rng is None:
        np.rint(u, out=u)
    else:
        u += rng.random(n, dtype=np.float32)
        np.floor(u, out=u)
    np.clip(u, lo, hi, out=u)
    codes = (u.astype(np.int16) - lo).astype(np.uint8)
    if bits == 1:
        # A zero-scale block decodes to 0 whatever the code; pin it for canonical bytes.
        codes[_per_element(scales, n, block) == 0] = 0
    return scales.astype(np.float32), codes


def dequantize(scales: Flat, codes: Codes, bits: int, block: int | None) -> Flat:
    """Map codes back to values; validates scales and codes."""
    n = codes.size
    if scales.size != block_count(n, block):
        raise CodecError(f"{scales.size} scales for {n} values", reason=Reason.BAD_COUNT)
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    if not bool(np.all(np.isfinite(scales))) or bool(np.any(scales < 0)):
        raise CodecError("quantisation scale negative or non-finite", reason=Reason.BAD_SCALE)
    big = half_levels(bits)
    s = _per_element(scales, n, block)
    if bits == 1:
        out = (codes.astype(np.float64) * 2.0 - 1.0) * s
    else:
        if int(codes.max()) > 2 * big:
            raise CodecError(f"quantisation code > {2 * big}", reason=Reason.CORRUPT)
        out = (codes.astype(np.float64) - big) * (s / big)
    return out.astype(np.float32)


def error_bound(
    values: Flat, scales: Flat, bits: int, block: int | None, *, deterministic: bool = False
) -> npt.NDArray[np.float64]:
    """Per-element bound on ``|dequantize(quantize(values)) - values|`` (the docstring's)."""
    n = values.size
    s = _per_element(scales, n, block)
    x = np.abs(values.astype(np.float64))
    if bits == 1:
        return (x + s) * _SLACK if deterministic else 2 * s * _SLACK
    step = s / half_levels(bits)
    if deterministic:
        return np.minimum(x, step / 2) * _SLACK + 1e-45
    return step * _SLACK


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
    """Bytes taken by ``count`` packed codes."""
    return -(-count * bits // 8)


def unpack_codes(buf: bytes | memoryview, bits: int, count: int) -> Codes:
    """Inverse of :func:`pack_codes`; ``buf`` must be exactly the packed size."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if raw.size != packed_size(count, bits):
        raise CodecError(f"{raw.size} code bytes for {count} codes", reason=Reason.TRUNCATED)
    if bits == 8:
        return raw.copy()
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    mat = np.empty((raw.size, per), dtype=np.uint8)
    for j in range(per):
        mat[:, j] = (raw >> np.uint8(j * bits)) & mask
    flat = mat.reshape(-1)
    if bool(np.any(flat[count:])):
        raise CodecError("non-zero padding bits in packed codes", reason=Reason.BAD_PADDING)
    return flat[:count].copy()

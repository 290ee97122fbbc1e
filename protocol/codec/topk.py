"""``topk:<fraction>[:global]`` stage: keep the largest-magnitude entries.

Per-tensor mode keeps ``k = clamp(ceil(fraction * n), 1, n)`` entries of each tensor
(``k = 0`` for an empty tensor); ``global`` mode applies the same rule once to the
concatenation of all tensors, so large layers can take more than their share.

Indices are sorted and stored as LEB128 varints of the gaps ``idx[i] - idx[i-1] - 1``
(``idx[0]`` itself first): at 1 % density the typical gap needs 1-2 bytes instead of
4 for uint32, and sortedness/uniqueness hold by construction. Decode rejects any
index ``>= n`` and any count that differs from what the spec implies.

Error bound: kept entries are exact; every dropped entry has
``|x_i| <= min_{j kept} |x_j|`` and is reconstructed as 0, so
``|x_hat_i - x_i| <= min kept magnitude`` and ``||x_hat - x||_2^2 = sum of dropped x_i^2``.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from protocol.errors import Reason

from .errors import CodecError
from .wire import varint_decode, varint_encode

__all__ = ["decode_indices", "encode_indices", "topk_count", "topk_select"]

Flat = npt.NDArray[np.float32]
Idx = npt.NDArray[np.int64]


def topk_count(n: int, fraction: float) -> int:
    """Number of entries kept out of ``n`` (shared by encoder and decoder)."""
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(fraction * n)))


def topk_select(values: Flat, k: int) -> Idx:
    """Sorted indices of the ``k`` largest ``|values|`` (deterministic tie-breaking)."""
    n = values.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    mag = np.abs(values)
    idx = np.argpartition(mag, n - k)[n - k :]
    return np.sort(idx).astype(np.int64, copy=False)


def encode_indices(idx: Idx) -> bytes:
    """Gap-coded varints of a sorted, unique index array."""
    if idx.size == 0:
        return b""
    gaps = np.empty(idx.size, dtype=np.int64)
    gaps[0] = idx[0]
    gaps[1:] = np.diff(idx) - 1
    if int(gaps.min()) < 0:
        raise CodecError("indices must be sorted and unique", reason=Reason.BAD_PARAMETER)
    return varint_encode(gaps.astype(np.uint64))


def decode_indices(buf: bytes | memoryview, k: int, n: int) -> Idx:
    """Inverse of :func:`encode_indices`; validates every index is in ``[0, n)``."""
    gaps = varint_decode(buf, k)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if int(gaps.max()) >= n:
        raise CodecError(f"index gap {int(gaps.max())} >= size {n}", reason=Reason.INDEX_OUT_OF_RANGE)
    # gaps < n <= 2**40 and k <= n keep the running sum far from int64 overflow.
    idx = np.cumsum(gaps.astype(np.int64) + 1) - 1
    if int(idx[-1]) >= n:
        raise CodecError(f"index {int(idx[-1])} >= size {n}", reason=Reason.INDEX_OUT_OF_RANGE)
    return idx

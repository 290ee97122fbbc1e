"""Named float tensors as they travel, and the tensor hash of protocol v1.

Tensor hash: SHA-256 over, for each tensor in manifest order, ``name`` UTF-8, a NUL byte,
the dtype string and shape as canonical JSON ``["float32",[64,3,3,3]]``, a NUL byte, then the
tensor's little-endian bytes in C order. It is defined on exact bit patterns, so a model
reconstructed from a delta either matches bit for bit or is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np


def tensor_hash(tensors: Mapping[str, np.ndarray]) -> str:
    """The v1 tensor hash (see the module docstring): names, dtypes, shapes and exact bits, in order."""
    h = hashlib.sha256()
    for name, arr in tensors.items():
        a = np.ascontiguousarray(arr)
        dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        h.update(name.encode("utf-8") + b"\x00")
        h.update(json.dumps([str(np.dtype(dtype).name), list(a.shape)], separators=(",", ":")).encode())
        h.update(b"\x00")
        h.update(a.astype(dtype.newbyteorder("<"), copy=False).tobytes(order="C"))
    return h.hexdigest()


def global_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """L2 norm over every value of every tensor (float64)."""
    return float(np.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64))) for t in tensors.values())))


def all_finite(tensors: Mapping[str, np.ndarray]) -> bool:
    """Whether no tensor holds NaN or infinity."""
    return all(bool(np.isfinite(t).all()) for t in tensors.values())


def subtract(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``a - b`` per tensor (float32), for the tensors of ``a``."""
    return {k: (a[k].astype(np.float32) - b[k].astype(np.float32)) for k in a}

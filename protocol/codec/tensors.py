"""Tensor containers, specs and validation helpers shared by all stages."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from protocol.errors import Reason

from .errors import CodecError

__all__ = [
    "F32",
    "TensorSpec",
    "Tensors",
    "base_flats",
    "flat_f32",
    "flatten_tensors",
    "specs_of",
    "unflatten",
    "validate_specs",
]

#: Little-endian float32, the only element type on the wire.
F32 = np.dtype("<f4")

Tensors = dict[str, np.ndarray]
"""Ordered mapping name -> float32 array; insertion order is the wire order."""

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor; the decoder's only source of layout."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def flat_f32(name: str, arr: object) -> FloatArray:
    """Return ``arr`` as a contiguous little-endian float32 1-D array (a view if possible).

    Only 4-byte floats are accepted: silently narrowing float64 would hide precision
    loss from the caller, and the downlink path is bit-exact.
    """
    a = np.asarray(arr)
    if a.dtype.kind != "f" or a.dtype.itemsize != 4:
        raise CodecError(f"tensor {name!r} has dtype {a.dtype}, expected float32", reason=Reason.BAD_DTYPE)
    return np.ascontiguousarray(a, dtype=F32).reshape(-1)


def specs_of(tensors: Mapping[str, np.ndarray]) -> list[TensorSpec]:
    """Specs (in order) describing ``tensors``; what a receiver needs to decode them."""
    return [TensorSpec(name, tuple(int(d) for d in np.shape(a))) for name, a in tensors.items()]


def validate_specs(specs: Sequence[TensorSpec]) -> list[int]:
    """Check names unique, dtype float32, dims non-negative; return element counts."""
    seen: set[str] = set()
    sizes: list[int] = []
    for s in specs:
        if s.name in seen:
            raise CodecError(f"duplicate tensor name {s.name!r}", reason=Reason.BAD_SPEC)
        seen.add(s.name)
        if s.dtype != "float32":
            raise CodecError(f"spec {s.name!r} has dtype {s.dtype!r}", reason=Reason.BAD_DTYPE)
        if any(int(d) < 0 for d in s.shape):
            raise CodecError(f"spec {s.name!r} has negative dimension {s.shape}", reason=Reason.BAD_SPEC)
        sizes.append(s.size)
    return sizes


def flatten_tensors(tensors: Mapping[str, np.ndarray]) -> tuple[list[TensorSpec], list[FloatArray]]:
    """Specs and flat float32 views of ``tensors`` in insertion order."""
    specs = specs_of(tensors)
    flats = [flat_f32(name, a) for name, a in tensors.items()]
    return specs, flats


def base_flats(
    base: Mapping[str, np.ndarray] | None, specs: Sequence[TensorSpec], *, what: str = "base"
) -> list[FloatArray]:
    """Flat float32 base tensors aligned with ``specs`` (same names and shapes)."""
    if base is None:
        raise CodecError(f"pipeline needs a {what} but none was given", reason=Reason.MISSING_BASE)
    out: list[FloatArray] = []
    for s in specs:
        if s.name not in base:
            raise CodecError(f"{what} has no tensor {s.name!r}", reason=Reason.MISSING_BASE)
        b = base[s.name]
        if tuple(np.shape(b)) != tuple(s.shape):
            raise CodecError(f"{what} {s.name!r} has shape {np.shape(b)}, expected {s.shape}", reason=Reason.SHAPE_MISMATCH)
        out.append(flat_f32(s.name, b))
    return out


def unflatten(specs: Sequence[TensorSpec], flat: FloatArray) -> Tensors:
    """Split one concatenated float32 vector back into owned, shaped tensors."""
    out: Tensors = {}
    pos = 0
    for s in specs:
        n = s.size
        out[s.name] = np.array(flat[pos : pos + n], dtype=np.float32).reshape(s.shape)
        pos += n
    return out

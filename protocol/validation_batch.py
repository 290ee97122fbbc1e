"""A small labelled validation batch named by a manifest, for the on-box accuracy gate.

The batch is model inputs (already preprocessed and normalized, float16 ``(N, C, H, W)``) and
integer labels, as an ``.npz`` whose SHA-256 the manifest's ``validation_batch`` carries (part of
the signed canonical bytes, so a box that verified the signature can trust the batch). Its
``uri`` is either an RFC 2397 ``data:`` URI holding the batch inline (v1: it travelled in every
manifest, 32 × 1×28×28 float16 ≈ 44 KB of base64 per version per box), or a reference
``validation/{sha256}.npz`` (:func:`by_reference`) that a box downloads once like an artifact and
keeps while the hash stays the same.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import zipfile

import numpy as np

from protocol.errors import ManifestError, Reason
from protocol.manifest import ValidationBatch

_PREFIX = "data:application/x-fedscan-npz;base64,"
REF_PREFIX = "validation/"
MAX_BYTES = 2 * 1024 * 1024


def is_inline(vb: ValidationBatch) -> bool:
    """Whether the batch travels inside the manifest (a ``data:`` URI)."""
    return vb.uri.startswith(_PREFIX)


def by_reference(vb: ValidationBatch) -> tuple[ValidationBatch, bytes]:
    """An inline batch as a reference (``validation/{sha256}.npz``) and the ``.npz`` bytes it names."""
    raw = _inline_bytes(vb)
    return ValidationBatch(uri=f"{REF_PREFIX}{vb.sha256}.npz", sha256=vb.sha256, count=vb.count), raw


def _bad(msg: str) -> ManifestError:
    return ManifestError(f"validation batch: {msg}", reason=Reason.BAD_VALIDATION_BATCH)


def _inline_bytes(vb: ValidationBatch) -> bytes:
    if not is_inline(vb):
        raise _bad("not an inline data: URI")
    try:
        raw = base64.b64decode(vb.uri[len(_PREFIX):], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad("not base64") from exc
    if len(raw) > MAX_BYTES or hashlib.sha256(raw).hexdigest() != vb.sha256:
        raise _bad("sha256 does not match")
    return raw


def encode_batch(x: np.ndarray, y: np.ndarray) -> ValidationBatch:
    """Pack a small labelled batch (float16 inputs, int64 labels) inline in a manifest; ``ValueError`` if too big or not finite."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"validation batch needs x (N,C,H,W) and y (N,), got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("validation batch inputs must be finite")
    buf = io.BytesIO()
    np.savez_compressed(buf, x=x.astype(np.float16), y=y.astype(np.int64))
    raw = buf.getvalue()
    if len(raw) > MAX_BYTES:
        raise ValueError(f"validation batch is {len(raw)} bytes; keep it under {MAX_BYTES}")
    return ValidationBatch(uri=_PREFIX + base64.b64encode(raw).decode("ascii"), sha256=hashlib.sha256(raw).hexdigest(),
                           count=len(y))


def decode_batch(vb: ValidationBatch, *, channels: int, height: int, width: int, classes: int,
                 data: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return the batch as float32 inputs and int64 labels.

    ``data`` is the downloaded ``.npz`` of a referenced batch (unused for an inline one).
    ``ManifestError(reason="bad_validation_batch")`` when a referenced batch was not fetched, its
    hash or shapes do not match, or labels are out of range.
    """
    if is_inline(vb):
        raw = _inline_bytes(vb)
    elif data is None:
        raise _bad(f"{vb.uri} was not fetched")
    elif len(data) > MAX_BYTES or hashlib.sha256(data).hexdigest() != vb.sha256:
        raise _bad("sha256 does not match")
    else:
        raw = data
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            x, y = z["x"].astype(np.float32), z["y"].astype(np.int64)
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise _bad(f"not a batch npz: {exc}") from exc
    if x.shape != (vb.count, channels, height, width) or y.shape != (vb.count,):
        raise _bad(f"shapes {x.shape}/{y.shape} do not match count {vb.count} and input {channels}x{height}x{width}")
    if not np.isfinite(x).all() or (y < 0).any() or (y >= classes).any():
        raise _bad("non-finite inputs or labels out of range")
    return x, y

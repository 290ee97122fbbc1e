"""A small labelled validation batch shipped inside a manifest, for the on-box accuracy gate.

The batch is model inputs (already preprocessed and normalized, float16 ``(N, C, H, W)``) and
integer labels, as an ``.npz`` in an RFC 2397 ``data:`` URI in the manifest's
``validation_batch.uri``, with the SHA-256 of the ``.npz`` bytes. It is part of the signed
canonical bytes, so a box that verified the signature can trust it, and it needs no extra
transfer. Keep it small (tens of images: 32 × 1×28×28 float16 ≈ 67 KB of base64).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import zipfile

import numpy as np

from protocol.errors import ManifestError
from protocol.manifest import ValidationBatch

_PREFIX = "data:application/x-fedscan-npz;base64,"
MAX_BYTES = 2 * 1024 * 1024


def encode_batch(x: np.ndarray, y: np.ndarray) -> ValidationBatch:
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


def decode_batch(vb: ValidationBatch, *, channels: int, height: int, width: int, classes: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The batch as float32 inputs and int64 labels; ``ManifestError(reason="bad_validation_batch")``
    when it is not an inline batch, its hash or shapes do not match, or labels are out of range."""
    def bad(msg: str) -> ManifestError:
        return ManifestError(f"validation batch: {msg}", reason="bad_validation_batch")

    if not vb.uri.startswith(_PREFIX):
        raise bad("only inline data: URIs are supported")
    try:
        raw = base64.b64decode(vb.uri[len(_PREFIX):], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad("not base64") from exc
    if len(raw) > MAX_BYTES or hashlib.sha256(raw).hexdigest() != vb.sha256:
        raise bad("sha256 does not match")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            x, y = z["x"].astype(np.float32), z["y"].astype(np.int64)
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise bad(f"not a batch npz: {exc}") from exc
    if x.shape != (vb.count, channels, height, width) or y.shape != (vb.count,):
        raise bad(f"shapes {x.shape}/{y.shape} do not match count {vb.count} and input {channels}x{height}x{width}")
    if not np.isfinite(x).all() or (y < 0).any() or (y >= classes).any():
        raise bad("non-finite inputs or labels out of range")
    return x, y

"""Update frame v1: one model update from one agent, self-describing and checksummed.

Binary layout::

    b"FSUF" | u8 format version (1) | u32 header length (big endian) | header JSON | payload

The header (``FrameHeader``) names the codec pipeline (grammar in ``protocol.codec``), the
base model version, the tensors (names and shapes, in wire order), sample count, metrics and
the SHA-256 and length of the payload. Only trainable float parameters and the listed
buffers travel; optimizer, observer and other local state never enter a frame.

Decoding is all-or-nothing: it returns the full float32 tensors or raises ``FrameError``
with a reason code; nothing is half-applied.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol import envelope
from protocol.codec import (
    CodecError,
    ErrorFeedbackState,
    Tensors,
    TensorSpec,
    downlink_decode,
    downlink_encode,
    parse_codec,
)
from protocol.errors import FrameError, Reason, codec_frame_reason
from protocol.identifiers import Identifier
from protocol.tensors import all_finite, global_norm, subtract, tensor_hash

FRAME_MAGIC = b"FSUF"
FRAME_FORMAT = 1
MAX_HEADER_BYTES = 1 << 20


class TensorInfo(BaseModel):
    """Name and shape of one tensor in a frame, in wire order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=256)
    shape: tuple[int, ...]


class FrameHeader(BaseModel):
    """The JSON header of an update or model frame (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    update_id: str = Field(min_length=1, max_length=128)
    agent_id: Identifier
    round_id: int = Field(ge=0)
    kind: Literal["full", "delta"]
    base_version: Identifier
    codec: str
    dtype: Literal["float32"] = "float32"
    tensors: list[TensorInfo]
    sample_count: int = Field(ge=1)
    metrics: dict[str, float] = {}
    payload_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    payload_bytes: int = Field(ge=0)
    created_at: float


@dataclass(frozen=True)
class DecodedUpdate:
    """A checked update: its header and the full weights it decodes to."""

    header: FrameHeader
    tensors: Tensors  # full weights, float32, in header order


def specs_of(tensors: Mapping[str, np.ndarray]) -> list[TensorSpec]:
    """The tensor specs (name, shape) of ``tensors``, in their order."""
    return [TensorSpec(name, tuple(int(d) for d in t.shape)) for name, t in tensors.items()]


def encode_update(
    tensors: Mapping[str, np.ndarray],
    *,
    agent_id: str,
    round_id: int,
    base_version: str,
    sample_count: int,
    codec: str = "raw",
    base: Mapping[str, np.ndarray] | None = None,
    metrics: Mapping[str, float] | None = None,
    state: ErrorFeedbackState | None = None,
    seed: int = 0,
    update_id: str | None = None,
) -> bytes:
    """Encode full local weights as a frame; a ``delta`` codec subtracts ``base`` itself."""
    pipeline = parse_codec(codec)
    arrays: Tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    if pipeline.needs_base and base is None:
        raise FrameError(f"codec {codec!r} needs the base model", reason=Reason.MISSING_BASE)
    payload = pipeline.encode(
        arrays,
        base={k: np.asarray(v, dtype=np.float32) for k, v in base.items()} if base is not None else None,
        state=state,
        seed=seed,
    )
    header = FrameHeader(
        update_id=update_id or uuid.uuid4().hex,
        agent_id=agent_id,
        round_id=round_id,
        kind="delta" if pipeline.needs_base else "full",
        base_version=base_version,
        codec=pipeline.spec,
        tensors=[TensorInfo(name=k, shape=tuple(v.shape)) for k, v in arrays.items()],
        sample_count=sample_count,
        metrics={k: float(v) for k, v in (metrics or {}).items() if np.isfinite(v)},
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_bytes=len(payload),
        created_at=time.time(),
    )
    head = header.model_dump_json().encode("utf-8")
    return envelope.pack(FRAME_MAGIC, FRAME_FORMAT, head, payload)


def read_header(frame: bytes) -> tuple[FrameHeader, bytes]:
    """Validate the frame's envelope and checksum; return the header and the raw payload."""
    head, payload = envelope.unpack(frame, magic=FRAME_MAGIC, fmt=FRAME_FORMAT, max_header=MAX_HEADER_BYTES,
                                    what="frame")
    try:
        header = FrameHeader.model_validate_json(head)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise FrameError(f"frame header {where}: {first.get('msg')}", reason=Reason.BAD_HEADER) from exc
    if len(payload) != header.payload_bytes:
        raise FrameError(
            f"payload is {len(payload)} bytes, header says {header.payload_bytes}", reason=Reason.TRUNCATED
        )
    if hashlib.sha256(payload).hexdigest() != header.payload_sha256:
        raise FrameError("payload checksum mismatch", reason=Reason.CHECKSUM_MISMATCH)
    return header, payload


def decode_update(
    frame: bytes,
    *,
    expected: Sequence[TensorSpec],
    base: Mapping[str, np.ndarray] | None = None,
    max_update_norm: float | None = None,
) -> DecodedUpdate:
    """Decode and validate a frame against the base model's tensor specs.

    Refuses (``FrameError``): bad envelope/checksum, unknown codec, tensors whose names or
    shapes differ from ``expected``, non-finite values, and, when ``max_update_norm`` is given,
    an update whose distance from ``base`` is implausibly large.
    """
    header, payload = read_header(frame)
    got = [(t.name, tuple(t.shape)) for t in header.tensors]
    want = [(s.name, tuple(s.shape)) for s in expected]
    if got != want:
        diff = next(((g, w) for g, w in zip(got, want, strict=False) if g != w), None)
        raise FrameError(
            f"tensors do not match the base model ({len(got)} vs {len(want)} tensors; first difference {diff})",
            reason=Reason.SHAPE_MISMATCH,
        )
    try:
        pipeline = parse_codec(header.codec)
    except CodecError as exc:
        raise FrameError(f"codec {header.codec!r}: {exc.message}", reason=Reason.UNKNOWN_CODEC) from exc
    if pipeline.needs_base and base is None:
        raise FrameError("delta frame but no base model to apply it to", reason=Reason.MISSING_BASE)
    base32 = {k: np.asarray(v, dtype=np.float32) for k, v in base.items()} if base is not None else None
    try:
        tensors = pipeline.decode(payload, specs=list(expected), base=base32)
    except CodecError as exc:
        raise FrameError(f"payload does not decode: {exc.message}", reason=codec_frame_reason(exc.reason)) from exc
    if not all_finite(tensors):
        raise FrameError("update holds NaN or infinite values", reason=Reason.NON_FINITE)
    if max_update_norm is not None and base32 is not None:
        norm = global_norm(subtract(tensors, base32))
        if norm > max_update_norm:
            raise FrameError(f"update norm {norm:.3g} exceeds plausible bound {max_update_norm:.3g}",
                             reason=Reason.NORM_TOO_LARGE)
    return DecodedUpdate(header, tensors)


# -- model frames (downlink) ---------------------------------------------------------------------
# A global model travels in the same envelope, from ``agent_id="coordinator"``: whole
# (codec ``raw|zstd``), as a bitwise-exact XOR delta against the version the agent runs
# (codec ``xor|zstd``), or as the *step* from its parent in a lossy ``delta|…`` pipeline: the
# coordinator defines that version as what the step decodes to on top of the parent
# (:func:`encode_model_step`), so it is bit-exact too. The receiver checks the manifest's tensor
# hash and refuses a mismatch.
DOWNLINK_FULL = "raw|zstd"
DOWNLINK_DELTA = "xor|zstd"


def _model_frame(payload: bytes, codec: str, *, version: str, round_id: int, kind: Literal["full", "delta"],
                 against: str, arrays: Mapping[str, np.ndarray]) -> bytes:
    header = FrameHeader(
        update_id=f"model-{version}",
        agent_id="coordinator",
        round_id=round_id,
        kind=kind,
        base_version=against,
        codec=codec,
        tensors=[TensorInfo(name=k, shape=tuple(v.shape)) for k, v in arrays.items()],
        sample_count=1,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_bytes=len(payload),
        created_at=time.time(),
    )
    return envelope.pack(FRAME_MAGIC, FRAME_FORMAT, header.model_dump_json().encode("utf-8"), payload)


def encode_model(
    tensors: Mapping[str, np.ndarray], *, version: str, round_id: int = 0, base: Mapping[str, np.ndarray] | None = None,
    base_version: str | None = None,
) -> bytes:
    """Encode a global model as a frame from the coordinator: whole, or as a bit-exact XOR delta against ``base``."""
    arrays: Tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    kind: Literal["full", "delta"]
    if base is not None:
        if base_version is None:
            raise ValueError("a delta model frame needs base_version")
        payload = downlink_encode(arrays, {k: np.asarray(v, dtype=np.float32) for k, v in base.items()})
        codec, kind, against = DOWNLINK_DELTA, "delta", base_version
    else:
        payload = parse_codec(DOWNLINK_FULL).encode(arrays)
        codec, kind, against = DOWNLINK_FULL, "full", version
    return _model_frame(payload, codec, version=version, round_id=round_id, kind=kind, against=against,
                        arrays=arrays)


def encode_model_step(
    new: Mapping[str, np.ndarray], *, version: str, round_id: int, base: Mapping[str, np.ndarray], base_version: str,
    codec: str, state: ErrorFeedbackState | None, seed: int = 0,
) -> tuple[bytes, Tensors]:
    """The step from ``base`` to ``new`` in a lossy ``delta|…`` codec, and the weights it decodes to.

    The returned weights -- ``base`` plus the decoded step, in float32, by the very code a box runs
    -- *are* the version: publish them (their tensor hash goes into the manifest), not ``new``.
    With ``ef`` in the codec, ``state`` carries what this step left out into the next one.
    """
    pipeline = parse_codec(codec)
    if not pipeline.needs_base:
        raise FrameError(f"a model step needs a delta codec, got {codec!r}", reason=Reason.UNKNOWN_CODEC)
    arrays: Tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in new.items()}
    base32: Tensors = {k: np.ascontiguousarray(base[k], dtype=np.float32) for k in arrays}
    payload = pipeline.encode(arrays, base=base32, state=state, seed=seed)
    published = pipeline.decode(payload, specs=specs_of(arrays), base=base32)
    frame = _model_frame(payload, pipeline.spec, version=version, round_id=round_id, kind="delta",
                         against=base_version, arrays=arrays)
    return frame, published


def decode_model(
    frame: bytes,
    *,
    expected: Sequence[TensorSpec],
    expected_hash: str,
    base: Mapping[str, np.ndarray] | None = None,
) -> tuple[FrameHeader, Tensors]:
    """Decode a model frame; the result must hash to ``expected_hash`` (the manifest's) bit for bit."""
    header, payload = read_header(frame)
    if header.agent_id != "coordinator":
        raise FrameError("model frame not from the coordinator", reason=Reason.BAD_HEADER)
    if [(t.name, tuple(t.shape)) for t in header.tensors] != [(s.name, tuple(s.shape)) for s in expected]:
        raise FrameError("model tensors do not match the manifest", reason=Reason.SHAPE_MISMATCH)
    try:
        if header.codec == DOWNLINK_DELTA:
            if base is None:
                raise FrameError("delta model frame but no base model", reason=Reason.MISSING_BASE)
            tensors = downlink_decode(payload, list(expected), {k: np.asarray(v, np.float32) for k, v in base.items()})
        elif header.codec == DOWNLINK_FULL:
            tensors = parse_codec(DOWNLINK_FULL).decode(payload, specs=list(expected))
        else:  # a step from the parent in a lossy delta pipeline (encode_model_step)
            tensors = _decode_step(header.codec, payload, expected, base)
    except CodecError as exc:
        raise FrameError(f"model payload does not decode: {exc.message}",
                         reason=codec_frame_reason(exc.reason)) from exc
    got = tensor_hash(tensors)
    if got != expected_hash:
        raise FrameError(f"model tensor hash {got[:12]} != manifest {expected_hash[:12]}",
                         reason=Reason.HASH_MISMATCH)
    return header, tensors


def _decode_step(codec: str, payload: bytes, expected: Sequence[TensorSpec],
                 base: Mapping[str, np.ndarray] | None) -> Tensors:
    try:
        pipeline = parse_codec(codec)
    except CodecError as exc:
        raise FrameError(f"unknown model codec {codec!r}", reason=Reason.UNKNOWN_CODEC) from exc
    if not pipeline.needs_base:
        raise FrameError(f"unknown model codec {codec!r}", reason=Reason.UNKNOWN_CODEC)
    if base is None:
        raise FrameError("model step frame but no base model", reason=Reason.MISSING_BASE)
    return pipeline.decode(payload, specs=list(expected), base={k: np.asarray(v, np.float32) for k, v in base.items()})

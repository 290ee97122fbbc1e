"""The one error model: FedscanError + Reason, its families, and the two edge mappings (HTTP, Ack)."""

from __future__ import annotations

import ast
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from coordinator.rounds import rejection_ack
from coordinator.store.errors import DuplicateError, StoreError
from edge_agent.api.errors import HTTP_STATUS, http_error, http_error_for, http_status
from edge_agent.dicom_scp import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    dicom_status,
)
from edge_agent.serving import ServingError
from edge_agent.store import StudyNotFound
from export.engines import EngineAttempt, NoEngine
from export.errors import EngineUnavailable, describe
from learning.dicom import ImageRejected
from protocol import envelope
from protocol.codec import CODEC_REASONS, CodecError, TensorSpec
from protocol.errors import (
    FedscanError,
    FrameError,
    MalformedMessage,
    ManifestError,
    ProtocolError,
    Reason,
    TransportError,
    codec_frame_reason,
)
from protocol.frame import FRAME_FORMAT, FRAME_MAGIC, MAX_HEADER_BYTES, decode_update, encode_update

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "firmware", "learning", "coordinator", "edge_agent", "export", "fedscan", "bench")
# control flow, not refusals: they carry no reason and never reach a caller outside their loop
CONTROL_FLOW = {"Stopped", "TrainingCancelled"}
BUILTIN_BASES = {"Exception", "ValueError", "RuntimeError", "KeyError", "TypeError", "OSError", "LookupError"}


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_str_message_detail_and_to_dict() -> None:
    err = FrameError("chunk 3 checksum mismatch", reason=Reason.CHECKSUM_MISMATCH, detail={"index": 3})
    assert str(err) == "[checksum_mismatch] chunk 3 checksum mismatch"
    assert err.message == "chunk 3 checksum mismatch" and err.reason is Reason.CHECKSUM_MISMATCH
    assert err.to_dict() == {"reason": "checksum_mismatch", "message": "chunk 3 checksum mismatch",
                             "detail": {"index": 3}}
    assert MalformedMessage("x").reason == "malformed_message"  # the family's default
    assert FedscanError("x").to_dict() == {"reason": "error", "message": "x"}


def test_a_reason_outside_the_enum_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        FedscanError("x", reason="no_such_reason")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unregistered codec reason"):
        CodecError("x", reason=Reason.ROUND_CLOSED)


def test_reason_is_its_wire_string() -> None:
    values = [r.value for r in Reason]
    assert len(values) == len(set(values))
    assert Reason("round_closed") is Reason.ROUND_CLOSED and Reason.ROUND_CLOSED == "round_closed"
    assert all(v == v.lower() and " " not in v for v in values)


def test_every_codec_reason_has_its_frame_twin() -> None:
    for r in CODEC_REASONS:
        assert codec_frame_reason(r).value == f"codec_{r.value}"


def test_families() -> None:
    # bad input is also a ValueError (Python's convention); operational failures are not
    for cls in (ProtocolError, FrameError, MalformedMessage, ManifestError, CodecError, ImageRejected):
        assert issubclass(cls, FedscanError) and issubclass(cls, ValueError)
    for cls in (TransportError, StoreError, ServingError, EngineUnavailable):
        assert issubclass(cls, FedscanError) and not issubclass(cls, ValueError)
    assert issubclass(CodecError, ProtocolError) and issubclass(DuplicateError, StoreError)


@pytest.mark.parametrize(
    "err",
    [
        FrameError("bad", reason=Reason.TRUNCATED, detail={"n": 1}),
        CodecError("short", reason=Reason.TRUNCATED),
        ServingError("full", reason=Reason.OVERLOADED, detail={"queued": 4, "retry_after_s": 2}),
        NoEngine([EngineAttempt("tensorrt", False, "unavailable: no GPU")]),
        StudyNotFound("0" * 32),
    ],
    ids=lambda e: type(e).__name__,
)
def test_pickle_keeps_class_reason_message_and_detail(err: FedscanError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert (back.reason, back.message, back.detail, str(back)) == (err.reason, err.message, err.detail, str(err))
    if isinstance(err, NoEngine):
        assert isinstance(back, NoEngine) and back.attempts == err.attempts


def test_describe_for_attempt_records() -> None:
    assert describe(EngineUnavailable("no CUDA GPU")) == "unavailable: no CUDA GPU"
    assert describe(OSError("disk")) == "OSError: disk"


def test_frame_wraps_a_codec_failure_with_the_codec_reason() -> None:
    tensors = {"w": np.ones((4, 4), dtype=np.float32)}
    frame = encode_update(tensors, update_id="u", agent_id="a", round_id=1, base_version="v0", codec="raw",
                          sample_count=1)
    head, payload = envelope.unpack(frame, magic=FRAME_MAGIC, fmt=FRAME_FORMAT, max_header=MAX_HEADER_BYTES,
                                    what="frame")
    short = payload[:-4]  # one float short, with a checksum that matches: only the codec can notice
    header = json.loads(head)
    header.update(payload_sha256=hashlib.sha256(short).hexdigest(), payload_bytes=len(short))
    bad = envelope.pack(FRAME_MAGIC, FRAME_FORMAT, json.dumps(header).encode(), short)
    with pytest.raises(FrameError) as info:
        decode_update(bad, expected=[TensorSpec("w", (4, 4))])
    assert info.value.reason is Reason.CODEC_TRUNCATED
    assert "[truncated]" not in info.value.message  # the codec's message, not its str() nested


# -- edges ---------------------------------------------------------------------------------------------
def test_http_mapping_is_the_one_table() -> None:
    assert http_status(ImageRejected("x", reason=Reason.TOO_MANY_PIXELS)) == 413
    assert http_status(ImageRejected("x", reason=Reason.CORRUPT_DICOM)) == 400
    assert http_status(ServingError("x", reason=Reason.INFERENCE_TIMEOUT)) == 504
    assert http_status(StudyNotFound("ab")) == 404
    # a reason the table does not list: 422 for bad input, 500 for a failure of the box
    assert http_status(FrameError("x", reason=Reason.TRUNCATED)) == 422
    assert http_status(StoreError("x")) == 500
    busy = http_error_for(ServingError("full", reason=Reason.OVERLOADED, detail={"retry_after_s": 7}),
                          retry_after_s=1)
    assert (busy.status_code, busy.headers, busy.detail) == (
        503, {"Retry-After": "7"}, {"reason": "overloaded", "message": "full"})
    not_ready = http_error_for(ServingError("no model", reason=Reason.NOT_READY), retry_after_s=3)
    assert (not_ready.status_code, not_ready.headers) == (503, {"Retry-After": "3"})
    assert http_error(Reason.MISSING_TOKEN, "send a token").status_code == 401
    with pytest.raises(KeyError):
        http_error(Reason.ROUND_CLOSED, "the API never answers this itself")


def _reasons_raised_with(class_names: set[str]) -> set[Reason]:
    found: set[Reason] = set()
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in class_names:
                for kw in node.keywords:
                    if kw.arg == "reason" and isinstance(kw.value, ast.Attribute):
                        found.add(Reason[kw.value.attr])
    return found


def test_every_image_and_serving_reason_has_an_explicit_http_status() -> None:
    raised = _reasons_raised_with({"ImageRejected", "ServingError"})
    assert raised >= {Reason.NOT_READY, Reason.OVERLOADED, Reason.CORRUPT_DICOM, Reason.WRONG_SIZE}
    assert raised - set(HTTP_STATUS) == set()


def test_dicom_status_mapping() -> None:
    assert dicom_status(ImageRejected("x", reason=Reason.NO_PIXEL_DATA)) == STATUS_CANNOT_UNDERSTAND
    assert dicom_status(ServingError("x", reason=Reason.NOT_READY)) == STATUS_OUT_OF_RESOURCES
    assert dicom_status(ServingError("x", reason=Reason.OVERLOADED)) == STATUS_OUT_OF_RESOURCES
    assert dicom_status(ServingError("x", reason=Reason.INFERENCE_TIMEOUT)) == STATUS_PROCESSING_FAILURE


def test_ack_mapping() -> None:
    ack = rejection_ack("u1", 3, FedscanError("round 3 is not open", reason=Reason.ROUND_CLOSED))
    assert (ack.status, ack.reason, ack.detail, ack.round_id) == ("rejected", "round_closed", "round 3 is not open", 3)
    wire = ack.to_bytes()
    assert b'"reason":"round_closed"' in wire  # the v1 wire string, unchanged


# -- the tree keeps to the model -----------------------------------------------------------------------
def test_no_reason_is_a_bare_string_literal() -> None:
    """Reasons are written as ``Reason.X`` everywhere, so each one is registered in the enum."""
    offenders = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "reason":
                value = node.value
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    offenders.append(f"{path.relative_to(ROOT)}:{value.lineno} reason={value.value!r}")
            elif isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values, strict=True):
                    if isinstance(k, ast.Constant) and k.value == "reason" and isinstance(v, ast.Constant) \
                            and isinstance(v.value, str):
                        offenders.append(f"{path.relative_to(ROOT)}:{v.lineno} {{'reason': {v.value!r}}}")
            elif isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "reason" for t in stmt.targets) \
                            and isinstance(stmt.value, ast.Constant):
                        offenders.append(f"{path.relative_to(ROOT)}:{stmt.lineno} class {node.name}.reason")
    assert offenders == []


def test_every_error_class_joins_the_model() -> None:
    """An exception class of ours derives (directly or not) from FedscanError, unless it is control flow."""
    defined: dict[str, list[str]] = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                defined[node.name] = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "?") for b in node.bases]

    def joins(name: str, seen: frozenset[str] = frozenset()) -> bool:
        if name == "FedscanError":
            return True
        if name not in defined or name in seen:
            return False
        return any(joins(b, seen | {name}) for b in defined[name])

    exceptions = [n for n, bases in defined.items() if set(bases) & BUILTIN_BASES or any(joins(b) for b in bases)]
    strays = sorted(n for n in exceptions if not joins(n) and n not in CONTROL_FLOW)
    assert strays == []

"""Pipeline grammar: parsing, canonical form, flags and parse errors."""

from __future__ import annotations

import pytest

from protocol.codec import CodecError, parse_codec
from protocol.errors import FedscanError, Reason


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("raw", "raw"),
        ("raw|zstd", "raw|zstd"),
        ("zstd", "raw|zstd"),
        ("ZSTD:3", "raw|zstd"),
        ("zstd:19", "raw|zstd:19"),
        ("delta", "delta|raw"),
        ("delta|topk:0.01|ef|q:8|zstd", "delta|topk:0.01|ef|q:8|zstd"),
        (" delta | topk:0.010 | ef | q:8 | zstd ", "delta|topk:0.01|ef|q:8|zstd"),
        ("delta|q:4:block=256|zstd", "delta|q:4:block=256|zstd"),
        ("delta|sign|zstd", "delta|q:1|zstd"),
        ("delta|sign:block=64|zstd", "delta|q:1:block=64|zstd"),
        ("delta|topk:0.01:global|ef|sign|zstd", "delta|topk:0.01:global|ef|q:1|zstd"),
        ("delta|topk:0.01:tensor|zstd", "delta|topk:0.01|raw|zstd"),
        ("topk:1e-3|q:2|ef", "topk:0.001|q:2|ef"),
        ("q:4|ef|zstd:1", "q:4|ef|zstd:1"),
    ],
)
def test_canonical_spec_is_normalised_and_idempotent(spec: str, canonical: str) -> None:
    p = parse_codec(spec)
    assert p.spec == canonical
    assert parse_codec(p.spec).spec == canonical
    assert parse_codec(p.spec) == p


def test_flags() -> None:
    assert parse_codec("raw").lossless
    assert parse_codec("raw|zstd").lossless
    assert not parse_codec("raw").needs_base
    delta = parse_codec("delta|zstd")
    assert delta.needs_base and not delta.lossless  # float32 rounding of x - base
    lossy = parse_codec("delta|topk:0.01|ef|q:8|zstd")
    assert lossy.needs_base and lossy.needs_state and not lossy.lossless
    assert not parse_codec("q:8").needs_base
    assert not parse_codec("q:8").needs_state
    assert parse_codec("topk:0.1|ef|q:8").ef == "topk"
    assert parse_codec("topk:0.1|q:8|ef").ef == "all"
    assert parse_codec("q:8|ef").ef == "all"


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("", "empty_spec"),
        ("   ", "empty_spec"),
        ("foo", "unknown_stage"),
        ("delta|lz4", "unknown_stage"),
        ("topk:0", "bad_parameter"),
        ("topk:2", "bad_parameter"),
        ("topk:-0.1", "bad_parameter"),
        ("topk:nan", "bad_parameter"),
        ("topk:abc", "bad_parameter"),
        ("topk", "bad_parameter"),
        ("topk:0.1:sideways", "bad_parameter"),
        ("q:3", "bad_parameter"),
        ("q:16", "bad_parameter"),
        ("q", "bad_parameter"),
        ("q:8:block=0", "bad_parameter"),
        ("q:8:blk=4", "bad_parameter"),
        ("sign:7", "bad_parameter"),
        ("zstd:0", "bad_parameter"),
        ("zstd:23", "bad_parameter"),
        ("zstd:x", "bad_parameter"),
        ("raw:1", "bad_parameter"),
        ("delta:1", "bad_parameter"),
        ("ef", "bad_order"),
        ("delta|ef|q:8", "bad_order"),
        ("zstd|delta", "bad_order"),
        ("q:8|topk:0.1", "bad_order"),
        ("raw|delta", "bad_order"),
        ("raw|q:8", "bad_order"),
        ("delta||zstd", "bad_order"),
        ("topk:0.1|ef|q:8|ef", "duplicate_stage"),
        ("delta|delta", "duplicate_stage"),
        ("q:8|q:4", "duplicate_stage"),
        ("zstd|zstd", "duplicate_stage"),
    ],
)
def test_parse_errors(spec: str, reason: str) -> None:
    with pytest.raises(CodecError, match=rf"^\[{reason}\]") as info:
        parse_codec(spec)
    assert info.value.reason == reason


def test_codec_error_is_value_error_with_registered_reason() -> None:
    err = CodecError("x", reason=Reason.TRUNCATED)
    assert isinstance(err, ValueError) and isinstance(err, FedscanError)
    assert str(err) == "[truncated] x" and err.message == "x"
    with pytest.raises(ValueError, match="unregistered"):
        CodecError("x", reason=Reason.NOT_ENROLLED)  # a reason of the tree, but not a codec's

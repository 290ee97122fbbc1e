"""Malformed payloads and bad inputs: always a CodecError with the right reason, never partial data."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import CODEC_REASONS, CodecError, ErrorFeedbackState, TensorSpec, parse_codec, specs_of
from protocol.codec.wire import varint_encode, varint_scalar

RNG = np.random.default_rng(7)
T = {
    "conv": RNG.standard_normal((8, 3, 3, 3)).astype(np.float32),
    "bias": RNG.standard_normal(8).astype(np.float32),
    "scalar": np.array(0.5, np.float32),
}
BASE = {k: (v * 0.9).astype(np.float32) for k, v in T.items()}
SPECS = specs_of(T)

PIPELINES = [
    "raw",
    "raw|zstd",
    "delta|zstd",
    "delta|topk:0.1|ef|q:8|zstd",
    "delta|topk:0.1|ef|q:8",
    "delta|q:4:block=16|zstd",
    "delta|q:4:block=16",
    "delta|sign|zstd",
    "delta|topk:0.2:global|ef|sign",
    "topk:0.3|raw",
]


def _encode(spec: str, seed: int = 0) -> bytes:
    p = parse_codec(spec)
    return p.encode(T, base=BASE, state=ErrorFeedbackState() if p.needs_state else None, seed=seed)


def _decode(spec: str, payload: bytes, specs: list[TensorSpec] | None = None) -> dict[str, np.ndarray]:
    return parse_codec(spec).decode(payload, specs=SPECS if specs is None else specs, base=BASE)


def _reason(spec: str, payload: bytes, specs: list[TensorSpec] | None = None) -> str:
    with pytest.raises(CodecError) as info:
        _decode(spec, payload, specs)
    assert info.value.reason in CODEC_REASONS
    return info.value.reason


@pytest.mark.parametrize("spec", PIPELINES)
def test_valid_payload_decodes(spec: str) -> None:
    out = _decode(spec, _encode(spec))
    assert [(k, v.shape) for k, v in out.items()] == [(s.name, s.shape) for s in SPECS]


@pytest.mark.parametrize("spec", PIPELINES)
def test_truncated_payloads(spec: str) -> None:
    payload = _encode(spec)
    for cut in sorted({0, 1, 3, len(payload) // 2, len(payload) - 1}):
        assert _reason(spec, payload[:cut]) == "truncated", cut


@pytest.mark.parametrize("spec", PIPELINES)
def test_trailing_bytes(spec: str) -> None:
    payload = _encode(spec)
    for extra in (b"\x00", b"\x01\x02\x03\x04", b"\x28\xb5\x2f\xfd"):
        assert _reason(spec, payload + extra) == "trailing_bytes"


@pytest.mark.parametrize("spec", [s for s in PIPELINES if s.endswith("zstd")])
def test_flipped_bytes_in_zstd_payload_are_detected(spec: str) -> None:
    """zstd's content checksum catches every flip that changes the content.

    A few bits of a compressed block do not influence the output at all; flipping those
    must give back exactly the original tensors (never something different).
    """
    payload = _encode(spec)
    ref = _decode(spec, payload)
    header = zstandard.frame_header_size(payload)
    detected = harmless = 0
    for pos in range(header, len(payload)):  # every byte of blocks and checksum
        for bit in (0x01, 0x80):
            bad = bytearray(payload)
            bad[pos] ^= bit
            try:
                out = _decode(spec, bytes(bad))
            except CodecError as exc:
                assert exc.reason in {"corrupt", "truncated", "trailing_bytes"}, (pos, bit, exc)
                detected += 1
            else:
                assert all(np.array_equal(out[k].view(np.uint32), ref[k].view(np.uint32)) for k in ref)
                harmless += 1
    assert detected >= 0.98 * (detected + harmless)


@pytest.mark.parametrize("spec", PIPELINES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_random_corruption_never_escapes_as_other_exception(spec: str, data: st.DataObject) -> None:
    payload = bytearray(_encode(spec))
    n_flips = data.draw(st.integers(1, 4))
    for _ in range(n_flips):
        pos = data.draw(st.integers(0, len(payload) - 1))
        payload[pos] = data.draw(st.integers(0, 255))
    try:
        out = _decode(spec, bytes(payload))
    except CodecError as exc:
        assert exc.reason in CODEC_REASONS
    else:  # undetectable corruption (no checksum without zstd) still yields complete tensors
        assert [(k, v.shape, v.dtype) for k, v in out.items()] == [
            (s.name, s.shape, np.dtype(np.float32)) for s in SPECS
        ]


@pytest.mark.parametrize("spec", PIPELINES)
@settings(max_examples=30, deadline=None)
@given(blob=st.binary(max_size=600))
def test_garbage_is_rejected_or_complete(spec: str, blob: bytes) -> None:
    try:
        out = _decode(spec, blob)
    except CodecError as exc:
        assert exc.reason in CODEC_REASONS
    else:
        assert list(out) == [s.name for s in SPECS]


# --------------------------------------------------------------- crafted payloads
def _body(*parts: bytes) -> bytes:
    return b"".join(parts)


TINY = {"v": np.array([0.0, 4.0, 0.0, -2.0], np.float32)}
TINY_SPECS = specs_of(TINY)


def test_crafted_topk_payload_roundtrips() -> None:
    """Sanity check of the documented layout that the crafted cases below corrupt."""
    p = parse_codec("topk:0.5")
    body = _body(
        varint_scalar(1), varint_scalar(4), varint_scalar(2), varint_scalar(2), varint_encode([1, 1]),
        np.array([4.0, -2.0], "<f4").tobytes(),
    )  # fmt: skip
    assert p.encode(TINY) == body
    assert np.array_equal(p.decode(body, specs=TINY_SPECS)["v"], TINY["v"])


@pytest.mark.parametrize(
    ("gaps", "reason"),
    [
        ([1, 5], "index_out_of_range"),  # idx 1, 7 >= 4
        ([4, 0], "index_out_of_range"),  # first index 4
        ([1, 2], "index_out_of_range"),  # idx 1, 4
        ([2**40, 0], "index_out_of_range"),  # huge gap
    ],
)
def test_indices_out_of_range(gaps: list[int], reason: str) -> None:
    idx = varint_encode(gaps)
    body = _body(
        varint_scalar(1), varint_scalar(4), varint_scalar(2), varint_scalar(len(idx)), idx,
        np.array([4.0, -2.0], "<f4").tobytes(),
    )  # fmt: skip
    with pytest.raises(CodecError, match=reason):
        parse_codec("topk:0.5").decode(body, specs=TINY_SPECS)


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        ([2, 4, 2, 2], "tensor_count"),  # header claims 2 tensors
        ([1, 5, 2, 2], "shape_mismatch"),  # header claims 5 elements
        ([1, 4, 3, 2], "bad_count"),  # k=3 but topk:0.5 of 4 is 2
        ([1, 4, 2, 3], "bad_varint"),  # index stream length covers a value byte
    ],
)
def test_bad_headers(head: list[int], reason: str) -> None:
    body = b"".join(varint_scalar(v) for v in head) + varint_encode([1, 1]) + np.array([4.0, -2.0], "<f4").tobytes()
    with pytest.raises(CodecError, match=reason):
        parse_codec("topk:0.5").decode(body, specs=TINY_SPECS)


def test_non_canonical_varint_rejected() -> None:
    body = _body(varint_scalar(1), b"\x84\x00", np.zeros(4, "<f4").tobytes())  # 4 as two bytes
    with pytest.raises(CodecError, match="bad_varint"):
        parse_codec("q:8").decode(body, specs=TINY_SPECS)


def test_bad_scale_and_padding_and_code() -> None:
    p = parse_codec("q:4")
    good = p.encode(TINY, seed=1)
    assert np.allclose(p.decode(good, specs=TINY_SPECS)["v"], TINY["v"], atol=4.0 / 7 * 1.001)
    head = varint_scalar(1) + varint_scalar(4)
    for scale in (-1.0, np.inf, np.nan):
        with pytest.raises(CodecError, match="bad_scale"):
            p.decode(head + np.array([scale], "<f4").tobytes() + good[-2:], specs=TINY_SPECS)
    # 3 values at 4 bits: the upper nibble of the 2nd code byte is padding
    three = {"v": TINY["v"][:3].copy()}
    enc = p.encode(three, seed=1)
    with pytest.raises(CodecError, match="bad_padding"):
        p.decode(enc[:-1] + bytes([enc[-1] | 0xF0]), specs=specs_of(three))
    # code 15 is unused by the 15-level q:4 grid
    with pytest.raises(CodecError, match="corrupt"):
        p.decode(good[:-2] + b"\xff\xff", specs=TINY_SPECS)


def test_wrong_tensor_count() -> None:
    fewer = SPECS[:2]
    more = [*SPECS, TensorSpec("extra", (3,))]
    for spec in ("delta|q:8|zstd", "delta|topk:0.1|ef|q:8", "delta|topk:0.2:global|ef|sign"):
        payload = _encode(spec)
        base = {**BASE, "extra": np.zeros(3, np.float32)}
        for specs in (fewer, more):
            with pytest.raises(CodecError, match="tensor_count"):
                parse_codec(spec).decode(payload, specs=specs, base=base)
    # the headerless v1 raw format can only see the byte count
    raw = _encode("raw")
    assert _reason("raw", raw, fewer) == "trailing_bytes"
    with pytest.raises(CodecError, match="truncated"):
        parse_codec("raw").decode(raw, specs=more)


def test_decompression_bomb_is_refused() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(4 * 4 * 64 * 4 + 2048))
    with pytest.raises(CodecError, match="decompression_bomb"):
        parse_codec("raw|zstd").decode(bomb, specs=[TensorSpec("w", (64,))])
    unknown = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(256))
    with pytest.raises(CodecError, match="bad_frame"):
        parse_codec("raw|zstd").decode(unknown, specs=[TensorSpec("w", (64,))])
    with pytest.raises(CodecError, match="corrupt"):
        parse_codec("raw|zstd").decode(b"definitely not zstd!!", specs=[TensorSpec("w", (64,))])


# ------------------------------------------------------------------ bad arguments
def test_encode_argument_errors() -> None:
    with pytest.raises(CodecError, match="missing_base"):
        parse_codec("delta|zstd").encode(T)
    with pytest.raises(CodecError, match="missing_base"):
        parse_codec("delta|zstd").encode(T, base={"conv": BASE["conv"]})
    with pytest.raises(CodecError, match="shape_mismatch"):
        parse_codec("delta|zstd").encode(T, base={**BASE, "bias": np.zeros(9, np.float32)})
    with pytest.raises(CodecError, match="bad_dtype"):
        parse_codec("raw").encode({"a": np.arange(3)})
    with pytest.raises(CodecError, match="non_finite"):
        parse_codec("q:8").encode({"a": np.array([1.0, np.inf], np.float32)})
    with pytest.raises(CodecError, match="bad_parameter"):
        parse_codec("q:8").encode(T, seed=-1)


def test_decode_argument_errors() -> None:
    payload = _encode("delta|q:8|zstd")
    with pytest.raises(CodecError, match="missing_base"):
        parse_codec("delta|q:8|zstd").decode(payload, specs=SPECS)
    with pytest.raises(CodecError, match="bad_dtype"):
        parse_codec("raw").decode(b"", specs=[TensorSpec("a", (0,), "float16")])
    with pytest.raises(CodecError, match="bad_spec"):
        parse_codec("raw").decode(b"", specs=[TensorSpec("a", (0,)), TensorSpec("a", (0,))])

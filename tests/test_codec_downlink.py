"""Downlink (coordinator -> edge) codec: bit-identical reconstruction."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import CodecError, Tensors, downlink_decode, downlink_encode, specs_of


def _random_bits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Any float32 bit pattern (denormals, infinities, -0.0) except NaN."""
    a = rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32).view(np.float32)
    a[np.isnan(a)] = -0.0
    return a


def _same_bits(a: Tensors, b: Tensors) -> bool:
    return list(a) == list(b) and all(
        a[k].shape == b[k].shape and np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)) for k in a
    )


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 12), max_size=4), min_size=0, max_size=4),
    seed=st.integers(0, 2**32 - 1),
    with_base=st.booleans(),
    mode=st.sampled_from(["bits", "normal"]),
)
def test_downlink_is_bit_identical(shapes: list[list[int]], seed: int, with_base: bool, mode: str) -> None:
    rng = np.random.default_rng(seed)
    if mode == "bits":
        new = {f"t{i}": _random_bits(rng, tuple(s)) for i, s in enumerate(shapes)}
        base = {k: _random_bits(rng, v.shape) for k, v in new.items()} if with_base else None
    else:
        base_n = {f"t{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
        new = {k: (v + rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for k, v in base_n.items()}
        base = base_n if with_base else None
    payload = downlink_encode(new, base)
    assert _same_bits(downlink_decode(payload, specs_of(new), base), new)


def test_negative_zero_and_specials_survive() -> None:
    new = {"a": np.array([-0.0, 0.0, np.inf, -np.inf, 1e-45, -3.5], np.float32)}
    base = {"a": np.array([0.0, -0.0, 1.0, np.inf, -1e-45, -3.5], np.float32)}
    for b in (base, None):
        out = downlink_decode(downlink_encode(new, b), specs_of(new), b)
        assert _same_bits(out, new)
        assert np.signbit(out["a"][0]) and not np.signbit(out["a"][1])


def test_small_change_compresses_well() -> None:
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal(100_000).astype(np.float32)}
    new = {"w": base["w"].copy()}
    new["w"][::100] += 0.01
    assert len(downlink_encode(new, base)) < 0.05 * 4 * 100_000


def test_downlink_errors() -> None:
    new = {"w": np.arange(64, dtype=np.float32)}
    base = {"w": np.ones(64, np.float32)}
    payload = downlink_encode(new, base)
    with pytest.raises(CodecError, match="truncated"):
        downlink_decode(payload[:-3], specs_of(new), base)
    with pytest.raises(CodecError, match="trailing_bytes"):
        downlink_decode(payload + b"\0", specs_of(new), base)
    with pytest.raises(CodecError, match="trailing_bytes"):  # payload holds more tensors than specs
        downlink_decode(payload, specs_of({"w": np.zeros(60, np.float32)}), {"w": np.ones(60, np.float32)})
    with pytest.raises(CodecError, match="missing_base"):
        downlink_decode(payload, specs_of(new), {})
    with pytest.raises(CodecError, match="shape_mismatch"):
        downlink_encode(new, {"w": np.ones(65, np.float32)})
    with pytest.raises(CodecError, match="bad_dtype"):
        downlink_encode({"w": np.arange(4, dtype=np.float64)}, None)

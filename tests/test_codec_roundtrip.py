"""Round trips: every stage within its documented error bound, lossless pipelines exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import ErrorFeedbackState, Tensors, parse_codec, specs_of
from protocol.codec.quant import dequantize, error_bound, quantize
from protocol.codec.topk import topk_count

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shape_st = st.lists(st.integers(1, 20), min_size=0, max_size=4).filter(lambda s: math.prod(s) <= 5000)


@st.composite
def tensor_sets(draw: st.DrawFn, min_tensors: int = 1) -> Tensors:
    shapes = draw(st.lists(shape_st, min_size=min_tensors, max_size=4))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-4, 1.0, 1e3]))
    rng = np.random.default_rng(seed)
    return {f"t{i}": (rng.standard_normal(s) * scale).astype(np.float32) for i, s in enumerate(shapes)}


def _perturbed(t: Tensors, seed: int) -> Tensors:
    rng = np.random.default_rng(seed)
    return {k: (v + rng.standard_normal(v.shape) * 0.05 * (np.std(v) + 1e-6)).astype(np.float32) for k, v in t.items()}


def _flat(t: Tensors) -> np.ndarray:
    return np.concatenate([v.reshape(-1) for v in t.values()]) if t else np.zeros(0, np.float32)


def _roundtrip(spec: str, t: Tensors, base: Tensors | None = None, seed: int = 0) -> Tensors:
    p = parse_codec(spec)
    state = ErrorFeedbackState() if p.needs_state else None
    out = p.decode(p.encode(t, base=base, state=state, seed=seed), specs=specs_of(t), base=base)
    assert list(out) == list(t)
    for k in t:
        assert out[k].shape == t[k].shape and out[k].dtype == np.float32
    return out


def _block_scales(x: np.ndarray, block: int | None) -> np.ndarray:
    b = x.size if block is None else block
    nb = -(-x.size // b)
    pad = np.zeros(nb * b, np.float32)
    pad[: x.size] = np.abs(x)
    out: np.ndarray = pad.reshape(nb, b).max(axis=1)
    return out


# --------------------------------------------------------------------- lossless
@pytest.mark.parametrize("spec", ["raw", "raw|zstd", "zstd:1", "zstd:19"])
@SETTINGS
@given(t=tensor_sets(min_tensors=0))
def test_lossless_pipelines_are_bit_exact(spec: str, t: Tensors) -> None:
    out = _roundtrip(spec, t)
    for k in t:
        assert np.array_equal(out[k].view(np.uint32), t[k].view(np.uint32))


def test_raw_is_the_v1_concatenation_including_special_values() -> None:
    t = {
        "w": np.array([[1.5, -0.0], [np.nan, np.inf]], dtype=np.float32),
        "s": np.array(-2.25, dtype=np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }
    payload = parse_codec("raw").encode(t)
    assert payload == b"".join(v.astype("<f4").tobytes() for v in t.values())
    out = parse_codec("raw").decode(payload, specs=specs_of(t))
    for k in t:
        assert np.array_equal(out[k].view(np.uint32), t[k].view(np.uint32))


# ------------------------------------------------------------------------ delta
@SETTINGS
@given(t=tensor_sets(), seed=st.integers(0, 1000))
def test_delta_within_rounding_bound(t: Tensors, seed: int) -> None:
    base = _perturbed(t, seed)
    out = _roundtrip("delta|zstd", t, base)
    for k in t:
        x, b = t[k].astype(np.float64), base[k].astype(np.float64)
        bound = 2.0**-24 * (np.abs(x) + 2 * np.abs(x - b))
        assert np.all(np.abs(out[k] - x) <= bound)


# ------------------------------------------------------------------------- quant
def _step(bits: int, s: np.ndarray) -> np.ndarray:
    """Documented level spacing: s/L with L = 2**(bits-1) - 1, and 2s for the sign quantiser."""
    return 2 * s if bits == 1 else s / (2 ** (bits - 1) - 1)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("block", [None, 1, 7, 256])
@SETTINGS
@given(t=tensor_sets(), seed=st.integers(0, 2**31))
def test_quant_within_step_bound(bits: int, block: int | None, t: Tensors, seed: int) -> None:
    spec = f"q:{bits}" + ("" if block is None else f":block={block}") + "|zstd"
    out = _roundtrip(spec, t, seed=seed)
    for k in t:
        x = t[k].reshape(-1)
        s = np.repeat(_block_scales(x, block), x.size if block is None else block)[: x.size]
        bound = _step(bits, s.astype(np.float64)) * (1 + 2.0**-10)
        err = np.abs(out[k].reshape(-1).astype(np.float64) - x)
        assert np.all(err <= bound), (k, float(np.max(err - bound)))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block", [None, 7])
@SETTINGS
@given(t=tensor_sets())
def test_quant_before_ef_rounds_to_nearest(bits: int, block: int | None, t: Tensors) -> None:
    """q directly followed by ef is deterministic and contractive: err <= min(|x|, step/2)."""
    spec = f"q:{bits}" + ("" if block is None else f":block={block}") + "|ef"
    out = _roundtrip(spec, t)
    for k in t:
        x = t[k].reshape(-1).astype(np.float64)
        s = np.repeat(_block_scales(t[k].reshape(-1), block), x.size if block is None else block)[: x.size]
        bound = np.minimum(np.abs(x), _step(bits, s) / 2) * (1 + 2.0**-10)
        assert np.all(np.abs(out[k].reshape(-1) - x) <= bound + 1e-45)


def test_sign_before_ef_is_mean_magnitude_sign() -> None:
    x = np.array([3.0, -1.0, 0.5, -0.5, 2.0, -4.0, 1.0], np.float32)
    out = _roundtrip("sign:block=4|ef", {"x": x})["x"]
    m1, m2 = np.mean(np.abs(x[:4])), np.mean(np.abs(x[4:]))
    assert np.allclose(out, np.sign(x) * np.array([m1] * 4 + [m2] * 3), rtol=1e-6)


def test_quant_1bit_is_sign_with_scale() -> None:
    x = np.array([0.5, -0.25, 1.0, -1.0, 0.0], np.float32)
    out = _roundtrip("sign", {"x": x}, seed=5)["x"]
    assert set(np.abs(out).tolist()) == {1.0}


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quant_error_bound_helper_holds(bits: int, deterministic: bool) -> None:
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal(1000) * 3).astype(np.float32)
    x[::97] = 0.0
    scales, codes = quantize(x, bits, 100, None if deterministic else rng)
    out = dequantize(scales, codes, bits, 100)
    bound = error_bound(x, scales, bits, 100, deterministic=deterministic)
    assert np.all(np.abs(out.astype(np.float64) - x) <= bound)
    if bits > 1:
        assert np.allclose(scales, _block_scales(x, 100))
        assert np.all(out[::97] == 0.0)  # zero is a level in both modes


def test_zero_block_is_exact() -> None:
    x = np.zeros(300, np.float32)
    x[:10] = 1.0
    out = _roundtrip("q:4:block=100", {"x": x}, seed=1)["x"]
    assert np.all(out[100:] == 0.0)


@pytest.mark.parametrize("spec", ["q:1", "q:2", "q:4", "q:8:block=5", "topk:0.5|q:4", "delta|q:1:block=8|zstd"])
def test_stochastic_quantisation_is_unbiased(spec: str) -> None:
    rng = np.random.default_rng(42)
    x = (rng.standard_normal(40) * 2).astype(np.float32)
    t = {"x": x}
    base = {"x": np.zeros_like(x)} if "delta" in spec else None
    p = parse_codec(spec)
    sp = specs_of(t)
    n_seeds = 1500
    outs = np.stack([p.decode(p.encode(t, base=base, seed=s), specs=sp, base=base)["x"] for s in range(n_seeds)])
    if "topk" in spec:  # unbiased on the kept support (which is seed independent)
        kept = outs[0] != 0
        assert np.all((outs != 0) == kept)
        x = np.where(kept, x, 0)
    mean = outs.mean(axis=0, dtype=np.float64)
    bits = int(spec.split("q:")[1][0])
    step = float(_step(bits, np.max(np.abs(x))))
    sigma = step / 2 / math.sqrt(n_seeds)  # per-element std of x_hat <= step / 2
    assert np.all(np.abs(mean - x) <= 5 * sigma + 1e-6)
    # ...and it really is stochastic: different seeds give different outputs
    assert np.any(outs[0] != outs[1])


def test_same_seed_same_bytes() -> None:
    rng = np.random.default_rng(3)
    t = {"a": rng.standard_normal((30, 30)).astype(np.float32)}
    base = {"a": np.zeros((30, 30), np.float32)}
    p = parse_codec("delta|topk:0.1|q:4|zstd")
    assert p.encode(t, base=base, seed=9) == p.encode(t, base=base, seed=9)
    assert p.encode(t, base=base, seed=9) != p.encode(t, base=base, seed=10)


# -------------------------------------------------------------------------- topk
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.3, 1.0])
@SETTINGS
@given(t=tensor_sets())
def test_topk_per_tensor_keeps_largest_exactly(fraction: float, t: Tensors) -> None:
    out = _roundtrip(f"topk:{fraction}", t)
    for k in t:
        x, y = t[k].reshape(-1), out[k].reshape(-1)
        kept = y != 0
        assert np.all(y[kept] == x[kept])  # kept entries are exact
        assert int(kept.sum()) == topk_count(x.size, fraction)  # random normals are never 0
        if kept.all():
            continue
        # every dropped entry is no larger than the smallest kept one (the stated bound)
        assert np.max(np.abs(x[~kept])) <= np.min(np.abs(x[kept]))


@SETTINGS
@given(t=tensor_sets())
def test_topk_global_keeps_largest_over_all_tensors(t: Tensors) -> None:
    out = _roundtrip("topk:0.05:global|zstd", t)
    x, y = _flat(t), _flat(out)
    kept = y != 0
    assert np.all(y[kept] == x[kept])
    assert int(kept.sum()) == topk_count(x.size, 0.05)
    if not kept.all():
        assert np.max(np.abs(x[~kept])) <= np.min(np.abs(x[kept]))


def test_topk_global_can_favour_one_tensor() -> None:
    t = {"big": np.full(100, 10.0, np.float32), "small": np.full(100, 0.1, np.float32)}
    out = _roundtrip("topk:0.1:global", t)
    assert int(np.count_nonzero(out["big"])) == 20 and not np.any(out["small"])
    out_pt = _roundtrip("topk:0.1", t)
    assert int(np.count_nonzero(out_pt["big"])) == 10 and int(np.count_nonzero(out_pt["small"])) == 10


# ------------------------------------------------------------- composed pipelines
@pytest.mark.parametrize(
    ("spec", "bits"),
    [
        ("delta|topk:0.01|ef|q:8|zstd", 8),
        ("delta|topk:0.05|q:4:block=16|ef|zstd", 4),
        ("delta|topk:0.01:global|ef|sign|zstd", 1),
        ("delta|q:8|zstd", 8),
        ("delta|q:4:block=256|zstd", 4),
        ("delta|sign|zstd", 1),
        ("delta|topk:0.1|ef|raw|zstd", None),
    ],
)
@SETTINGS
@given(t=tensor_sets(), seed=st.integers(0, 2**31))
def test_composed_pipelines_within_composed_bound(spec: str, bits: int | None, t: Tensors, seed: int) -> None:
    """Fresh state: err <= max(largest dropped magnitude, quant step of max|delta|) + rounding."""
    base = _perturbed(t, seed)
    out = _roundtrip(spec, t, base, seed)
    d = _flat(t).astype(np.float64) - _flat(base)
    step = 0.0 if bits is None else float(_step(bits, np.max(np.abs(d)))) * (1 + 2**-10)
    dropped = np.max(np.abs(d)) if "topk" in spec else 0.0
    err = np.abs(_flat(out) - _flat(t).astype(np.float64))
    rounding = 2.0**-22 * (np.abs(_flat(t)) + np.abs(d) + step)
    assert np.all(err <= max(step, dropped) + rounding)
    if "topk" not in spec and bits is not None:
        assert np.all(err <= step + rounding)


def test_block_larger_than_tensor_is_one_block() -> None:
    t = {"s": np.array(3.0, np.float32), "v": np.linspace(-1, 1, 5).astype(np.float32)}
    big = _roundtrip(f"q:8:block={2**24}", t, seed=4)
    small = _roundtrip("q:8", t, seed=4)
    assert all(np.array_equal(big[k], small[k]) for k in t)
    assert parse_codec(f"q:8:block={2**24}").encode(t, seed=4) == parse_codec("q:8").encode(t, seed=4)


@pytest.mark.parametrize(
    "spec",
    ["raw", "raw|zstd", "delta|zstd", "delta|q:8|zstd", "delta|topk:0.5|ef|q:4", "topk:0.5:global|ef|sign", "q:2|ef"],
)
def test_empty_and_scalar_tensors(spec: str) -> None:
    t = {
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.array(-1.25, np.float32),
        "v": np.array([0.5, -2.0, 1.0], np.float32),
    }
    base = {k: np.zeros_like(v) for k, v in t.items()}
    out = _roundtrip(spec, t, base if parse_codec(spec).needs_base else None, seed=2)
    assert out["empty"].shape == (0, 3)
    assert out["scalar"].shape == ()
    if "topk" not in spec:
        assert float(out["scalar"]) == -1.25  # a lone element is its own scale: exact
    p = parse_codec(spec)
    assert p.decode(p.encode({}, base={}, state=ErrorFeedbackState()), specs=[], base={}) == {}

"""Error feedback: bounded accumulated error over many rounds, persistence across restarts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from protocol.codec import CodecError, ErrorFeedbackState, parse_codec, specs_of

N_STEPS = 200
SHAPES = {"conv": (20, 10), "fc": (1500,), "bias": (7,)}


def _updates(seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    # a persistent drift plus noise, like successive local-training deltas
    drift = {k: rng.standard_normal(s).astype(np.float32) * 0.3 for k, s in SHAPES.items()}
    return [
        {k: (drift[k] + rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()} for _ in range(N_STEPS)
    ]


def _run(spec: str, updates: list[dict[str, np.ndarray]], state: ErrorFeedbackState | None) -> list[float]:
    """Return ||sum_true - sum_sent||_2 after each step (checks the EF identity on the way)."""
    p = parse_codec(spec)
    base = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    total_true = {k: np.zeros(s) for k, s in SHAPES.items()}
    total_sent = {k: np.zeros(s) for k, s in SHAPES.items()}
    gaps = []
    for t, x in enumerate(updates):
        out = p.decode(p.encode(x, base=base, state=state, seed=t), specs=specs_of(x), base=base)
        for k in x:
            total_true[k] += x[k]
            total_sent[k] += out[k]
        gap = {k: total_true[k] - total_sent[k] for k in x}
        if state is not None and p.ef == "all":
            # telescoping identity: what is still owed is exactly the residual
            for k in x:
                r = state.residual(k)
                assert r is not None
                assert np.allclose(gap[k], r, atol=1e-3 * (1 + np.abs(r).max()))
        gaps.append(float(np.sqrt(sum(np.sum(g * g) for g in gap.values()))))
    return gaps


@pytest.mark.parametrize(
    "spec",
    [
        "delta|topk:0.01|ef|zstd",
        "delta|topk:0.05:global|ef|raw",
        "delta|topk:0.01|q:8|ef|zstd",
        "delta|topk:0.05|sign|ef|zstd",
        "delta|sign:block=64|ef|zstd",
        "delta|q:2|ef",
        "delta|q:4:block=256|ef|zstd",
    ],
)
def test_error_feedback_keeps_accumulated_error_bounded(spec: str) -> None:
    updates = _updates(1)
    gaps = _run(spec, updates, ErrorFeedbackState())
    early, late = max(gaps[50:100]), max(gaps[100:])
    assert late <= 1.25 * early, (early, late)  # no growth with the number of steps
    # without EF, top-k's dropped share of the persistent drift piles up linearly and
    # (stochastic) quantisation noise random-walks: both end far above the EF gap
    no_ef = _run(spec.replace("|ef", ""), updates, None)
    assert no_ef[-1] > 3 * gaps[-1], (no_ef[-1], gaps[-1])


def test_ef_before_q_compensates_topk_only() -> None:
    """In topk|ef|q:8 the residual is the top-k drop; the unbiased q noise is not fed back."""
    spec = "delta|topk:0.01|ef|q:8|zstd"
    updates = _updates(2)
    state = ErrorFeedbackState()
    p = parse_codec(spec)
    base = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    q_noise_bound = {k: 0.0 for k in SHAPES}
    total_true = {k: np.zeros(s) for k, s in SHAPES.items()}
    total_sent = {k: np.zeros(s) for k, s in SHAPES.items()}
    for t, x in enumerate(updates):
        corrected_max = {k: float(np.max(np.abs(x[k] + (state.residual(k) if k in state else 0)))) for k in x}
        out = p.decode(p.encode(x, base=base, state=state, seed=t), specs=specs_of(x), base=base)
        for k in x:
            total_true[k] += x[k]
            total_sent[k] += out[k]
            q_noise_bound[k] += corrected_max[k] / 127 * (1 + 2**-10)  # q:8 step of this round
    for k in SHAPES:
        r = state.residual(k)
        assert r is not None
        assert np.max(np.abs(total_true[k] - total_sent[k] - r)) <= q_noise_bound[k]
    gaps = _run(spec, updates, ErrorFeedbackState())
    assert max(gaps[100:]) <= 1.25 * max(gaps[50:100])


def test_state_survives_save_and_load(tmp_path: Path) -> None:
    spec = "delta|topk:0.01|ef|q:8|zstd"
    p = parse_codec(spec)
    updates = _updates(3)
    base = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}

    continuous = ErrorFeedbackState()
    ref = [p.encode(x, base=base, state=continuous, seed=t) for t, x in enumerate(updates[:40])]

    path = tmp_path / "agent" / "ef.npz"
    state = ErrorFeedbackState()
    got = [p.encode(x, base=base, state=state, seed=t) for t, x in enumerate(updates[:20])]
    state.save(path)
    assert not [f for f in path.parent.iterdir() if f.name != "ef.npz"]  # no temp files left
    restored = ErrorFeedbackState.load(path)  # "restart"
    assert restored.norms() == pytest.approx(state.norms())
    assert list(restored) == list(SHAPES)
    got += [p.encode(x, base=base, state=restored, seed=t) for t, x in enumerate(updates[20:40], start=20)]
    assert got == ref
    assert restored.total_norm() == pytest.approx(continuous.total_norm())
    assert restored.total_norm() > 0


def test_missing_state_file_is_empty_state(tmp_path: Path) -> None:
    state = ErrorFeedbackState.load(tmp_path / "nope.npz")
    assert len(state) == 0 and state.total_norm() == 0.0 and state.max_abs() == 0.0


def test_corrupt_state_file_is_codec_error(tmp_path: Path) -> None:
    path = tmp_path / "ef.npz"
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(CodecError, match="bad_state"):
        ErrorFeedbackState.load(path)


def test_state_untouched_when_encode_fails() -> None:
    p = parse_codec("topk:0.1|ef")
    state = ErrorFeedbackState()
    p.encode({"a": np.arange(10, dtype=np.float32)}, state=state)
    before = state.residual("a")
    with pytest.raises(CodecError, match="non_finite"):
        p.encode({"a": np.full(10, np.nan, np.float32)}, state=state)
    after = state.residual("a")
    assert before is not None and after is not None and np.array_equal(before, after)


def test_residual_shape_change_is_rejected() -> None:
    p = parse_codec("topk:0.1|ef")
    state = ErrorFeedbackState()
    p.encode({"a": np.ones(10, np.float32)}, state=state)
    with pytest.raises(CodecError, match="shape_mismatch"):
        p.encode({"a": np.ones(11, np.float32)}, state=state)


def test_ef_pipeline_needs_state() -> None:
    with pytest.raises(CodecError, match="missing_state"):
        parse_codec("topk:0.1|ef").encode({"a": np.ones(10, np.float32)})

"""Robust aggregation: pure functions (with hypothesis properties) and the strategies."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from coordinator import robust
from coordinator.aggregate import weighted_average
from coordinator.strategies import STRATEGIES, ClientResult, build_strategy
from coordinator.strategies.robust import Krum, Median, MultiKrum, NormBound, TrimmedMean
from protocol.codec import Tensors

SHAPES = {"conv.w": (3, 2), "fc.b": (4,)}
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)


def _as_tensors(rows: np.ndarray) -> list[Tensors]:
    return [{"conv.w": r[:6].reshape(3, 2).astype(np.float32), "fc.b": r[6:].astype(np.float32)} for r in rows]


updates_matrix = st.integers(1, 9).flatmap(lambda n: arrays(np.float32, (n, 10), elements=finite))


@settings(max_examples=60, deadline=None)
@given(updates_matrix)
def test_median_within_coordinatewise_min_max(rows: np.ndarray) -> None:
    med = robust.flatten([robust.coordinate_median(_as_tensors(rows))])[0]
    assert np.all(med >= rows.min(axis=0) - 1e-3 * (1 + np.abs(rows.min(axis=0))))
    assert np.all(med <= rows.max(axis=0) + 1e-3 * (1 + np.abs(rows.max(axis=0))))


@settings(max_examples=60, deadline=None)
@given(updates_matrix, st.floats(0.0, 0.49))
def test_trimmed_mean_within_coordinatewise_min_max(rows: np.ndarray, beta: float) -> None:
    tm = robust.flatten([robust.trimmed_mean(_as_tensors(rows), beta)])[0]
    lo, hi = rows.min(axis=0).astype(np.float64), rows.max(axis=0).astype(np.float64)
    assert np.all(tm >= lo - 1e-3 * (1 + np.abs(lo)))
    assert np.all(tm <= hi + 1e-3 * (1 + np.abs(hi)))


@settings(max_examples=40, deadline=None)
@given(updates_matrix)
def test_trimmed_mean_with_beta_zero_is_the_mean(rows: np.ndarray) -> None:
    tm = robust.flatten([robust.trimmed_mean(_as_tensors(rows), 0.0)])[0]
    np.testing.assert_allclose(tm, rows.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-2)


@settings(max_examples=40, deadline=None)
@given(st.integers(5, 12), st.integers(0, 2**31 - 1), st.floats(1e3, 1e8))
def test_minority_of_huge_attackers_cannot_move_robust_aggregates(n: int, seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    f = (n - 3) // 2  # largest f with n >= 2f + 3 (Krum's requirement); always f < n/2
    f = max(f, 1)
    honest = rng.normal(1.0, 0.1, size=(n - f, 10))
    attack = rng.choice([-1.0, 1.0], size=(f, 10)) * scale
    rows = np.vstack([honest, attack])
    rng.shuffle(rows)
    ups = _as_tensors(rows)
    honest_mean = honest.mean(axis=0)

    def err(t: Tensors) -> float:
        return float(np.max(np.abs(robust.flatten([t])[0] - honest_mean)))

    fedavg = weighted_average(ups, [1.0] * n)
    assert err(fedavg) > scale / (4 * n)  # plain averaging is wrecked
    # honest values lie in ~[0.5, 1.5]; each robust rule must land inside the honest range
    assert err(robust.coordinate_median(ups)) < 1.0
    assert err(robust.trimmed_mean(ups, beta=f / n + 1e-9)) < 1.0
    krum_agg, chosen = robust.krum(ups, f)
    assert err(krum_agg) < 1.0
    assert np.all(np.abs(rows[chosen]) < 100)  # Krum picked an honest client
    mk, picked = robust.multi_krum(ups, f)
    assert err(mk) < 1.0 and all(np.all(np.abs(rows[i]) < 100) for i in picked)


def test_krum_needs_enough_clients_and_rejects_bad_params() -> None:
    ups = _as_tensors(np.zeros((4, 10)))
    with pytest.raises(ValueError, match="n >= 2f\\+3"):
        robust.krum(ups, 1)
    with pytest.raises(ValueError, match="beta"):
        robust.trimmed_mean(ups, 0.5)
    with pytest.raises(ValueError, match="different tensor sets"):
        robust.coordinate_median([{"a": np.zeros(2)}, {"b": np.zeros(2)}])
    with pytest.raises(ValueError, match="max_norm"):
        robust.norm_bound(ups, 0.0)


def test_norm_bound_scales_only_large_updates() -> None:
    ups = [{"w": np.array([3.0, 4.0], np.float32)}, {"w": np.array([0.3, 0.4], np.float32)}]
    out, norms, clipped = robust.norm_bound(ups, 1.0)
    np.testing.assert_allclose(norms, [5.0, 0.5], rtol=1e-6)
    assert clipped.tolist() == [True, False]
    np.testing.assert_allclose(out[0]["w"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(out[1]["w"], [0.3, 0.4], rtol=1e-6)


def test_anomaly_scores_single_out_the_outlier() -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(0.5, 0.05, size=(6, 10))
    rows[4] *= -10
    scores = robust.anomaly_scores(_as_tensors(rows))
    z = [s.robust_z for s in scores]
    assert int(np.argmax(z)) == 4 and z[4] > 10
    assert all(abs(zi) < 3.5 for i, zi in enumerate(z) if i != 4)
    assert scores[4].cosine_to_median < -0.9 and min(s.cosine_to_median for i, s in enumerate(scores) if i != 4) > 0.9


def _results(base: Tensors, rows: np.ndarray) -> list[ClientResult]:
    out = []
    for i, d in enumerate(_as_tensors(rows)):
        out.append(ClientResult(f"agent-{i}", {k: base[k] + d[k] for k in base}, sample_count=10 + i))
    return out


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multikrum", "normbound"])
def test_strategies_resist_a_scaled_update_and_report_anomalies(name: str) -> None:
    rng = np.random.default_rng(1)
    base = {"conv.w": rng.normal(size=(3, 2)).astype(np.float32), "fc.b": rng.normal(size=4).astype(np.float32)}
    honest = rng.normal(0.2, 0.02, size=(5, 10))
    rows = honest.copy()
    rows[2] = -10 * rows[2]  # one agent sends its update scaled by -10
    results = _results(base, rows)
    strat = build_strategy(name)
    new, report = strat.aggregate(3, base, results)
    got = robust.flatten([new])[0] - robust.flatten([base])[0]
    clean = honest[[0, 1, 3, 4]].mean(axis=0)
    fedavg_new, _ = build_strategy("fedavg").aggregate(3, base, results)
    fedavg_err = np.abs(robust.flatten([fedavg_new])[0] - robust.flatten([base])[0] - clean).max()
    assert fedavg_err > 0.3
    err = np.abs(got - clean).max()
    if name == "normbound":
        # bounding limits, but cannot remove, the attacker's pull: |shift| <= (1 + factor) * |honest| / n
        assert err < (1 + 1.5) * 0.22 / 5 + 0.01 and err < fedavg_err / 4, err
    else:
        assert err < 0.05, (name, err)
    assert set(report.details["anomaly"]) == {r.agent_id for r in results}
    assert report.details["suspects"] == ["agent-2"]
    if name in ("krum", "multikrum"):
        assert "agent-2" in report.details["excluded"]
    if name == "normbound":
        assert report.details["clipped"] == ["agent-2"]


def test_strategy_registry_and_parameters() -> None:
    for name in ("median", "trimmed_mean", "krum", "multikrum", "normbound"):
        assert name in STRATEGIES
    assert isinstance(build_strategy("trimmed_mean", beta=0.1), TrimmedMean)
    assert isinstance(build_strategy("krum", f=2), Krum)
    assert isinstance(build_strategy("median"), Median)
    assert build_strategy("multikrum", f=1, m=2).m == 2  # type: ignore[attr-defined]
    assert isinstance(build_strategy("normbound", max_norm=2.0), NormBound)
    assert isinstance(build_strategy("multikrum"), MultiKrum)
    with pytest.raises(ValueError):
        TrimmedMean(beta=0.6)
    with pytest.raises(ValueError):
        NormBound(max_norm=-1.0)
    # stateless: no state to persist, and state from elsewhere is refused
    assert Median().state_dict() == {}
    with pytest.raises(ValueError):
        Median().load_state_dict({"x": np.zeros(1)})


def test_weighted_trimmed_mean_is_fedavg_at_zero_and_bounded_by_the_honest_values() -> None:
    from coordinator import robust as rb

    rng = np.random.default_rng(4)
    honest = [{"w": rng.normal(size=(6, 5)).astype(np.float32)} for _ in range(4)]
    weights = [300.0, 50.0, 200.0, 450.0]
    np.testing.assert_allclose(rb.weighted_trimmed_mean(honest, weights, 0.0)["w"], rb.mean(honest, weights)["w"],
                               rtol=1e-6, atol=1e-7)
    lo = np.min([u["w"] for u in honest], axis=0)
    hi = np.max([u["w"] for u in honest], axis=0)
    for sign in (-1.0, 1.0):  # an attacker holding 10 % of the weight, far out on either side
        attacker = {"w": (sign * 1e6 * np.ones((6, 5))).astype(np.float32)}
        share = 0.1 * sum(weights) / 0.9
        out = rb.weighted_trimmed_mean([*honest, attacker], [*weights, share], 0.2)["w"]
        assert np.all(out >= lo - 1e-6) and np.all(out <= hi + 1e-6)
        med = rb.weighted_median([*honest, attacker], [*weights, share])["w"]
        assert np.all(med >= lo - 1e-6) and np.all(med <= hi + 1e-6)
    # more than beta of the weight can drag the trimmed mean outside: the bound is real, not free
    big = {"w": np.full((6, 5), 1e6, np.float32)}
    assert np.all(rb.weighted_trimmed_mean([*honest, big], [*weights, sum(weights)], 0.2)["w"] > hi)


def test_weighted_median_matches_the_plain_median_for_equal_weights_and_caps_lied_counts() -> None:
    from coordinator import robust as rb

    rng = np.random.default_rng(5)
    ups = [{"w": rng.normal(size=(7,)).astype(np.float32)} for _ in range(5)]
    np.testing.assert_allclose(rb.weighted_median(ups, [1.0] * 5)["w"], rb.coordinate_median(ups)["w"], rtol=1e-6)
    np.testing.assert_allclose(rb.weighted_median(ups[:4], [2.0] * 4)["w"], rb.coordinate_median(ups[:4])["w"],
                               rtol=1e-6)
    capped = rb.capped_weights([100, 120, 90, 1_000_000], cap=4.0)
    assert capped[-1] == 4.0 * 110.0 and list(capped[:3]) == [100, 120, 90]
    with pytest.raises(ValueError):
        rb.capped_weights([1.0, float("nan")], cap=4.0)


def test_one_vote_strategies_without_a_step_budget_get_a_warning() -> None:
    from coordinator.strategies import ONE_VOTE_STRATEGIES, STRATEGIES, local_work_warning
    from protocol.messages import TrainingConfig

    epochs = TrainingConfig(local_epochs=1)
    budget = TrainingConfig(local_epochs=100, max_steps=60)
    assert set(STRATEGIES) >= ONE_VOTE_STRATEGIES
    for name in ONE_VOTE_STRATEGIES:
        advice = local_work_warning(name, epochs)
        assert advice is not None and "--max-steps" in advice and name in advice
        assert local_work_warning(name, budget) is None
    for name in ("fedavg", "weighted_median", "normbound"):  # weight by data or bound norms: no advice
        assert local_work_warning(name, epochs) is None


# ------------------------------------------------------------------ self-reported sample counts (issue 15 item 3)
COUNT_WEIGHTED = [("fedavg", {}), ("fedprox", {}), ("fedavgm", {"momentum": 0.0}), ("fedadam", {}), ("fedyogi", {}),
                  ("weighted_median", {}), ("weighted_trimmed_mean", {"beta": 0.0}),
                  ("normbound", {"weighted": True, "max_norm": 1e9})]


def _liar_round(liar_count: int) -> tuple[Tensors, list[ClientResult]]:
    base = {"w": np.zeros(3, dtype=np.float32)}
    results = [ClientResult(f"honest-{i}", {"w": np.full(3, 1.0, dtype=np.float32)}, sample_count=100)
               for i in range(4)]
    results.append(ClientResult("liar", {"w": np.full(3, -1000.0, dtype=np.float32)}, sample_count=liar_count))
    return base, results


@pytest.mark.parametrize(("name", "kw"), COUNT_WEIGHTED, ids=[n for n, _ in COUNT_WEIGHTED])
def test_a_claimed_sample_count_buys_at_most_count_cap_median_clients(name: str, kw: dict[str, Any]) -> None:
    base, results = _liar_round(2_147_483_647)
    new, report = build_strategy(name, **kw).aggregate(1, base, results)
    assert report.details["capped"] == ["liar"]
    weights = report.details["weights"]
    assert weights[-1] == 4.0 * 100  # the default cap: 4 × the median count
    assert weights[-1] / sum(weights) == pytest.approx(0.5)
    if name in ("fedavg", "fedprox", "fedavgm", "normbound", "weighted_trimmed_mean"):  # weighted means: exact
        assert new["w"] == pytest.approx(np.full(3, 0.5 * 1.0 + 0.5 * -1000.0))
    if name == "fedavg":  # today's (uncapped) rule hands the liar the model
        uncapped, r2 = build_strategy("fedavg", count_cap=None).aggregate(1, base, results)
        assert r2.details["capped"] == [] and uncapped["w"] == pytest.approx(np.full(3, -1000.0), rel=1e-4)


def test_honest_counts_within_the_cap_keep_their_weights() -> None:
    base, results = _liar_round(350)  # 3.5 medians: not capped
    new, report = build_strategy("fedavg").aggregate(1, base, results)
    assert report.details["capped"] == [] and report.details["weights"] == [100, 100, 100, 100, 350]
    assert new["w"] == pytest.approx(np.full(3, (400 - 350_000) / 750))


@pytest.mark.parametrize("cap", [0.5, 0.0, float("inf"), float("nan")])
def test_an_impossible_count_cap_is_refused(cap: float) -> None:
    with pytest.raises(ValueError, match="count_cap"):
        build_strategy("fedavg", count_cap=cap)

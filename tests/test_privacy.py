"""RDP accountant, privacy budget, and central DP with adaptive clipping (Andrew et al. 2021)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant as OpacusRDP

from coordinator import robust
from coordinator.strategies import ClientResult, build_strategy
from coordinator.strategies.central_dp import CentralDP
from coordinator.strategies.fedavg import FedAvgM
from learning.privacy_accounting import (
    BudgetExhausted,
    PrivacyBudget,
    RdpAccountant,
    combined_noise_multiplier,
    noise_multiplier_for_epsilon,
    update_noise_multiplier_for,
)

DELTA = 1e-5


# -- accountant ---------------------------------------------------------------------------------
def test_accountant_matches_opacus_rdp_and_known_value() -> None:
    acc = RdpAccountant()
    acc.compose(1.1, 0.01, 1000)
    ours = acc.epsilon(DELTA)
    other = OpacusRDP()
    other.history = [(1.1, 0.01, 1000)]
    assert ours == pytest.approx(other.get_epsilon(DELTA), rel=1e-2)
    assert ours >= other.get_epsilon(DELTA) - 1e-9  # fewer orders: an upper bound, never below
    assert ours == pytest.approx(1.7118, rel=1e-2)


def test_accountant_monotone_and_edge_cases() -> None:
    acc = RdpAccountant()
    assert acc.epsilon(DELTA) == 0.0
    eps = []
    for _ in range(5):
        acc.compose(1.0, 0.1, 10)
        eps.append(acc.epsilon(DELTA))
    assert all(b > a for a, b in itertools.pairwise(eps))
    assert acc.steps == 50 and len(acc.events) == 1  # same mechanism merges
    more_noise = RdpAccountant([*RdpAccountant().events])
    more_noise.compose(2.0, 0.1, 50)
    assert more_noise.epsilon(DELTA) < eps[-1]
    assert acc.epsilon_after(DELTA, 1.0, 0.1, 10) > eps[-1] and acc.steps == 50  # what-if records nothing
    noiseless = RdpAccountant()
    noiseless.compose(0.0, 1.0, 1)
    assert noiseless.epsilon(DELTA) == math.inf
    restored = RdpAccountant.from_state_array(acc.state_array())
    assert restored.epsilon(DELTA) == eps[-1]
    with pytest.raises(ValueError):
        acc.compose(1.0, 0.0)
    with pytest.raises(ValueError):
        acc.epsilon(0.0)


def test_budget_refuses_the_round_that_would_pass_it() -> None:
    budget = PrivacyBudget(epsilon=3.0, delta=DELTA)
    rounds = 0
    with pytest.raises(BudgetExhausted) as info:
        while True:
            budget.require(noise_multiplier=1.0, sampling_rate=0.1, what=f"round {rounds}")
            budget.spend(noise_multiplier=1.0, sampling_rate=0.1)
            rounds += 1
            assert rounds < 10_000
    assert rounds > 0
    assert budget.spent <= 3.0  # never passed
    err = info.value
    assert err.would_be > 3.0 >= err.spent
    msg = str(err)
    assert "privacy budget exhausted" in msg and f"round {rounds}" in msg and "δ = 1e-05" in msg
    # spend() checks too, and a persisted budget stays exhausted after a restart
    with pytest.raises(BudgetExhausted):
        budget.spend(noise_multiplier=1.0, sampling_rate=0.1)
    again = PrivacyBudget.from_dict(budget.to_dict())
    assert again.spent == budget.spent
    with pytest.raises(BudgetExhausted):
        again.require(noise_multiplier=1.0, sampling_rate=0.1)
    rep = again.report()
    assert rep["budget_epsilon"] == 3.0 and rep["steps"] == rounds and 0 <= rep["remaining_epsilon"] < 3.0


def test_combined_noise_inverse() -> None:
    for z, sb in [(0.5, 1.0), (1.0, 5.0), (2.0, 1.2)]:
        s = update_noise_multiplier_for(z, sb)
        assert s > z and combined_noise_multiplier(s, sb) == pytest.approx(z)
    with pytest.raises(ValueError, match="2·count_stddev > z"):
        update_noise_multiplier_for(1.0, 0.25)
    with pytest.raises(ValueError, match="count noise"):
        update_noise_multiplier_for(1.0, 0.0)


# -- central DP with adaptive clipping ----------------------------------------------------------------
def _base(d: int = 40) -> dict[str, np.ndarray]:
    return {"w": np.zeros((d // 2,), np.float32), "b": np.zeros((d - d // 2,), np.float32)}


def _results(base: dict[str, np.ndarray], rows: np.ndarray) -> list[ClientResult]:
    out = []
    for i, r in enumerate(rows):
        d = robust.unflatten(r, base)
        out.append(ClientResult(f"c{i}", {k: base[k] + d[k] for k in base}, sample_count=1000 * (i + 1)))
    return out


def _flat(t: dict[str, np.ndarray]) -> np.ndarray:
    return robust.flatten([t])[0]


def test_noiseless_large_clip_is_the_unweighted_mean_and_clipping_bounds_influence() -> None:
    rng = np.random.default_rng(0)
    base = _base()
    rows = rng.normal(size=(8, 40))
    s = CentralDP(0.0, initial_clip=1e6, adaptive=False)
    new, rep = s.aggregate(1, base, _results(base, rows))
    np.testing.assert_allclose(_flat(new), rows.mean(axis=0), atol=1e-5)  # sample counts ignored
    assert rep.details["update_noise_std"] == 0.0
    # one client with a huge update moves the result by at most C/m
    rows[3] *= 1e6
    s = CentralDP(0.0, initial_clip=0.5, adaptive=False)
    new, _ = s.aggregate(1, base, _results(base, rows))
    assert np.linalg.norm(_flat(new)) <= 0.5 + 1e-5  # every clipped delta has norm <= C


def test_noise_has_the_stated_std() -> None:
    base = _base(4000)
    rows = np.zeros((50, 4000))
    s = CentralDP(1.0, initial_clip=2.0, clients_per_round=50, count_stddev=2.5, seed=3)
    new, rep = s.aggregate(1, base, _results(base, rows))
    sigma = update_noise_multiplier_for(1.0, 2.5)
    assert rep.details["update_noise_std"] == pytest.approx(sigma * 2.0 / 50)
    assert float(np.std(_flat(new))) == pytest.approx(sigma * 2.0 / 50, rel=0.05)


@pytest.mark.parametrize("start", [0.01, 100.0])
def test_adaptive_clip_tracks_the_target_quantile(start: float) -> None:
    """Norms ~ uniform(1, 3): the median is 2. From 0.01 or 100, C converges to ~2 (noised count)."""
    rng = np.random.default_rng(1)
    base = _base()
    s = CentralDP(0.5, initial_clip=start, target_quantile=0.5, clip_lr=0.2, clients_per_round=100,
                  count_stddev=5.0, seed=7)
    for r in range(120):
        dirs = rng.normal(size=(100, 40))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        rows = dirs * rng.uniform(1.0, 3.0, size=(100, 1))
        _, rep = s.aggregate(r, base, _results(base, rows))
    assert 1.6 < s.clip_norm < 2.4, s.clip_norm
    assert rep.details["next_clip_norm"] == s.clip_norm
    assert 0.3 < rep.details["noised_unclipped_fraction"] < 0.7


def test_seeded_restart_continues_exactly_and_inner_state_persists() -> None:
    rng = np.random.default_rng(2)
    base = _base()
    rounds = [_results(base, rng.normal(size=(6, 40))) for _ in range(5)]

    def make() -> CentralDP:
        return CentralDP(1.0, initial_clip=0.3, clients_per_round=6, count_stddev=1.0, seed=11,
                         inner=FedAvgM(server_lr=1.0, momentum=0.9),
                         budget=PrivacyBudget(50.0, DELTA))

    a = make()
    w = base
    for r in range(5):
        w, _ = a.aggregate(r, w, rounds[r])
    b = make()
    w2 = base
    for r in range(3):
        w2, _ = b.aggregate(r, w2, rounds[r])
    state = b.state_dict()
    assert {"clip_norm", "privacy/events"} <= set(state) and any(k.startswith("inner/velocity/") for k in state)
    c = make()  # "restarted coordinator"
    c.load_state_dict(state)
    for r in range(3, 5):
        w2, _ = c.aggregate(r, w2, rounds[r])
    for k in base:
        np.testing.assert_array_equal(w[k], w2[k])
    assert c.clip_norm == a.clip_norm and c.budget is not None and a.budget is not None
    assert c.budget.spent == a.budget.spent
    # a different seed gives different noise
    d = CentralDP(1.0, initial_clip=0.3, clients_per_round=6, count_stddev=1.0, seed=12)
    other, _ = d.aggregate(0, base, rounds[0])
    e = CentralDP(1.0, initial_clip=0.3, clients_per_round=6, count_stddev=1.0, seed=11)
    same, _ = e.aggregate(0, base, rounds[0])
    assert not np.allclose(_flat(other), _flat(same))


def test_budget_stops_rounds_before_they_start() -> None:
    base = _base()
    rows = np.random.default_rng(3).normal(size=(10, 40))
    s = build_strategy("central_dp", noise_multiplier=1.0, clients_per_round=10, population=100,
                       count_stddev=1.0, budget_epsilon=4.0, delta=DELTA, seed=0)
    assert isinstance(s, CentralDP) and s.sampling_rate == 0.1
    done = 0
    with pytest.raises(BudgetExhausted, match="round"):
        for r in range(1000):
            s.configure_round(r)
            _, rep = s.aggregate(r, base, _results(base, rows))
            done += 1
    assert done > 1 and rep.details["privacy"]["epsilon"] <= 4.0
    with pytest.raises(BudgetExhausted):  # aggregate refuses too, before releasing anything
        s.aggregate(done, base, _results(base, rows))


def test_parameter_validation() -> None:
    with pytest.raises(ValueError, match="2·count_stddev > z"):
        CentralDP(1.0, clients_per_round=5)  # default σ_b = 5/20 is too small for z = 1
    with pytest.raises(ValueError):
        CentralDP(1.0, target_quantile=1.0)
    with pytest.raises(ValueError):
        CentralDP(1.0, population=10)
    with pytest.raises(ValueError, match="no budget"):
        CentralDP(0.0).load_state_dict({"privacy/events": np.zeros((1, 3))})


def test_noise_multiplier_for_epsilon_is_the_smallest_within_budget() -> None:
    z = noise_multiplier_for_epsilon(4.0, 1e-5, 0.5, 20)
    acc = RdpAccountant()
    assert acc.epsilon_after(1e-5, z, 0.5, 20) <= 4.0 < acc.epsilon_after(1e-5, z * 0.99, 0.5, 20)
    budget = PrivacyBudget(4.0, 1e-5)
    for _ in range(20):
        budget.spend(noise_multiplier=z, sampling_rate=0.5)
    with pytest.raises(BudgetExhausted):
        budget.spend(noise_multiplier=z, sampling_rate=0.5)

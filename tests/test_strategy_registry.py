"""The strategy registry: every name builds, and central DP takes its inner strategy by name."""

from __future__ import annotations

from coordinator.strategies import STRATEGIES, build_strategy
from coordinator.strategies.central_dp import CentralDP
from coordinator.strategies.fedavg import FedAvgM


def test_central_dp_builds_its_inner_strategy_from_a_name() -> None:
    s = build_strategy("central_dp", noise_multiplier=0.5, inner="fedavgm", inner_kwargs={"momentum": 0.5})
    assert isinstance(s, CentralDP) and isinstance(s.inner, FedAvgM) and s.inner.momentum == 0.5


def test_every_registered_name_builds() -> None:
    for name in STRATEGIES:
        assert build_strategy(name).name  # defaults are valid for every strategy

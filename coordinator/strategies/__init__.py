"""Aggregation strategies, by name. ``build_strategy("fedavg")`` is what the CLI and config use."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from coordinator.strategies.base import AggregateReport, ClientResult, Strategy
from coordinator.strategies.central_dp import build_central_dp
from coordinator.strategies.fedavg import FedAdam, FedAvg, FedAvgM, FedProx
from coordinator.strategies.robust import Krum, Median, MultiKrum, NormBound, TrimmedMean

STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": lambda **kw: FedAdam(yogi=True, **kw),
    "median": Median,
    "trimmed_mean": TrimmedMean,
    "weighted_median": lambda **kw: Median(weighted=True, **kw),
    "weighted_trimmed_mean": lambda **kw: TrimmedMean(weighted=True, **kw),
    "krum": Krum,
    "multikrum": MultiKrum,
    "normbound": NormBound,
    "central_dp": build_central_dp,
}


def build_strategy(name: str, **kwargs: Any) -> Strategy:
    try:
        return STRATEGIES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}") from None


__all__ = ["STRATEGIES", "AggregateReport", "ClientResult", "Strategy", "build_strategy"]

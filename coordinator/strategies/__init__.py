"""Aggregation strategies, by name. ``build_strategy("fedavg")`` is what the CLI and config use."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from coordinator.strategies.base import AggregateReport, ClientResult, Strategy
from coordinator.strategies.central_dp import build_central_dp
from coordinator.strategies.fedavg import FedAdam, FedAvg, FedAvgM, FedProx
from coordinator.strategies.robust import Krum, Median, MultiKrum, NormBound, TrimmedMean
from protocol.messages import TrainingConfig

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


ONE_VOTE_STRATEGIES = frozenset({"median", "trimmed_mean", "krum", "multikrum"})
"""Robust rules that give every update one vote and compare raw deltas (``coordinator.robust``)."""


def local_work_warning(strategy: str, training: TrainingConfig) -> str | None:
    """Why a one-vote robust strategy without a per-round step budget will under-train, or None.

    With local *epochs*, a site with 30× the images takes 30× the steps and sends a ~30× larger
    delta, and a median or Krum follows the small movers (``bench/robustness.py``: 10–15 points
    below FedAvg with no attacker; with the same step budget everywhere they match it)."""
    if strategy not in ONE_VOTE_STRATEGIES or training.max_steps is not None:
        return None
    return (f"strategy {strategy} compares raw updates, but local work is {training.local_epochs} epoch(s), so "
            "sites of different sizes send updates of very different sizes and the large sites are out-voted; "
            "give every site the same step budget, e.g. --max-steps 60 --local-epochs 100")


def build_strategy(name: str, **kwargs: Any) -> Strategy:
    try:
        return STRATEGIES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}") from None


__all__ = ["ONE_VOTE_STRATEGIES", "STRATEGIES", "AggregateReport", "ClientResult", "Strategy", "build_strategy",
           "local_work_warning"]

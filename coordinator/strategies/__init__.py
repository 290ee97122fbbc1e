"""Aggregation strategies, by name. ``build_strategy("fedavg")`` is what the CLI and config use."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from coordinator.strategies.base import AggregateReport, ClientResult, Strategy
from coordinator.strategies.central_dp import build_central_dp
from coordinator.strategies.fedavg import FedAdam, FedAvg, FedAvgM, FedProx
from coordinator.strategies.robust import Krum, Median, MultiKrum, NormBound, TrimmedMean
from protocol.messages import TrainingConfig


def _central_dp(*, inner: str | Strategy | None = None, inner_kwargs: Mapping[str, Any] | None = None,
                **kwargs: Any) -> Strategy:
    """``central_dp`` whose ``inner`` strategy may be named (e.g. ``"fedavgm"``, with ``inner_kwargs``)."""
    if isinstance(inner, str):
        inner = build_strategy(inner, **dict(inner_kwargs or {}))
    return build_central_dp(inner=inner, **kwargs)


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
    "central_dp": _central_dp,
}


ONE_VOTE_STRATEGIES = frozenset({"median", "trimmed_mean", "krum", "multikrum"})
"""Robust rules that give every update one vote and compare raw deltas (``coordinator.robust``)."""


def local_work_warning(strategy: str, training: TrainingConfig) -> str | None:
    """Why a one-vote robust strategy without a per-round step budget will under-train, or None.

    With local *epochs*, a site with 30× the images takes 30× the steps and sends a ~30× larger
    delta, and a median or Krum follows the small movers (``bench/robustness.py``: 10–15 points
    below FedAvg with no attacker; with the same step budget everywhere they match it).
    """
    if strategy not in ONE_VOTE_STRATEGIES or training.max_steps is not None:
        return None
    return (f"strategy {strategy} compares raw updates, but local work is {training.local_epochs} epoch(s), so "
            "sites of different sizes send updates of very different sizes and the large sites are out-voted; "
            "give every site the same step budget, e.g. --max-steps 60 --local-epochs 100")


COUNT_WEIGHTED = frozenset({"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "weighted_median",
                            "weighted_trimmed_mean", "normbound"})
"""Strategies that weight clients by their (capped) sample counts (``coordinator.strategies.weights``)."""


def strategy_options(name: str, *, max_weight_ratio: float | None) -> dict[str, Any]:
    """Keyword arguments for :func:`build_strategy` from the command line's ``--max-weight-ratio``.

    The ratio caps each client's self-reported sample count at that many median counts, for the
    strategies that weight by counts; ``None`` turns the cap off. One-vote strategies take nothing.
    """
    return {"count_cap": max_weight_ratio} if name in COUNT_WEIGHTED else {}


def check_round_size(strategy: Strategy, min_clients: int) -> None:
    """ValueError when rounds of ``min_clients`` updates are too small for ``strategy`` to aggregate."""
    if min_clients < strategy.min_results:
        raise ValueError(f"strategy {strategy.name} needs at least {strategy.min_results} updates per round, but a "
                         f"round closes with min_clients={min_clients}; raise --min-clients or choose another strategy")


def build_strategy(name: str, **kwargs: Any) -> Strategy:
    """The strategy registered as ``name``, built with ``kwargs``; ValueError for an unknown name."""
    try:
        return STRATEGIES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}") from None


__all__ = ["COUNT_WEIGHTED", "ONE_VOTE_STRATEGIES", "STRATEGIES", "AggregateReport", "ClientResult", "Strategy",
           "build_strategy", "check_round_size", "local_work_warning", "strategy_options"]

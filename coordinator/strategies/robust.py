"""Byzantine-robust strategies over ``coordinator.robust``: median, trimmed mean, Krum, norm bound.

All of them work on deltas (client weights minus ``base``), give every client one vote
(sample counts are self-reported, see ``coordinator.robust``), and put per-agent anomaly
scores into the ``AggregateReport`` under ``details["anomaly"][agent_id]`` so the round
manager can log them. ``details["suspects"]`` lists agents whose robust z-score exceeds
``suspect_z`` (default 3.5), and the ``details["excluded"]``/``["clipped"]`` entries say what
the aggregator threw away or scaled.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from coordinator import robust
from coordinator.aggregate import apply_delta, deltas
from coordinator.strategies.base import AggregateReport, ClientResult, Strategy
from coordinator.strategies.weights import DEFAULT_COUNT_CAP, check_count_cap, sample_weights
from protocol.codec import Tensors


class _RobustStrategy(Strategy):
    """Shared plumbing: compute deltas, score anomalies, apply the robust delta to ``base``."""

    def __init__(self, server_lr: float = 1.0, suspect_z: float = 3.5) -> None:
        if server_lr <= 0:
            raise ValueError("server_lr must be > 0")
        self.server_lr, self.suspect_z = server_lr, suspect_z

    def _combine(self, ds: list[Tensors], results: list[ClientResult]) -> tuple[Tensors, dict[str, Any]]:
        raise NotImplementedError

    def aggregate(self, round_id: int, base: Tensors, results: list[ClientResult]) -> tuple[Tensors, AggregateReport]:
        if not results:
            raise ValueError("nothing to aggregate")
        ds = deltas([r.tensors for r in results], base)
        scores = robust.anomaly_scores(ds)
        delta, extra = self._combine(ds, results)
        ids = [r.agent_id for r in results]
        details: dict[str, Any] = {
            "strategy": self.name,
            "clients": ids,
            "anomaly": {a: s.as_dict() for a, s in zip(ids, scores, strict=True)},
            "suspects": [a for a, s in zip(ids, scores, strict=True) if s.robust_z > self.suspect_z],
            **extra,
        }
        return apply_delta(base, delta, self.server_lr), AggregateReport(details)


class Median(_RobustStrategy):
    """Coordinate-wise median.

    ``weighted=True``: weighted by sample counts capped at ``count_cap`` times the round's median.
    """

    name = "median"

    def __init__(self, weighted: bool = False, count_cap: float | None = DEFAULT_COUNT_CAP, **kw: Any) -> None:
        super().__init__(**kw)
        self.weighted, self.count_cap = weighted, check_count_cap(count_cap)

    def _combine(self, ds: list[Tensors], results: list[ClientResult]) -> tuple[Tensors, dict[str, Any]]:
        if not self.weighted:
            return robust.coordinate_median(ds), {}
        w, capped = sample_weights(results, self.count_cap)
        return robust.weighted_median(ds, w), {"weights": w, "capped": capped}


class TrimmedMean(_RobustStrategy):
    """Coordinate-wise trimmed mean.

    ``weighted=True`` trims ``beta`` of the weight mass per side, weights being sample counts
    capped at ``count_cap`` times the round's median count.
    """

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.2, weighted: bool = False, count_cap: float | None = DEFAULT_COUNT_CAP,
                 **kw: Any) -> None:
        super().__init__(**kw)
        if not 0.0 <= beta < 0.5:
            raise ValueError("trimmed mean beta must be in [0, 0.5)")
        self.beta, self.weighted, self.count_cap = beta, weighted, check_count_cap(count_cap)

    def _combine(self, ds: list[Tensors], results: list[ClientResult]) -> tuple[Tensors, dict[str, Any]]:
        if self.weighted:
            w, capped = sample_weights(results, self.count_cap)
            return robust.weighted_trimmed_mean(ds, w, self.beta), {"weights": w, "capped": capped,
                                                                    "trimmed_weight_per_side": self.beta}
        k = int(np.floor(self.beta * len(ds)))
        return robust.trimmed_mean(ds, self.beta), {"trimmed_per_side": k}


class MultiKrum(_RobustStrategy):
    """Multi-Krum; ``m=None`` averages the ``n - f`` best-scored updates."""

    name = "multikrum"

    def __init__(self, f: int = 1, m: int | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        if f < 0:
            raise ValueError("f must be >= 0")
        self.f, self.m = f, m

    @property
    def min_results(self) -> int:
        """Krum scores need ``2f + 3`` updates, and ``m`` of them are averaged."""
        return max(2 * self.f + 3, self.m or 1)

    def _combine(self, ds: list[Tensors], results: list[ClientResult]) -> tuple[Tensors, dict[str, Any]]:
        agg, chosen = robust.multi_krum(ds, self.f, self.m)
        picked = {results[i].agent_id for i in chosen}
        return agg, {
            "selected": [results[i].agent_id for i in chosen],
            "excluded": [r.agent_id for r in results if r.agent_id not in picked],
        }


class Krum(MultiKrum):
    """Krum: the single update closest to its neighbours."""

    name = "krum"

    def __init__(self, f: int = 1, **kw: Any) -> None:
        super().__init__(f=f, m=1, **kw)


class NormBound(_RobustStrategy):
    """Clip each delta to ``max_norm`` then average.

    ``max_norm=None`` uses ``factor`` times the median delta norm of the round, which adapts to
    the model and learning rate without tuning and cannot be moved by fewer than half the
    clients. ``weighted=True`` weights by (self-reported) sample count like FedAvg, capped at
    ``count_cap`` times the round's median count.
    """

    name = "normbound"

    def __init__(self, max_norm: float | None = None, factor: float = 1.5, weighted: bool = False,
                 count_cap: float | None = DEFAULT_COUNT_CAP, **kw: Any) -> None:
        super().__init__(**kw)
        if max_norm is not None and max_norm <= 0:
            raise ValueError("max_norm must be > 0")
        if factor <= 0:
            raise ValueError("factor must be > 0")
        self.max_norm, self.factor, self.weighted = max_norm, factor, weighted
        self.count_cap = check_count_cap(count_cap)

    def _combine(self, ds: list[Tensors], results: list[ClientResult]) -> tuple[Tensors, dict[str, Any]]:
        if self.max_norm is not None:
            bound = self.max_norm
        else:
            med = float(np.median(robust.l2_norms(ds)))
            bound = self.factor * med if med > 0 else 1e-12
        bounded, _norms, clipped = robust.norm_bound(ds, bound)
        weights, capped = sample_weights(results, self.count_cap) if self.weighted else (None, [])
        return robust.mean(bounded, weights), {
            "norm_bound": bound,
            "clipped": [r.agent_id for r, c in zip(results, clipped, strict=True) if c],
            **({"weights": weights, "capped": capped} if self.weighted else {}),
        }

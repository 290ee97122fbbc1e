"""Model selection on a validation split: the model to serve is the best validated so far, not the latest.

A federated model swings from round to round (label-skewed sites pull it back and forth), so the
fleet serves the round whose validation score is best by a configurable metric: AUC by default
(threshold-free, insensitive to the class mix), macro one-vs-rest AUC for more than two classes.
Metrics whose name ends in ``loss`` are better when lower. A missing or non-finite score never
wins, and a tie keeps the earlier model (no churn for nothing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_METRIC = "auc"


def lower_is_better(metric: str) -> bool:
    """Tell whether a smaller value of ``metric`` is better (losses, errors)."""
    return metric.endswith("loss") or metric.endswith("error")


@dataclass
class BestSoFar:
    """Running best of ``metric`` over offered ``(key, metrics)`` pairs (a round, a model version)."""

    metric: str = DEFAULT_METRIC
    best_key: Any = None
    best_value: float = math.nan
    best_metrics: dict[str, float] = field(default_factory=dict)
    offered: int = 0

    def score(self, metrics: Mapping[str, Any]) -> float | None:
        """Return the metric's value in ``metrics`` when it is a finite number, else None."""
        v = metrics.get(self.metric)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return None
        return float(v)

    def offer(self, key: Any, metrics: Mapping[str, Any]) -> bool:
        """Consider one candidate; return True when it becomes the best so far."""
        self.offered += 1
        v = self.score(metrics)
        if v is None:
            return False
        if self.best_key is not None:
            better = v < self.best_value if lower_is_better(self.metric) else v > self.best_value
            if not better:
                return False
        self.best_key, self.best_value = key, v
        self.best_metrics = {k: float(x) for k, x in metrics.items() if isinstance(x, int | float)}
        return True

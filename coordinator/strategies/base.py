"""The ``Strategy`` contract: configure a round, then aggregate its results.

A strategy is a small class; the math lives in pure functions (``coordinator.aggregate``).
Strategies with server state (momentum, Adam moments, adaptive clip norms) expose it through
``state_dict``/``load_state_dict`` so the round manager can persist it with each model version
and a restarted coordinator continues exactly where it stopped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.aggregate import Tensors


@dataclass(frozen=True)
class ClientResult:
    """One accepted update: full client weights after local training."""

    agent_id: str
    tensors: Tensors
    sample_count: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    staleness: int = 0


@dataclass(frozen=True)
class AggregateReport:
    """What aggregation did, for logs and the round record (e.g. anomaly scores, clipped agents)."""

    details: dict[str, Any] = field(default_factory=dict)


class Strategy(ABC):
    name: str = "strategy"

    def configure_round(self, round_id: int) -> dict[str, Any]:
        """Training-config overrides sent to agents with the task (e.g. FedProx's ``prox_mu``)."""
        return {}

    @abstractmethod
    def aggregate(self, round_id: int, base: Tensors, results: list[ClientResult]) -> tuple[Tensors, AggregateReport]:
        """Return the next global weights from ``base`` and this round's results."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"{self.name} has no state but was given {len(state)} arrays")

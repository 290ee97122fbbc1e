"""The ``Strategy`` contract: configure a round, then aggregate its results.

A strategy is a small class; the math lives in pure functions (``coordinator.aggregate``).
Strategies with server state (momentum, Adam moments, adaptive clip norms) expose it through
``state_dict``/``load_state_dict`` so the round manager can persist it with each model version
and a restarted coordinator continues exactly where it stopped.

The round manager calls :meth:`Strategy.aggregate_stream`: the clients' sample counts up front and
their tensors one at a time, so a strategy whose math is a weighted sum (the FedAvg family) holds
one model-sized accumulator however many agents report (``streams = True``). The default loads
every update and calls :meth:`Strategy.aggregate`: rules that compare all updates at once (median,
trimmed mean, Krum, central DP's clipping report) need them together, and their memory grows with
the round's size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from protocol.codec import Tensors


@dataclass(frozen=True)
class ClientResult:
    """One accepted update: full client weights after local training."""

    agent_id: str
    tensors: Tensors
    sample_count: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    staleness: int = 0


class ClientMeta(Protocol):
    """What is known of an accepted update without its tensors (a :class:`ClientResult` is one)."""

    @property
    def agent_id(self) -> str:
        """The agent that sent it."""

    @property
    def sample_count(self) -> int:
        """Its self-reported sample count."""

    @property
    def metrics(self) -> Mapping[str, float]:
        """The training metrics it reported."""

    @property
    def staleness(self) -> int:
        """How many rounds old its base was (async)."""


@dataclass(frozen=True)
class ClientInfo:
    """An accepted update's metadata, its tensors left in the blob store until aggregation reads them."""

    agent_id: str
    sample_count: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    staleness: int = 0


#: ``load(i)``: the tensors of the ``i``-th client, read (decoded) when the strategy gets to it.
TensorLoader = Callable[[int], Tensors]


@dataclass(frozen=True)
class AggregateReport:
    """What aggregation did, for logs and the round record (e.g. anomaly scores, clipped agents)."""

    details: dict[str, Any] = field(default_factory=dict)


class Strategy(ABC):
    """Aggregation strategy: configure a round, then aggregate its results."""

    name: str = "strategy"
    #: whether :meth:`aggregate_stream` holds one update at a time (memory independent of the round's size)
    streams: ClassVar[bool] = False

    @property
    def min_results(self) -> int:
        """The fewest results :meth:`aggregate` can combine (Krum needs ``2f + 3``)."""
        return 1

    def configure_round(self, round_id: int) -> dict[str, Any]:
        """Training-config overrides sent to agents with the task (e.g. FedProx's ``prox_mu``)."""
        return {}

    @abstractmethod
    def aggregate(self, round_id: int, base: Tensors, results: list[ClientResult]) -> tuple[Tensors, AggregateReport]:
        """Return the next global weights from ``base`` and this round's results."""

    def aggregate_stream(self, round_id: int, base: Tensors, clients: Sequence[ClientMeta],
                         load: TensorLoader) -> tuple[Tensors, AggregateReport]:
        """Like :meth:`aggregate`, with each client's tensors read by ``load(i)`` when needed.

        This default reads them all (memory grows with the number of clients); streaming
        strategies override it and read each once, in order.
        """
        results = [ClientResult(c.agent_id, load(i), c.sample_count, dict(c.metrics), c.staleness)
                   for i, c in enumerate(clients)]
        return self.aggregate(round_id, base, results)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Server state to persist with each model version (empty: none)."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        if state:
            raise ValueError(f"{self.name} has no state but was given {len(state)} arrays")


class WrappingStrategy(Strategy):
    """A job's aggregation step around an inner rule: round size and round config are the inner rule's."""

    def __init__(self, inner: Strategy) -> None:
        """Wrap ``inner``."""
        self.inner = inner

    @property
    def min_results(self) -> int:
        """As the inner rule."""
        return self.inner.min_results

    def configure_round(self, round_id: int) -> dict[str, Any]:
        """As the inner rule."""
        return self.inner.configure_round(round_id)

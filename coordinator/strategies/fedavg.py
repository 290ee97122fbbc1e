"""FedAvg, FedProx and server-optimizer strategies (FedAvgM, FedAdam, FedYogi).

All of them weight clients by their sample counts, capped at ``count_cap`` times the round's
median count (:mod:`coordinator.strategies.weights`); the round record lists the clients whose
count was capped under ``details["capped"]``. They stream (:meth:`Strategy.aggregate_stream`): the
weights come from the sample counts alone, and the weighted mean is accumulated one client at a
time (:class:`coordinator.aggregate.WeightedMean`), bit-identical to averaging a list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from coordinator.aggregate import adam_step, delta_of, momentum_step, weighted_average_stream
from coordinator.strategies.base import AggregateReport, ClientMeta, ClientResult, Strategy, TensorLoader
from coordinator.strategies.weights import DEFAULT_COUNT_CAP, check_count_cap, sample_weights
from protocol.codec import Tensors


class _CountWeighted(Strategy):
    """Shared by the strategies below: capped sample-count weights and the report of them."""

    def __init__(self, count_cap: float | None = DEFAULT_COUNT_CAP) -> None:
        self.count_cap = check_count_cap(count_cap)

    streams = True

    def _weights(self, results: Sequence[ClientMeta]) -> tuple[list[float], dict[str, Any]]:
        weights, capped = sample_weights(results, self.count_cap)
        return weights, {"clients": [r.agent_id for r in results], "weights": weights, "capped": capped}

    def aggregate(self, round_id: int, base: Tensors, results: list[ClientResult]) -> tuple[Tensors, AggregateReport]:
        """The next global weights from a list of results (streamed through :meth:`aggregate_stream`)."""
        return self.aggregate_stream(round_id, base, results, lambda i: results[i].tensors)

    def _mean_delta(self, base: Tensors, clients: Sequence[ClientMeta], load: TensorLoader
                    ) -> tuple[Tensors, AggregateReport]:
        """The weighted mean of the client deltas, one client in memory at a time."""
        weights, details = self._weights(clients)
        avg = weighted_average_stream((delta_of(load(i), base) for i in range(len(clients))), weights)
        return avg, AggregateReport(details)


class FedAvg(_CountWeighted):
    """McMahan et al. 2017: sample-weighted average of client weights."""

    name = "fedavg"

    def aggregate_stream(self, round_id: int, base: Tensors, clients: Sequence[ClientMeta], load: TensorLoader
                         ) -> tuple[Tensors, AggregateReport]:
        """The sample-weighted mean of the client weights."""
        weights, details = self._weights(clients)
        return weighted_average_stream((load(i) for i in range(len(clients))), weights), AggregateReport(details)


class FedProx(FedAvg):
    """Li et al. 2020: FedAvg aggregation; agents add (mu/2)||w - w_global||^2 to their loss."""

    name = "fedprox"

    def __init__(self, mu: float = 0.1, count_cap: float | None = DEFAULT_COUNT_CAP) -> None:
        super().__init__(count_cap)
        if mu < 0:
            raise ValueError("FedProx mu must be >= 0")
        self.mu = mu

    def configure_round(self, round_id: int) -> dict[str, Any]:
        """Agents add the proximal term with ``prox_mu``."""
        return {"prox_mu": self.mu}


class FedAvgM(_CountWeighted):
    """FedAvg with server momentum (Hsu et al. 2019)."""

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9,
                 count_cap: float | None = DEFAULT_COUNT_CAP) -> None:
        super().__init__(count_cap)
        self.server_lr, self.momentum = server_lr, momentum
        self.velocity: Tensors | None = None

    def aggregate_stream(self, round_id: int, base: Tensors, clients: Sequence[ClientMeta], load: TensorLoader
                         ) -> tuple[Tensors, AggregateReport]:
        """Weighted mean delta, applied with server momentum."""
        avg, report = self._mean_delta(base, clients, load)
        new, self.velocity = momentum_step(base, avg, self.velocity, server_lr=self.server_lr, momentum=self.momentum)
        return new, report

    def state_dict(self) -> dict[str, np.ndarray]:
        """The server velocity."""
        return {f"velocity/{k}": v for k, v in (self.velocity or {}).items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the server velocity."""
        vel = {k.split("/", 1)[1]: np.asarray(v) for k, v in state.items() if k.startswith("velocity/")}
        self.velocity = vel or None


class FedAdam(_CountWeighted):
    """FedAdam (or FedYogi with ``yogi=True``), Reddi et al. 2021."""

    name = "fedadam"

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 yogi: bool = False, count_cap: float | None = DEFAULT_COUNT_CAP) -> None:
        super().__init__(count_cap)
        self.server_lr, self.beta1, self.beta2, self.tau, self.yogi = server_lr, beta1, beta2, tau, yogi
        self.m: Tensors | None = None
        self.v: Tensors | None = None
        if yogi:
            self.name = "fedyogi"

    def aggregate_stream(self, round_id: int, base: Tensors, clients: Sequence[ClientMeta], load: TensorLoader
                         ) -> tuple[Tensors, AggregateReport]:
        """Weighted mean delta as pseudo-gradient, applied with Adam (or Yogi) moments."""
        avg, report = self._mean_delta(base, clients, load)
        new, self.m, self.v = adam_step(base, avg, self.m, self.v, server_lr=self.server_lr, beta1=self.beta1,
                                        beta2=self.beta2, tau=self.tau, yogi=self.yogi)
        return new, report

    def state_dict(self) -> dict[str, np.ndarray]:
        """The first and second moments."""
        out = {f"m/{k}": v for k, v in (self.m or {}).items()}
        out.update({f"v/{k}": v for k, v in (self.v or {}).items()})
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the first and second moments."""
        m = {k[2:]: np.asarray(v) for k, v in state.items() if k.startswith("m/")}
        v = {k[2:]: np.asarray(v) for k, v in state.items() if k.startswith("v/")}
        self.m, self.v = (m or None), (v or None)

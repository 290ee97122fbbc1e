"""FedAvg, FedProx and server-optimizer strategies (FedAvgM, FedAdam, FedYogi)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from coordinator.aggregate import Tensors, adam_step, deltas, momentum_step, weighted_average
from coordinator.strategies.base import AggregateReport, ClientResult, Strategy


def _sample_weights(results: list[ClientResult]) -> list[float]:
    return [float(r.sample_count) for r in results]


class FedAvg(Strategy):
    """McMahan et al. 2017: sample-weighted average of client weights."""

    name = "fedavg"

    def aggregate(self, round_id: int, base: Tensors, results: list[ClientResult]) -> tuple[Tensors, AggregateReport]:
        new = weighted_average([r.tensors for r in results], _sample_weights(results))
        return new, AggregateReport({"clients": [r.agent_id for r in results]})


class FedProx(FedAvg):
    """Li et al. 2020: FedAvg aggregation; agents add (mu/2)||w - w_global||^2 to their loss."""

    name = "fedprox"

    def __init__(self, mu: float = 0.1) -> None:
        if mu < 0:
            raise ValueError("FedProx mu must be >= 0")
        self.mu = mu

    def configure_round(self, round_id: int) -> dict[str, Any]:
        return {"prox_mu": self.mu}


class FedAvgM(Strategy):
    """FedAvg with server momentum (Hsu et al. 2019)."""

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        self.server_lr, self.momentum = server_lr, momentum
        self.velocity: Tensors | None = None

    def aggregate(self, round_id: int, base: Tensors, results: list[ClientResult]) -> tuple[Tensors, AggregateReport]:
        avg = weighted_average(deltas([r.tensors for r in results], base), _sample_weights(results))
        new, self.velocity = momentum_step(base, avg, self.velocity, server_lr=self.server_lr, momentum=self.momentum)
        return new, AggregateReport({"clients": [r.agent_id for r in results]})

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"velocity/{k}": v for k, v in (self.velocity or {}).items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        vel = {k.split("/", 1)[1]: np.asarray(v) for k, v in state.items() if k.startswith("velocity/")}
        self.velocity = vel or None


class FedAdam(Strategy):
    """FedAdam (or FedYogi with ``yogi=True``), Reddi et al. 2021."""

    name = "fedadam"

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 yogi: bool = False) -> None:
        self.server_lr, self.beta1, self.beta2, self.tau, self.yogi = server_lr, beta1, beta2, tau, yogi
        self.m: Tensors | None = None
        self.v: Tensors | None = None
        if yogi:
            self.name = "fedyogi"

    def aggregate(self, round_id: int, base: Tensors, results: list[ClientResult]) -> tuple[Tensors, AggregateReport]:
        avg = weighted_average(deltas([r.tensors for r in results], base), _sample_weights(results))
        new, self.m, self.v = adam_step(base, avg, self.m, self.v, server_lr=self.server_lr, beta1=self.beta1,
                                        beta2=self.beta2, tau=self.tau, yogi=self.yogi)
        return new, AggregateReport({"clients": [r.agent_id for r in results]})

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {f"m/{k}": v for k, v in (self.m or {}).items()}
        out.update({f"v/{k}": v for k, v in (self.v or {}).items()})
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        m = {k[2:]: np.asarray(v) for k, v in state.items() if k.startswith("m/")}
        v = {k[2:]: np.asarray(v) for k, v in state.items() if k.startswith("v/")}
        self.m, self.v = (m or None), (v or None)

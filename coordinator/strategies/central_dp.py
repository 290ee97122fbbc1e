"""Central (user-level) DP with adaptive clipping.

Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning with Adaptive
Clipping" (NeurIPS), Algorithm 1.

Per round, with clip norm ``C`` and ``m`` clients (``clients_per_round`` if set, else the number
of results):

1. each client delta ``Δ_i`` (client weights − base) is scaled to norm ≤ ``C``;
   ``b_i = 1[‖Δ_i‖ ≤ C]``;
2. ``Δ̃ = (Σ clip(Δ_i) + N(0, (σ_Δ C)² I)) / m`` — every client has one vote, sample counts are
   ignored (a client's influence must be bounded by ``C`` alone);
3. ``b̃ = (Σ b_i + N(0, σ_b²)) / m`` — the privately estimated fraction of unclipped clients;
4. ``C ← C · exp(−η_C (b̃ − γ))`` — geometric step toward the ``γ``-quantile of update norms;
5. the inner strategy (FedAvg by default; FedAvgM/FedAdam for server optimizers) is handed the
   single noised update ``base + Δ̃`` — post-processing, so it costs no privacy.

``noise_multiplier`` is the *combined* ``z`` the accountant sees; ``σ_Δ`` is derived from it
and ``σ_b`` (Thm. 1: ``z = (σ_Δ^-2 + (2σ_b)^-2)^-1/2``). With a :class:`PrivacyBudget`,
``configure_round`` raises :class:`BudgetExhausted` before a round that would pass the budget,
and ``aggregate`` records one event (``z``, ``q = clients_per_round / population``).

Randomness: ``seed=None`` draws noise from OS entropy (production: noise an observer could
predict protects nothing). A seed makes round ``r``'s noise a function of ``(seed, r)`` — for
tests and benchmarks — so re-running a round after a restart reproduces it. Persistent state
(``state_dict``): the clip norm, the privacy events and the inner strategy's state.

The report contains only what the mechanism releases or fixes in advance (clip norm, noised
fraction, noise std, ε) — not which clients were clipped or their norms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from coordinator import robust
from coordinator.aggregate import apply_delta, deltas
from coordinator.strategies.base import AggregateReport, ClientResult, Strategy
from coordinator.strategies.fedavg import FedAvg
from learning.privacy_accounting import PrivacyBudget, RdpAccountant, update_noise_multiplier_for
from protocol.codec import Tensors


class CentralDP(Strategy):
    """User-level DP-FedAvg with adaptive clipping around an inner strategy."""

    name = "central_dp"

    def __init__(
        self,
        noise_multiplier: float = 1.0,
        *,
        initial_clip: float = 0.1,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        count_stddev: float | None = None,
        clients_per_round: int | None = None,
        population: int | None = None,
        budget: PrivacyBudget | None = None,
        seed: int | None = None,
        inner: Strategy | None = None,
        adaptive: bool = True,
    ) -> None:
        if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
            raise ValueError("noise_multiplier must be a finite number >= 0")
        if not initial_clip > 0:
            raise ValueError("initial_clip must be > 0")
        if not 0 < target_quantile < 1:
            raise ValueError("target_quantile must be in (0, 1)")
        if clip_lr < 0:
            raise ValueError("clip_lr must be >= 0")
        if clients_per_round is not None and clients_per_round < 1:
            raise ValueError("clients_per_round must be >= 1")
        if population is not None and (clients_per_round is None or population < clients_per_round):
            raise ValueError("population needs clients_per_round <= population")
        self.z = float(noise_multiplier)
        self.clip_norm = float(initial_clip)
        self.target_quantile, self.clip_lr, self.adaptive = target_quantile, clip_lr, adaptive
        self.clients_per_round, self.population = clients_per_round, population
        # Andrew et al. suggest σ_b = m/20 (the fraction estimate is then within ~±0.05).
        m_guess = clients_per_round if clients_per_round is not None else 20
        self.count_stddev = float(count_stddev) if count_stddev is not None else m_guess / 20.0
        if not adaptive:
            self.count_stddev = 0.0
            self.sigma_update = self.z
        else:
            self.sigma_update = update_noise_multiplier_for(self.z, self.count_stddev)
        self.budget, self.seed = budget, seed
        self.inner: Strategy = inner if inner is not None else FedAvg()

    @property
    def sampling_rate(self) -> float:
        """The accountant's sampling rate ``clients_per_round / population`` (1 without them)."""
        if self.population is None or self.clients_per_round is None:
            return 1.0
        return self.clients_per_round / self.population

    def _rng(self, round_id: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng([int(self.seed), int(round_id)])

    def configure_round(self, round_id: int) -> dict[str, Any]:
        """The inner strategy's overrides, once the privacy budget allows the round."""
        if self.budget is not None and self.z > 0:
            self.budget.require(noise_multiplier=self.z, sampling_rate=self.sampling_rate,
                                what=f"round {round_id}")
        elif self.budget is not None:
            raise ValueError("a privacy budget with noise_multiplier 0 can never be met")
        return self.inner.configure_round(round_id)

    def aggregate(self, round_id: int, base: Tensors, results: list[ClientResult]) -> tuple[Tensors, AggregateReport]:
        """Clip, sum and noise the deltas, adapt the clip norm, hand the noised mean to the inner strategy."""
        if not results:
            raise ValueError("nothing to aggregate")
        if self.budget is not None:  # refuse before anything is released
            self.budget.require(noise_multiplier=self.z, sampling_rate=self.sampling_rate, what=f"round {round_id}")
        m = self.clients_per_round if self.clients_per_round is not None else len(results)
        clip = self.clip_norm
        ds = deltas([r.tensors for r in results], base)
        clipped, norms, _was_clipped = robust.norm_bound(ds, clip)
        flat = robust.flatten(clipped).sum(axis=0)
        rng = self._rng(round_id)
        noise_std_sum = self.sigma_update * clip
        if noise_std_sum > 0:
            flat = flat + rng.normal(0.0, noise_std_sum, size=flat.shape)
        avg = robust.unflatten(flat / m, ds[0])
        unclipped = float(np.sum(norms <= clip))
        noised_fraction = (unclipped + (rng.normal(0.0, self.count_stddev) if self.count_stddev > 0 else 0.0)) / m
        if self.adaptive:
            self.clip_norm = float(clip * math.exp(-self.clip_lr * (noised_fraction - self.target_quantile)))
        noised = ClientResult("central_dp", apply_delta(base, avg), sample_count=1)
        new, inner_report = self.inner.aggregate(round_id, base, [noised])
        details: dict[str, Any] = {
            "strategy": self.name,
            "clients": [r.agent_id for r in results],
            "clip_norm": clip,
            "next_clip_norm": self.clip_norm,
            "noised_unclipped_fraction": noised_fraction,
            "target_quantile": self.target_quantile,
            "update_noise_std": noise_std_sum / m,
            "noise_multiplier": self.z,
            "denominator": m,
            "inner": inner_report.details,
        }
        if self.budget is not None:
            self.budget.spend(noise_multiplier=self.z, sampling_rate=self.sampling_rate, what=f"round {round_id}")
            details["privacy"] = self.budget.report()
        return new, AggregateReport(details)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Clip norm, privacy events and the inner strategy's state."""
        out = {"clip_norm": np.asarray([self.clip_norm], dtype=np.float64)}
        if self.budget is not None:
            out["privacy/events"] = self.budget.accountant.state_array()
        out.update({f"inner/{k}": v for k, v in self.inner.state_dict().items()})
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore clip norm, privacy events and the inner strategy's state."""
        if "clip_norm" in state:
            self.clip_norm = float(np.asarray(state["clip_norm"]).ravel()[0])
        if "privacy/events" in state:
            if self.budget is None:
                raise ValueError("state has privacy events but this strategy has no budget to restore them into")
            self.budget.accountant = RdpAccountant.from_state_array(state["privacy/events"],
                                                                    self.budget.accountant.orders)
        self.inner.load_state_dict({k[len("inner/"):]: v for k, v in state.items() if k.startswith("inner/")})


def build_central_dp(
    *,
    budget_epsilon: float | None = None,
    delta: float = 1e-5,
    inner: Strategy | None = None,
    **kwargs: Any,
) -> CentralDP:
    """Config entry: ``budget_epsilon``/``delta`` make a :class:`PrivacyBudget`.

    The registry (``coordinator.strategies.build_strategy("central_dp", inner="fedavgm")``)
    resolves an inner strategy given by name before calling this.
    """
    budget = PrivacyBudget(budget_epsilon, delta) if budget_epsilon is not None else None
    return CentralDP(budget=budget, inner=inner, **kwargs)

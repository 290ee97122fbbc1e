"""Client-side DP-SGD for the agent's training jobs, as the device profile's ``privacy`` section asks.

With ``privacy.dp_sgd: true`` every local training run goes through opacus (``learning.dp``):
per-sample clipping at ``max_grad_norm``, Gaussian noise of ``noise_multiplier · max_grad_norm``,
Poisson-sampled batches at rate ``q = 1 / ceil(n / batch_size)``. The agent's ε is record-level
over all the updates it has ever sent; it lives in ``privacy_budget.json`` in the agent's state
directory (the accountant's events, so ε can be recomputed at any δ and survives restarts).

Before a run, its planned steps are checked against ``epsilon_budget``: a run that would pass it
raises :class:`learning.privacy_accounting.BudgetExhausted` and never starts. After a run, the planned
steps are charged (an empty Poisson batch still counts: conservative) and the file is written
before the update leaves the box.

What changes under DP, and why:

- ``loss: balanced_ce`` becomes plain cross-entropy: its class weights come from this site's
  own label counts, which no accountant covers;
- FedProx's ``prox_mu`` is dropped: the proximal term is not per-sample and opacus' optimizer
  would silently ignore it;
- no mid-run checkpoint: the trainer's checkpoint does not hold the noise generator's state, and a
  run that dies releases nothing, so the next task simply starts over.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from edge_agent.durable import atomic_write
from firmware.profile import PrivacySection
from learning.privacy_accounting import PrivacyBudget
from learning.trainer import (
    PauseHook,
    Progress,
    TrainData,
    TrainResult,
    poisson_batches,
    sgd_optimizer,
    train_local,
)
from protocol.errors import FedscanError, Reason
from protocol.messages import TrainingConfig

log = logging.getLogger(__name__)

BUDGET_FILE = "privacy_budget.json"


@dataclass(frozen=True)
class DPReport:
    """What one private run cost, and where the agent stands (sent with the update as metrics)."""

    epsilon: float  # spent so far, all runs, at ``delta``
    delta: float
    budget_epsilon: float
    noise_multiplier: float
    sampling_rate: float
    steps: int  # charged for this run

    def as_metrics(self) -> dict[str, float]:
        """Return the report as update-frame metrics (``dp_*``)."""
        return {"dp_epsilon": self.epsilon, "dp_delta": self.delta, "dp_budget_epsilon": self.budget_epsilon,
                "dp_noise_multiplier": self.noise_multiplier, "dp_sampling_rate": self.sampling_rate,
                "dp_steps": float(self.steps)}


def _size(data: TrainData) -> int:
    return len(data[0]) if isinstance(data, tuple) else len(data)


def dp_training_config(cfg: TrainingConfig) -> TrainingConfig:
    """Return the round's config as DP-SGD runs it (see the module doc): plain CE, no proximal term."""
    changes: dict[str, Any] = {}
    if cfg.loss != "ce":
        changes["loss"] = "ce"
    if cfg.prox_mu:
        changes["prox_mu"] = 0.0
    if changes:
        log.warning("DP-SGD: training with %s instead of %s (site label weights and the proximal term are "
                    "not covered by the privacy accounting)", changes, {k: getattr(cfg, k) for k in changes})
    return cfg.model_copy(update=changes)


class PrivacyStateError(FedscanError):
    """The stored privacy budget cannot be read: training stays off (fail closed) until it is fixed."""

    reason = Reason.PRIVACY_STATE


class PrivateTrainer:
    """One agent's DP-SGD runs and their privacy budget (kept in ``state_dir``)."""

    def __init__(self, section: PrivacySection, state_dir: Path) -> None:
        """Read the budget kept in ``state_dir`` (``PrivacyStateError`` when it is unreadable)."""
        if not section.dp_sgd:
            raise ValueError("PrivateTrainer needs privacy.dp_sgd: true")
        self.section = section
        self.path = state_dir / BUDGET_FILE
        self.budget = self._load()

    def _load(self) -> PrivacyBudget:
        limit = self.section.epsilon_budget if self.section.epsilon_budget is not None else math.inf
        if not self.path.exists():
            return PrivacyBudget(limit, self.section.target_delta)
        try:
            released = PrivacyBudget.from_dict(json.loads(self.path.read_text())).accountant
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # starting a fresh budget would forget what this box has already released
            raise PrivacyStateError(f"cannot read the privacy budget {self.path}: {exc}; DP training refuses "
                                    "to start until it is restored (never delete it to get a fresh budget)") from exc
        # the events are what was released; the limit and δ are today's configuration
        return PrivacyBudget(limit, self.section.target_delta, released)

    def _save(self) -> None:
        # fsynced (file and directory) before the update can leave: a power loss must not roll ε back
        atomic_write(self.path, json.dumps(self.budget.to_dict()).encode())

    def train(self, model: nn.Module, data: TrainData, cfg: TrainingConfig, *, threads: int | None = None,
              pause: PauseHook | None = None, progress: Progress | None = None,
              what: str = "local training") -> tuple[TrainResult, DPReport]:
        """Train ``model`` in place with DP-SGD.

        Raises ``BudgetExhausted`` (nothing trained) when the planned steps would take ε past the budget.
        """
        from learning.dp import make_private  # opacus: imported by DP agents only

        cfg = dp_training_config(cfg)
        n = _size(data)
        # opacus takes the sampling rate from the loader's length; the trainer draws the Poisson
        # batches itself (``poisson_batches``), so this loader only carries the dataset's size
        sizes = DataLoader(TensorDataset(torch.arange(n)), batch_size=cfg.batch_size)
        steps_per_epoch = max(1, len(sizes))
        planned = int(min(cfg.max_steps or math.inf, cfg.local_epochs * steps_per_epoch))
        z, clip = self.section.noise_multiplier, self.section.max_grad_norm
        pt = make_private(model, sgd_optimizer(model, cfg), sizes, noise_multiplier=z, max_grad_norm=clip,
                          budget=self.budget, planned_steps=planned, what=f"DP-SGD {what}")
        dp_optimizer: torch.optim.Optimizer = pt.optimizer  # opacus' DPOptimizer (untyped) is an Optimizer

        def use_dp_optimizer(_m: nn.Module, _c: TrainingConfig) -> torch.optim.Optimizer:
            return dp_optimizer

        with warnings.catch_warnings():  # opacus' hooks on the first layer, whose input needs no gradient
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            result = train_local(pt.model, data, cfg, threads=threads, pause=pause, progress=progress,
                                 optimizer_factory=use_dp_optimizer, batch_plan=poisson_batches(pt.sample_rate))
        spent = self.budget.spend(noise_multiplier=z, sampling_rate=pt.sample_rate, steps=planned, what=what)
        self._save()
        log.info("DP-SGD %s: %d steps at z=%.2f q=%.4f; ε = %.3f of %s at δ = %g", what, planned, z,
                 pt.sample_rate, spent, self.budget.epsilon, self.budget.delta)
        return result, DPReport(spent, self.budget.delta, self.budget.epsilon, z, pt.sample_rate, planned)

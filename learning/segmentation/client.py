"""The client step of the segmentation job: what one site runs for one round's task.

:func:`train_site` loads the coordinator's shared tensors and the site's own local tensors into
the model, trains a fixed number of optimizer steps (the same step budget at every site, so
sites of different sizes send updates of comparable size) on the site's images with
:func:`~learning.segmentation.model.seg_loss`, and returns the shared tensors to send, the sample
count, metrics, and the site's next :class:`SiteState`. With a :class:`SitePrivacy` the steps are
DP-SGD (``learning.segmentation.privacy``): the budget is checked before anything trains
(``BudgetExhausted``), charged after, and ε is reported with the update.

Deterministic: batches, flips and DP noise come from generators seeded by ``(seed, round)``;
torch runs with the caller's thread count (set 1 in benchmarks). A production site passes
``noise_seed=None`` (noise an observer could predict protects nothing).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from learning.datasets import DatasetError
from learning.segmentation.data import SiteData
from learning.segmentation.errors import SegmentationError
from learning.segmentation.model import one_hot, seg_loss
from learning.segmentation.privacy import (
    PrivacyPlan,
    QuantileAdaClipOptimizer,
    SitePrivacy,
    budget_of,
    plan_privacy,
)
from learning.segmentation.sharing import ShareRule, get_named, local_names, set_named, shared_names
from protocol.codec import Tensors
from protocol.errors import Reason


@dataclass(frozen=True)
class SegTrainConfig:
    """One round's local training settings.

    ``steps`` optimizer steps of ``batch_size`` images (the expected size under DP's Poisson
    sampling), random flips, and the sharing rule. ``optimizer``: ``adam`` (scale-free steps) or
    ``sgd`` with ``momentum`` (steps scale with the clipped gradient: what adaptive clipping
    controls under DP). Optimizer state starts afresh every round.
    """

    steps: int = 20
    batch_size: int = 8
    lr: float = 2e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9
    augment: bool = True
    share: ShareRule = ShareRule.FEDBN
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse a config that cannot train."""
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or self.optimizer not in ("adam", "sgd") \
                or not 0 <= self.momentum < 1:
            raise SegmentationError(f"training config refused: steps={self.steps}, batch_size={self.batch_size}, "
                                    f"lr={self.lr}, optimizer={self.optimizer!r}, momentum={self.momentum} (need "
                                    "steps, batch_size >= 1, lr > 0, adam or sgd, 0 <= momentum < 1)")


@dataclass(frozen=True)
class SiteState:
    """What a site keeps between rounds.

    Its local tensors (never sent), its adaptive clip bound, its accountant's events (what it has
    released so far) and the rounds it trained.
    """

    local: Tensors = field(default_factory=dict)
    clip: float | None = None
    privacy_events: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    rounds: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for the agent's state directory (local tensors go in a separate file)."""
        return {"clip": self.clip, "privacy_events": np.asarray(self.privacy_events).tolist(), "rounds": self.rounds}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], local: Tensors | None = None) -> SiteState:
        """Inverse of :meth:`to_dict`."""
        events = np.asarray(d.get("privacy_events", []), dtype=np.float64).reshape(-1, 3)
        clip = d.get("clip")
        return cls(dict(local or {}), None if clip is None else float(clip), events, int(d.get("rounds", 0)))


@dataclass(frozen=True)
class SiteUpdate:
    """What a site returns for one round: shared tensors, sample count, metrics, next state."""

    tensors: Tensors
    sample_count: int
    metrics: dict[str, float]
    state: SiteState


def make_optimizer(model: nn.Module, cfg: SegTrainConfig) -> torch.optim.Optimizer:
    """The round's optimizer over ``model``'s parameters."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def _round_seed(seed: int, round_id: int, site: str) -> int:
    return int(np.random.default_rng([seed, round_id, *site.encode()]).integers(2**31 - 1))


def _batch(site: SiteData, idx: np.ndarray, gen: torch.Generator, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(site.train.images[idx])
    y = torch.from_numpy(site.train.masks[idx].astype(np.int64))
    if augment and len(idx):
        flips = torch.rand(len(idx), 2, generator=gen) < 0.5
        for i in range(len(idx)):
            dims = [d for d, f in zip((-1, -2), flips[i].tolist(), strict=True) if f]
            if dims:
                x[i], y[i] = torch.flip(x[i], dims), torch.flip(y[i], dims)
    return x, one_hot(y)


def _plain_steps(model: nn.Module, site: SiteData, cfg: SegTrainConfig, gen: torch.Generator) -> list[float]:
    loss_fn, n = seg_loss(), len(site.train)
    opt = make_optimizer(model, cfg)
    losses: list[float] = []
    order = torch.randperm(n, generator=gen).numpy()
    pos = 0
    for _ in range(cfg.steps):
        if pos + cfg.batch_size > n:
            order, pos = torch.randperm(n, generator=gen).numpy(), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        x, y = _batch(site, idx, gen, cfg.augment)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _dp_steps(model: nn.Module, site: SiteData, cfg: SegTrainConfig, priv: SitePrivacy, plan: PrivacyPlan,
              clip: float, gen: torch.Generator, noise: torch.Generator) -> tuple[list[float], float, list[float]]:
    """DP-SGD steps on Poisson batches; returns losses, the clip bound after, released fractions."""
    loss_fn, n = seg_loss(), len(site.train)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Secure RNG|full backward hook).*")
        gsm = GradSampleModule(model)
        base = make_optimizer(gsm, cfg)
        common: dict[str, Any] = {"noise_multiplier": plan.z, "max_grad_norm": clip,
                                  "expected_batch_size": round(plan.expected_batch), "generator": noise}
        if priv.clipping == "adaptive":
            opt: DPOptimizer = QuantileAdaClipOptimizer(
                base, target_unclipped_quantile=priv.target_quantile, clipbound_learning_rate=priv.clip_lr,
                max_clipbound=priv.max_clip, min_clipbound=priv.min_clip, unclipped_num_std=plan.count_stddev,
                **common)
        else:
            opt = DPOptimizer(base, **common)
        losses: list[float] = []
        try:
            for _ in range(cfg.steps):
                idx = np.flatnonzero((torch.rand(n, generator=gen) < plan.sampling_rate).numpy())
                opt.zero_grad(set_to_none=True)
                if len(idx):
                    x, y = _batch(site, idx, gen, cfg.augment)
                    loss = loss_fn(gsm(x), y)
                    loss.backward()
                    losses.append(float(loss.detach()))
                else:  # an empty Poisson sample still releases noise (and counts for the accountant)
                    for p in gsm.parameters():
                        p.grad_sample = torch.zeros((0, *p.shape))
                if priv.lr_per_clip:  # the step size stays the validated one whatever bound the site's data set
                    for group in opt.param_groups:
                        group["lr"] = cfg.lr * priv.initial_clip / float(opt.max_grad_norm)
                opt.step()
        finally:
            gsm.cleanup()
    fractions = opt.fractions if isinstance(opt, QuantileAdaClipOptimizer) else []
    return losses, float(opt.max_grad_norm), fractions


def train_site(model: nn.Module, site: SiteData, cfg: SegTrainConfig, *, global_tensors: Mapping[str, np.ndarray],
               state: SiteState, round_id: int, privacy: SitePrivacy | None = None,
               noise_seed: int | None = None) -> SiteUpdate:
    """One round at one site (the model is trained in place; see the module doc).

    ``global_tensors`` are the coordinator's shared tensors (names: ``shared_names(model, cfg.share)``;
    the site's local tensors come from ``state``, or the model's own initial values on its first
    round). Raises ``BudgetExhausted`` — before training — when the round would pass the site's ε.
    """
    expected = shared_names(model, cfg.share)
    if sorted(global_tensors) != sorted(expected):
        raise SegmentationError(f"global tensors do not match the shared set of rule {cfg.share}: "
                         f"missing {sorted(set(expected) - set(global_tensors))[:3]}, "
                         f"extra {sorted(set(global_tensors) - set(expected))[:3]}", reason=Reason.SHAPE_MISMATCH)
    if len(site.train) == 0:
        raise DatasetError(f"site {site.name} has no training images")
    set_named(model, global_tensors)
    if state.local:
        set_named(model, state.local)
    seed = _round_seed(cfg.seed, round_id, site.name)
    gen = torch.Generator().manual_seed(seed)
    metrics: dict[str, float] = {}
    model.train()
    if privacy is None:
        losses = _plain_steps(model, site, cfg, gen)
        next_state = replace(state, rounds=state.rounds + 1)
    else:
        plan = plan_privacy(privacy, n=len(site.train), batch_size=cfg.batch_size, steps_per_round=cfg.steps)
        budget = budget_of(privacy, state.privacy_events)
        before = budget.spent
        budget.require(noise_multiplier=plan.z, sampling_rate=plan.sampling_rate, steps=cfg.steps,
                       what=f"segmentation round {round_id} at {site.name}")
        clip = state.clip if state.clip is not None else privacy.initial_clip
        noise = torch.Generator().manual_seed(
            int.from_bytes(os.urandom(8), "little") >> 1 if noise_seed is None
            else _round_seed(noise_seed, round_id, site.name))
        losses, clip_after, fractions = _dp_steps(model, site, cfg, privacy, plan, clip, gen, noise)
        spent = budget.spend(noise_multiplier=plan.z, sampling_rate=plan.sampling_rate, steps=cfg.steps,
                             what=f"segmentation round {round_id} at {site.name}")
        metrics.update(plan.as_metrics())
        metrics.update({"dp_epsilon": spent, "dp_epsilon_round": spent - before, "dp_delta": privacy.delta,
                        "dp_budget_epsilon": privacy.epsilon, "dp_clip_before": clip, "dp_clip": clip_after,
                        "dp_steps": float(cfg.steps)})
        if fractions:
            metrics["dp_noised_unclipped_fraction"] = float(np.mean(fractions))
        next_state = replace(state, clip=clip_after, privacy_events=budget.accountant.state_array(),
                             rounds=state.rounds + 1)
    metrics["train_loss"] = float(np.mean(losses)) if losses else math.nan
    local = local_names(model, cfg.share)
    return SiteUpdate(get_named(model, expected), len(site.train), metrics,
                      replace(next_state, local=get_named(model, local)))

"""Optimizers and the learning-rate schedule over a training budget counted in optimizer steps.

A federation's budget is ``total_steps`` local steps per site (rounds × steps per round); round
``r`` starts ``step_offset = (r - 1) × max_steps`` steps into it, so the schedule runs once over
the whole federation rather than restarting every round. ``lr_factor`` is a pure function of the
global step, so a run resumed from a checkpoint follows the same schedule without extra state.

Schedules: ``constant`` (the old behaviour), and ``cosine``: linear warm-up over ``warmup_steps``
from ``lr / warmup_steps`` to ``lr``, then a half cosine down to 0 at ``total_steps``
(Loshchilov & Hutter 2017, without restarts; Goyal et al. 2017 for the warm-up).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from protocol.messages import TrainingConfig


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "cosine") -> float:
    """Return the multiplier of the base learning rate at global ``step`` (0-based) of a ``total``-step budget."""
    if step < 0 or total < 1:
        raise ValueError(f"need step >= 0 and total >= 1, got step={step}, total={total}")
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r} (constant | cosine)")
    warmup = min(max(warmup, 0), total - 1)
    if step < warmup:
        return (step + 1) / warmup
    span = total - warmup
    progress = min(step - warmup, span) / span
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_total(cfg: TrainingConfig, planned: int) -> int:
    """Return the budget the schedule spans: ``cfg.total_steps``, else this call's own offset + planned steps."""
    if cfg.total_steps is not None:
        return cfg.total_steps
    return max(1, cfg.step_offset + planned)


def sgd_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """SGD with the config's momentum and weight decay (the default before ``cfg.optimizer`` existed)."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """Build ``cfg.optimizer``: SGD with momentum, or AdamW (decoupled weight decay, default betas)."""
    if cfg.optimizer == "sgd":
        return sgd_optimizer(model, cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


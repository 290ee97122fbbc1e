"""Ensemble distillation into the global model on a synthesis trajectory, with client-model adaptation.

For the ``i``-th of ``n`` snapshots ``x`` (noise first), one optimizer step of the student on

    α · KD(student(x), teacher(x)) + (1 − α) · KD(student(x), adapted(x)),   α = i / n

where ``teacher`` is the ensemble as uploaded (BatchNorm with the sites' statistics), ``adapted``
its batch-statistics copy (:func:`learning.oneshot.ensemble.batch_statistics_teacher`) and KD the
tempered KL divergence (:func:`learning.oneshot.losses.kd_loss`). With ``adapt=False`` α is 1
throughout (plain ensemble distillation, the ablation).

:func:`replay` is an addition to the paper for small budgets: ``replay_steps`` further student
steps per epoch on random batches from the pool of final synthetic images of all epochs so far,
labelled by the uploaded ensemble (teacher forward passes are cheap next to synthesis steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from learning.oneshot.losses import adaptation_weight, kd_loss


class DistillConfig(BaseModel):
    """How the global model learns from the teacher (defaults chosen on the validation splits)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    temperature: float = Field(4.0, gt=0)
    adapt: bool = True
    steps_per_snapshot: int = Field(1, ge=1, le=100)
    schedule: Literal["step", "constant"] = "step"  # step: ÷10 at 1/2 and 3/4 of the epochs (the reference)
    replay_steps: int = Field(0, ge=0, le=100_000)


def make_optimizer(student: nn.Module, cfg: DistillConfig) -> torch.optim.Optimizer:
    """Return the student's SGD optimizer (momentum, weight decay)."""
    return torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def distill_trajectory(student: nn.Module, teacher: nn.Module, adapted: nn.Module | None,
                       snapshots: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
                       cfg: DistillConfig) -> list[float]:
    """Train ``student`` (train mode) on the snapshots in order; return the loss of each step.

    ``teacher`` is used in eval mode; ``adapted`` as given (its BatchNorm layers in batch-statistics
    mode). ``adapted=None`` or ``cfg.adapt=False`` distills from ``teacher`` alone.
    """
    teacher.eval()
    student.train()
    losses = []
    use_adapted = cfg.adapt and adapted is not None
    for i, x in enumerate(snapshots):
        alpha = adaptation_weight(i, len(snapshots)) if use_adapted else 1.0
        with torch.no_grad():
            t = teacher(x)
            ta = adapted(x) if use_adapted and adapted is not None else t
        for _ in range(cfg.steps_per_snapshot):
            optimizer.zero_grad(set_to_none=True)
            s = student(x)
            loss = alpha * kd_loss(s, t, cfg.temperature)
            if alpha < 1.0:
                loss = loss + (1.0 - alpha) * kd_loss(s, ta, cfg.temperature)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            losses.append(float(loss.detach()))
    return losses


def replay(student: nn.Module, teacher: nn.Module, pool: torch.Tensor, optimizer: torch.optim.Optimizer,
           cfg: DistillConfig, batch_size: int, generator: torch.Generator) -> list[float]:
    """Take ``cfg.replay_steps`` student steps on random batches of ``pool`` labelled by ``teacher``."""
    if cfg.replay_steps == 0 or len(pool) == 0:
        return []
    teacher.eval()
    student.train()
    losses = []
    for _ in range(cfg.replay_steps):
        idx = torch.randint(0, len(pool), (min(batch_size, len(pool)),), generator=generator)
        x = pool[idx]
        with torch.no_grad():
            t = teacher(x)
        optimizer.zero_grad(set_to_none=True)
        loss = kd_loss(student(x), t, cfg.temperature)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses

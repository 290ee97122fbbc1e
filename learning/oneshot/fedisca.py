"""The coordinator's side of one-shot FL: site models in, one distilled global model out (FedISCA).

:func:`one_shot` runs ``cfg.epochs`` epochs; each epoch draws a fresh batch of noise,
synthesizes images from it (:func:`learning.oneshot.synthesis.synthesize`), rebuilds the adapted
teacher and distills the ensemble into the student along the whole trajectory
(:func:`learning.oneshot.distill.distill_trajectory`). The student's learning rate steps down by
10× at half and at three quarters of the epochs (the reference schedule). ``on_epoch(epoch,
student)`` lets the caller evaluate (on its validation split) as the epochs go. Deterministic for a
seed: noise and jitter come from one ``torch.Generator``.

Against the reference code (github.com/myeongkyunkang/FedISCA, ``main_fedisca.py``; read, not
copied): the same losses (CE + BatchNorm statistics + total variation + optional L2, jitter by
rolling), the same teacher (mean of logits), the same adaptation (a batch-statistics copy of the
teacher labelling the early snapshots, weight ``i / n``), the same KL distillation and step
schedule. Simplified, for a CPU: the budget (the paper runs 100 epochs × 500 synthesis steps of
256 images; the default here 24 epochs × 30 steps of 32), snapshots every
``keep_every`` steps with ``steps_per_snapshot`` student steps each instead of one step per
synthesis step, pixels clamped to the valid range, no ImageNet-pretrained student.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from learning.oneshot.distill import DistillConfig, distill_trajectory, make_optimizer, replay
from learning.oneshot.ensemble import Ensemble, batch_statistics_teacher
from learning.oneshot.models import check_site_models, require_batchnorm
from learning.oneshot.synthesis import SynthesisConfig, synthesize, teacher_accuracy


class OneShotConfig(BaseModel):
    """The whole coordinator-side budget: epochs of (synthesize one batch, distill on its trajectory)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(8, ge=1, le=10_000)
    synthesis: SynthesisConfig = SynthesisConfig()
    distill: DistillConfig = DistillConfig()


@dataclass
class OneShotResult:
    """What :func:`one_shot` did: per-epoch teacher accuracy on its own images and distillation loss."""

    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    final_images: torch.Tensor | None = None


def step_lr(base: float, epoch: int, epochs: int) -> float:
    """Return the learning rate of ``epoch`` (0-based): ``base``, then ÷10 from half, ÷100 from 3/4 of the epochs."""
    if epoch < epochs // 2 or epochs < 4:  # fewer than 4 epochs: the drops would leave almost no training at base
        return base
    if epoch < (3 * epochs) // 4:
        return base * 0.1
    return base * 0.01


def one_shot(site_models: Sequence[nn.Module], student: nn.Module, shape: tuple[int, int, int],
             cfg: OneShotConfig, *, seed: int = 0, weights: Sequence[float] | None = None,
             on_epoch: Callable[[int, nn.Module], None] | None = None) -> OneShotResult:
    """Distill the ensemble of ``site_models`` into ``student`` (trained in place) from synthetic images only.

    ``shape`` is the input (C, H, W); ``weights`` weight the ensemble (equal by default). The site
    models are not changed (the teacher is frozen, the adapted teacher is a copy).
    """
    t0 = time.perf_counter()
    num_classes = check_site_models(site_models)
    require_batchnorm(student, "the global model")
    teacher = Ensemble(site_models, weights)
    gen = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(student, cfg.distill)
    result = OneShotResult()
    pool: list[torch.Tensor] = []
    for epoch in range(cfg.epochs):
        lr = step_lr(cfg.distill.lr, epoch, cfg.epochs) if cfg.distill.schedule == "step" else cfg.distill.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        syn = synthesize(teacher, shape, num_classes, cfg.synthesis, gen)
        adapted = batch_statistics_teacher(teacher) if cfg.distill.adapt else None
        losses = distill_trajectory(student, teacher, adapted, syn.snapshots, optimizer, cfg.distill)
        pool.append(syn.images)
        losses += replay(student, teacher, torch.cat(pool), optimizer, cfg.distill, cfg.synthesis.batch_size, gen)
        result.final_images = syn.images
        result.history.append({
            "epoch": float(epoch + 1), "lr": lr,
            "teacher_accuracy_on_synthetic": teacher_accuracy(teacher, syn.images, syn.targets),
            "synthesis_ce": syn.losses[-1]["ce"], "synthesis_bn": syn.losses[-1]["bn"],
            "distill_loss": float(sum(losses) / len(losses)),
        })
        if on_epoch is not None:
            on_epoch(epoch + 1, student)
    result.seconds = time.perf_counter() - t0
    return result

"""Image synthesis by inverting the site models: from Gaussian noise to images the ensemble labels as asked.

One call of :func:`synthesize` optimizes a batch of images (in the models' normalized input space)
with Adam, for ``iterations`` steps, on

    CE(ensemble(jitter(x)), targets)
    + bn_weight · BatchNorm statistics loss of every site model (mean over models)
    + tv_weight · total variation(jitter(x)) + l2_weight · ‖jitter(x)‖₂

where ``targets`` are balanced class labels (:func:`balanced_targets`) and ``jitter`` rolls the
batch by a random offset of up to ``jitter`` pixels each way (a new offset every step). After each
step the images are clamped to ``pixel_range`` when given (the normalized values of pixel 0 and
255). It returns the whole trajectory (a snapshot every ``keep_every`` steps, the noise first):
the distillation trains on all of it, as FedISCA does. Randomness comes only from ``generator``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

from learning.oneshot.ensemble import BatchNormStatistics, Ensemble, frozen
from learning.oneshot.losses import total_variation


class SynthesisConfig(BaseModel):
    """How one batch of images is synthesized (defaults chosen on the validation splits, bench/oneshot.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(64, ge=2, le=4096)
    iterations: int = Field(100, ge=1, le=100_000)
    lr: float = Field(0.1, gt=0)
    bn_weight: float = Field(1.0, ge=0)
    tv_weight: float = Field(1e-3, ge=0)
    l2_weight: float = Field(0.0, ge=0)
    jitter: int = Field(2, ge=0, le=64)
    keep_every: int = Field(1, ge=1)
    pixel_range: tuple[float, float] | None = None


@dataclass
class Synthesis:
    """One synthesis run: the snapshots (noise first, final images last), the targets, the loss curve."""

    snapshots: list[torch.Tensor]
    targets: torch.Tensor
    losses: list[dict[str, float]] = field(default_factory=list)

    @property
    def images(self) -> torch.Tensor:
        """Return the final synthetic images."""
        return self.snapshots[-1]


def balanced_targets(n: int, num_classes: int) -> torch.Tensor:
    """Return ``n`` int64 labels cycling through the classes (each class ``n // C`` or one more times)."""
    if n < 1 or num_classes < 1:
        raise ValueError(f"need n >= 1 and num_classes >= 1, got {n}, {num_classes}")
    return torch.arange(n, dtype=torch.int64) % num_classes


def _jitter(x: torch.Tensor, limit: int, generator: torch.Generator) -> torch.Tensor:
    if limit == 0:
        return x
    dx, dy = (int(v) for v in torch.randint(-limit, limit + 1, (2,), generator=generator))
    return torch.roll(x, shifts=(dx, dy), dims=(2, 3))


def synthesize(teacher: Ensemble, shape: tuple[int, int, int], num_classes: int, cfg: SynthesisConfig,
               generator: torch.Generator) -> Synthesis:
    """Synthesize ``cfg.batch_size`` images of ``shape`` (C, H, W) from noise by inverting ``teacher``.

    The teacher is put in eval mode (its BatchNorm layers normalize with the sites' running
    statistics, which the statistics loss compares against); its parameters get no gradient (their
    ``requires_grad`` flags are restored afterwards).
    """
    teacher.eval()
    targets = balanced_targets(cfg.batch_size, num_classes)
    x = torch.randn((cfg.batch_size, *shape), generator=generator).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    out = Synthesis(snapshots=[x.detach().clone()], targets=targets)
    with frozen(teacher), BatchNormStatistics(list(teacher.members)) as bn_stats:
        for it in range(1, cfg.iterations + 1):
            opt.zero_grad(set_to_none=True)
            xj = _jitter(x, cfg.jitter, generator)
            ce = F.cross_entropy(teacher(xj), targets)
            bn = bn_stats.pop()
            loss = ce + cfg.bn_weight * bn
            tv = total_variation(xj)
            if cfg.tv_weight:
                loss = loss + cfg.tv_weight * tv
            if cfg.l2_weight:
                loss = loss + cfg.l2_weight * torch.linalg.vector_norm(xj)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            if cfg.pixel_range is not None:
                with torch.no_grad():
                    x.clamp_(*cfg.pixel_range)
            if it % cfg.keep_every == 0 or it == cfg.iterations:
                out.snapshots.append(x.detach().clone())
                out.losses.append({"iteration": float(it), "ce": float(ce.detach()), "bn": float(bn.detach()),
                                   "tv": float(tv.detach())})
    return out


def teacher_accuracy(teacher: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    """Return the share of synthetic images the teacher (eval mode) labels as their target."""
    teacher.eval()
    with torch.no_grad():
        return float((teacher(images).argmax(1) == targets).float().mean())

"""The losses of one-shot FL, as pure functions: BatchNorm statistics matching, image priors, distillation.

* :func:`bn_statistics_loss`: how far a batch's per-channel mean and (biased) variance at a
  BatchNorm input are from that layer's running statistics, ``‖μ_batch − μ_run‖₂ + ‖σ²_batch − σ²_run‖₂``
  (DeepInversion's feature-distribution regularizer, as FedISCA uses it);
* :func:`total_variation`: the L2 norms of the differences between neighbouring pixels in four
  directions (horizontal, vertical, both diagonals), a smoothness prior on synthetic images;
* :func:`kd_loss`: ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, batch mean (Hinton et al. 2015).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def batch_moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the per-channel mean and biased variance of an ``(N, C, ...)`` batch over all but dim 1."""
    if features.ndim < 2:
        raise ValueError(f"need (N, C, ...) features, got shape {tuple(features.shape)}")
    flat = features.transpose(0, 1).reshape(features.shape[1], -1)
    return flat.mean(dim=1), flat.var(dim=1, unbiased=False)


def bn_statistics_loss(features: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """Return ``‖mean − running_mean‖₂ + ‖var − running_var‖₂`` of a BatchNorm layer's input batch."""
    mean, var = batch_moments(features)
    rm = running_mean.to(mean.dtype)
    rv = running_var.to(var.dtype)
    loss: torch.Tensor = torch.linalg.vector_norm(mean - rm) + torch.linalg.vector_norm(var - rv)
    return loss


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Return the sum of the L2 norms of neighbouring-pixel differences in 4 directions of an NCHW batch."""
    if x.ndim != 4:
        raise ValueError(f"need an NCHW batch, got shape {tuple(x.shape)}")
    diffs = (
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    )
    return torch.stack([torch.linalg.vector_norm(d) for d in diffs]).sum()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return ``T² · KL(p_teacher ‖ p_student)`` at temperature ``T``, averaged over the batch."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} differ")
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    p = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * temperature * temperature


def adaptation_weight(index: int, count: int) -> float:
    """Return the weight of the uploaded teacher for the ``index``-th of ``count`` synthesis snapshots.

    ``index / count``: 0 for the first (noise) snapshot, labelled only by the adapted teacher, rising
    linearly towards 1 for the final images (FedISCA's ``alpha``).
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"need 0 <= index < count, got {index}, {count}")
    return index / count

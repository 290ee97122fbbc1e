"""Classification losses for the local trainer: plain or class-balanced cross-entropy, fixed class weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``n / (C · count_c)`` per class (sklearn's "balanced"); 1 for classes absent from ``labels``."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.ones(num_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def class_balanced_loss(labels: np.ndarray, num_classes: int) -> LossFn:
    """Cross-entropy weighted ``n / (C · count_c)`` per class (sklearn's "balanced"); for label-skewed sites.

    Not for DP-SGD: ``F.cross_entropy(weight=)`` divides by the batch's total weight, which couples
    the samples of a batch, and the weights come from the site's private labels. Use
    :func:`weighted_cross_entropy` with public weights there.
    """
    weight = torch.tensor(balanced_class_weights(labels, num_classes), dtype=torch.float32)

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, weight=weight.to(logits.device))

    return loss


def weighted_cross_entropy(class_weights: Sequence[float] | np.ndarray) -> LossFn:
    """``mean_i(w[y_i] · CE_i)``: cross-entropy with fixed class weights, a plain mean of per-sample terms.

    Unlike ``F.cross_entropy(weight=w)`` (which divides by ``Σ_i w[y_i]`` of the batch) each sample's
    term depends on that sample alone, so opacus' per-sample gradients (``loss_reduction="mean"``:
    the batch mean's gradient times the batch size) are exactly ``w[y_i] · ∇CE_i`` and per-sample
    clipping bounds each record's influence. For DP-SGD the weights must be public (fixed in the
    task, or from the coordinator's own data), not computed from the site's records. Note that
    clipping caps ``w[y_i] · ‖∇CE_i‖`` at the clip norm: a weight only acts on samples whose
    weighted gradient stays below it.
    """
    weight = torch.as_tensor(np.asarray(class_weights, dtype=np.float32))
    if weight.ndim != 1 or not bool(torch.all(weight > 0)) or not bool(torch.all(torch.isfinite(weight))):
        raise ValueError(f"class weights must be a 1-d array of finite positive numbers, got {class_weights!r}")

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per_sample = F.cross_entropy(logits, y, reduction="none")
        return (weight.to(logits.device)[y] * per_sample).mean()

    return loss

"""Per-site differential privacy for segmentation: DP-SGD with quantile-based adaptive clipping.

**Scheme** (the paper named in issue 18 is not in our stored corpus, so this implements
Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning with Adaptive
Clipping", applied client-side to per-example gradients inside each site's DP-SGD):

- every optimizer step of a site's local training draws a Poisson sample of its images (rate
  ``q = batch_size / n``), clips each image's gradient to norm ``C`` and adds Gaussian noise
  ``N(0, (σ_Δ C)²)`` to their sum (opacus: per-sample gradients, clipping, noise);
- *adaptive*: the step also releases the number of unclipped gradients plus ``N(0, σ_b²)`` and
  moves ``C ← C · exp(−η (b̃ / E[batch] − γ))``, geometrically toward the ``γ``-quantile of this
  site's per-image gradient norms (:func:`next_clip`). Dividing by the *expected* batch size (not
  the sampled one, which opacus' ``AdaClipDPOptimizer`` uses and which no accountant covers) keeps
  the update a function of released values only. The two releases cost one Gaussian mechanism of
  multiplier ``z = (σ_Δ^-2 + (2σ_b)^-2)^-1/2`` (their Thm 1), which is what the accountant records;
- *fixed*: ``C`` stays at its initial value and ``σ_Δ = z`` (nothing else is released).

**What ε means**: per site, *record-level*, add/remove-one neighbouring over the site's
training set: one record is one PH2 image (one lesion) or one MRI *slice* — a subject contributes
tens of slices, so a subject-level guarantee is weaker (group privacy). ε covers every tensor the
site ever sends (each round's shared weights are post-processing of its DP-SGD steps and of the
public global model); local tensors (FedBN norms) are trained by the same private steps, so
keeping them local is post-processing too. The site's size ``n`` is treated as public (it sets
``q``, as in every DP-SGD analysis).

**Noise calibration**: a site's own ``epsilon`` at ``delta`` (from its firmware profile's
``privacy`` section in the runtime; sites may choose differently) is spread over the
``planned_rounds × steps`` it agrees to: ``z`` is the smallest multiplier whose compositions
stay within it (``noise_multiplier_for_epsilon``). Its accountant (``PrivacyBudget``) refuses a
round that would pass the budget with ``BudgetExhausted`` before any training.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from opacus.optimizers import AdaClipDPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from learning.privacy_accounting import (
    BudgetExhausted,
    PrivacyBudget,
    RdpAccountant,
    noise_multiplier_for_epsilon,
    update_noise_multiplier_for,
)
from learning.segmentation.errors import SegmentationError

__all__ = ["BudgetExhausted", "PrivacyPlan", "QuantileAdaClipOptimizer", "SitePrivacy", "budget_of", "next_clip",
           "plan_privacy"]

Clipping = Literal["adaptive", "fixed"]


@dataclass(frozen=True)
class SitePrivacy:
    """One site's privacy settings.

    Its budget ``epsilon`` at ``delta`` over ``planned_rounds``, and the clipping (``adaptive`` or
    ``fixed`` at ``initial_clip``). ``count_stddev`` (σ_b) defaults to ``max(expected batch / 10, z)``:
    at most ~15 % more gradient noise than fixed clipping.
    """

    epsilon: float
    delta: float = 1e-5
    planned_rounds: int = 20
    clipping: Clipping = "adaptive"
    initial_clip: float = 1.0
    #: γ: 0.1, the best adaptive setting on validation (bench/segment.py --clip-tune: 0.1 > 0.2 > 0.5 > 0.9;
    #: per-image gradients in Poisson batches of ~8, where a lower bound acts as a smaller, steadier step)
    target_quantile: float = 0.1
    clip_lr: float = 0.05  # η: 0.05 beat 0.2 on validation (bench/segment.py --clip-tune; noisy counts of 8)
    min_clip: float = 1e-3
    max_clip: float = 1e3
    count_stddev: float | None = None
    #: scale the learning rate by ``initial_clip / C`` at every step, so that a moving bound changes the
    #: clipping's bias/noise trade-off but not the step size (each clipped gradient moves the model at most
    #: ``lr · initial_clip``); no effect on fixed clipping
    lr_per_clip: bool = False

    def __post_init__(self) -> None:
        """Refuse settings no accountant can honour."""
        problem = None
        if not self.epsilon > 0 or not math.isfinite(self.epsilon):
            problem = "epsilon must be a finite number > 0 (no DP: pass privacy=None)"
        elif not 0 < self.delta < 1:
            problem = "delta must be in (0, 1)"
        elif self.planned_rounds < 1:
            problem = "planned_rounds must be >= 1"
        elif self.clipping not in ("adaptive", "fixed"):
            problem = f"clipping must be adaptive or fixed, got {self.clipping!r}"
        elif not 0 < self.min_clip <= self.initial_clip <= self.max_clip:
            problem = "need 0 < min_clip <= initial_clip <= max_clip"
        elif not 0 < self.target_quantile < 1 or self.clip_lr < 0:
            problem = "target_quantile must be in (0, 1) and clip_lr >= 0"
        elif self.count_stddev is not None and not self.count_stddev > 0:
            problem = "count_stddev must be > 0 (a noiseless count is not private)"
        if problem:
            raise SegmentationError(f"privacy settings refused: {problem}", detail={"epsilon": self.epsilon})


@dataclass(frozen=True)
class PrivacyPlan:
    """The mechanism one site runs at each step.

    Combined multiplier ``z`` (what the accountant records), gradient-noise multiplier
    ``sigma_update`` (σ_Δ), count noise ``count_stddev`` (σ_b; 0 for fixed clipping), sampling rate
    and expected batch size.
    """

    z: float
    sigma_update: float
    count_stddev: float
    sampling_rate: float
    expected_batch: float
    steps_per_round: int

    def as_metrics(self) -> dict[str, float]:
        """The plan as flat metrics (sent with the update)."""
        return {"dp_noise_multiplier": self.z, "dp_update_noise_multiplier": self.sigma_update,
                "dp_count_stddev": self.count_stddev, "dp_sampling_rate": self.sampling_rate}


@functools.lru_cache(maxsize=256)
def _solve_z(epsilon: float, delta: float, q: float, steps: int) -> float:
    return noise_multiplier_for_epsilon(epsilon, delta, q, steps)


def plan_privacy(priv: SitePrivacy, *, n: int, batch_size: int, steps_per_round: int) -> PrivacyPlan:
    """Calibrate the site's noise to its own budget over ``planned_rounds × steps_per_round`` steps."""
    if n < 1 or batch_size < 1 or steps_per_round < 1:
        raise SegmentationError(f"cannot plan DP for n={n}, batch_size={batch_size}, steps={steps_per_round}")
    q = min(1.0, batch_size / n)
    z = _solve_z(float(priv.epsilon), float(priv.delta), q, priv.planned_rounds * steps_per_round)
    expected = q * n
    if priv.clipping == "fixed":
        return PrivacyPlan(z, z, 0.0, q, expected, steps_per_round)
    sigma_b = priv.count_stddev if priv.count_stddev is not None else max(expected / 10.0, z)
    try:
        sigma_update = update_noise_multiplier_for(z, sigma_b)
    except ValueError as exc:
        raise SegmentationError(f"adaptive clipping: {exc}", detail={"z": z, "count_stddev": sigma_b}) from exc
    return PrivacyPlan(z, sigma_update, float(sigma_b), q, expected, steps_per_round)


def next_clip(clip: float, noised_unclipped: float, expected_batch: float, *, target_quantile: float,
              lr: float, min_clip: float, max_clip: float) -> float:
    """Andrew et al.'s geometric step ``C · exp(−lr (b̃/E[batch] − γ))``, kept in ``[min, max]``.

    More unclipped gradients than the target fraction shrink ``C``; fewer grow it.
    """
    frac = noised_unclipped / expected_batch
    return float(min(max_clip, max(min_clip, clip * math.exp(-lr * (frac - target_quantile)))))


class QuantileAdaClipOptimizer(AdaClipDPOptimizer):  # type: ignore[misc]  # opacus is untyped
    """opacus' adaptive-clipping DP optimizer with the clip step of :func:`next_clip`.

    It divides the noised unclipped count by the expected batch size instead of the sampled one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Arguments as ``AdaClipDPOptimizer`` (``noise_multiplier`` = the combined ``z``)."""
        super().__init__(*args, **kwargs)
        self.fractions: list[float] = []  # noised unclipped fraction per step (released values)

    def clip_and_accumulate(self) -> None:
        """As opacus', and an empty Poisson sample clips nothing and adds zero (opacus' own reshape fails on it).

        The step still adds its noise and releases its (noised) count of 0, as the accountant assumes.
        """
        if any(len(g) for g in self.grad_samples):
            super().clip_and_accumulate()
            return
        self.unclipped_num = torch.zeros((), dtype=torch.long) + int(self.__dict__["unclipped_num"])  # opacus keeps a tensor
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            zero = torch.zeros_like(p)
            p.summed_grad = zero if p.summed_grad is None else p.summed_grad + zero
            _mark_as_processed(p.grad_sample)

    def update_max_grad_norm(self) -> None:
        """Move the clip bound from this step's released (noised) count."""
        noised = float(self.unclipped_num)
        self.fractions.append(noised / float(self.expected_batch_size))
        current: float = float(self.__dict__["max_grad_norm"])
        self.max_grad_norm = next_clip(current, noised, float(self.expected_batch_size),
                                       target_quantile=self.target_unclipped_quantile,
                                       lr=self.clipbound_learning_rate, min_clip=self.min_clipbound,
                                       max_clip=self.max_clipbound)


def budget_of(priv: SitePrivacy, events: np.ndarray) -> PrivacyBudget:
    """The site's budget with what it has already released (accountant events, ``(k, 3)``)."""
    return PrivacyBudget(priv.epsilon, priv.delta, RdpAccountant.from_state_array(events))

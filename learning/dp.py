"""Client-side DP-SGD (Abadi et al. 2016) with opacus: per-sample clipping + Gaussian noise.

``make_private`` wraps a model / optimizer / data loader with opacus' ``PrivacyEngine`` (RDP
accountant, Poisson sampling by default) and returns a :class:`PrivateTraining` that trains like
the originals and reports ε. It refuses models with BatchNorm — BatchNorm mixes samples of a
batch, so per-sample gradients (and therefore the privacy guarantee) do not exist — with a
:class:`DPIncompatibleModel` that names the layers; build models with ``norm="group"``.

An optional ``budget`` (anything with ``require(noise_multiplier=, sampling_rate=, steps=, what=)``,
e.g. ``learning.privacy_accounting.PrivacyBudget``, which an agent keeps across rounds) is checked
*before* anything is wrapped: a run whose planned steps would pass the budget raises that
budget's error (``BudgetExhausted``) and training never starts.

Seeds (``seed=``) make sampling and noise reproducible for tests and benchmarks only: noise an
observer can predict protects nothing, so production runs pass ``seed=None``.

Caveat: opacus clips per-sample gradients of the model's loss; a FedProx proximal term added to
the loss outside the model is not per-sample and is ignored by the DP optimizer.

Losses: opacus takes the loss to be the *mean of independent per-sample terms* (it multiplies the
batch gradient by the batch size to get per-sample gradients). Plain cross-entropy is;
``F.cross_entropy(weight=w)`` is not (it divides by the batch's total weight, so one record's
gradient depends on the other records' labels). For class weighting under DP use public weights (never weights computed from the site's own
labels, which no accountant covers): ``class_weighted_clipping`` applies them after clipping
(they keep acting when every gradient is clipped); ``learning.trainer.weighted_cross_entropy``
applies them in the loss, before clipping.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, RandomSampler

from protocol.errors import FedscanError, Reason

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DPIncompatibleModel(FedscanError, ValueError):
    """The model cannot be trained with per-sample gradients (e.g. it has BatchNorm)."""

    reason = Reason.DP_INCOMPATIBLE


class BudgetGuard(Protocol):
    """What refuses DP-SGD steps that would pass a privacy budget (``learning.privacy_accounting.PrivacyBudget``)."""
    def require(self, *, noise_multiplier: float, sampling_rate: float, steps: int = 1,
                what: str = ...) -> float:
        """ε after ``steps`` more steps at this noise and sampling rate; raise if that passes the budget."""


def batchnorm_layers(model: nn.Module) -> list[str]:
    """Names of the model's BatchNorm layers (DP-SGD refuses them: they mix samples)."""
    return [name or "<root>" for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def check_dp_compatible(model: nn.Module) -> None:
    """Raise :class:`DPIncompatibleModel` listing every layer opacus cannot make private."""
    bn = batchnorm_layers(model)
    if bn:
        raise DPIncompatibleModel(
            f"DP-SGD refuses BatchNorm: layers {bn} mix the samples of a batch, so per-sample gradients "
            "(and the privacy guarantee) do not exist. Build the model with norm='group' (GroupNorm)."
        )
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise DPIncompatibleModel(f"opacus cannot train this model privately: {[str(e) for e in errors]}")


@dataclass
class PrivateTraining:
    """What ``make_private`` returns: use these instead of the originals."""

    model: GradSampleModule
    optimizer: DPOptimizer
    data_loader: DataLoader[Any]
    engine: PrivacyEngine
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float

    @property
    def steps(self) -> int:
        """Optimizer steps taken (each one is one composition of the sampled Gaussian mechanism)."""
        return int(sum(n for _z, _q, n in self.engine.accountant.history))

    def epsilon(self, delta: float) -> float:
        """ε at ``delta`` spent by the steps taken so far (opacus' RDP accountant)."""
        if self.steps == 0:
            return 0.0
        return float(self.engine.get_epsilon(delta))

    def unwrap(self) -> nn.Module:
        """The original model (its weights were trained in place)."""
        inner: nn.Module = self.model._module
        return inner


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int | None = None,
    poisson_sampling: bool = True,
    budget: BudgetGuard | None = None,
    planned_steps: int | None = None,
    what: str = "DP-SGD training",
) -> PrivateTraining:
    """Wrap for DP-SGD. ``planned_steps`` (default: one epoch) is what ``budget`` is checked for.

    Raises :class:`DPIncompatibleModel` for BatchNorm models, the budget's error when the planned
    steps would pass it, ``ValueError`` for non-positive ``max_grad_norm`` / negative noise.
    """
    if not max_grad_norm > 0:
        raise ValueError("max_grad_norm must be > 0")
    if noise_multiplier < 0:
        raise ValueError("noise_multiplier must be >= 0")
    check_dp_compatible(model)
    steps_per_epoch = max(1, len(data_loader))
    sample_rate = 1.0 / steps_per_epoch
    if budget is not None:
        budget.require(noise_multiplier=noise_multiplier, sampling_rate=sample_rate,
                       steps=planned_steps if planned_steps is not None else steps_per_epoch,
                       what=what)
    if seed is not None:
        data_loader = DataLoader(
            data_loader.dataset, batch_size=data_loader.batch_size,
            shuffle=isinstance(data_loader.sampler, RandomSampler),
            num_workers=data_loader.num_workers, collate_fn=data_loader.collate_fn,
            generator=torch.Generator().manual_seed(seed),
        )
    for m in model.modules():  # opacus' backward hooks break on in-place activations
        if getattr(m, "inplace", False) is True:
            m.inplace = False  # type: ignore[assignment]
    noise_gen = torch.Generator().manual_seed(seed + 1) if seed is not None else None
    with warnings.catch_warnings():
        # secure_mode (torchcsprng) is not available on edge boxes; OS-seeded torch RNG is used
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
        engine = PrivacyEngine(accountant="rdp")
        gs_model, dp_opt, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=data_loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=poisson_sampling, noise_generator=noise_gen,
        )
    return PrivateTraining(gs_model, dp_opt, dp_loader, engine, float(noise_multiplier), float(max_grad_norm),
                           sample_rate)


def class_weighted_clipping(pt: PrivateTraining, class_weights: Sequence[float] | np.ndarray) -> LossFn:
    """Public per-class weights applied *after* per-sample clipping; returns the loss to train with.

    Weighting the loss (``learning.trainer.weighted_cross_entropy``) scales sample i's gradient
    before opacus clips it, and clipping then caps ``w[y_i]·‖g_i‖`` at C: once gradients are
    larger than C — the usual DP-SGD regime (per-sample norms of the demo CNN start at 4–8) —
    every record contributes exactly C whatever its weight, and the weights do nothing. Here the
    returned loss is plain (unweighted) mean cross-entropy that also records the batch's labels;
    at ``optimizer.step()`` each per-sample gradient is replaced by ``v[y_i]·clip_C(g_i)`` with
    ``v = w / max(w)`` before opacus' own clipping (a no-op then, all norms are ≤ C) and noise.
    Every record still moves the sum by at most C (``v ≤ 1``), so the noise ``z·C`` and the
    accounting are unchanged. ``class_weights`` must be public constants (not derived from this
    site's records): a record's weight depends on its own label only.

    Overall scale: the step is ``mean_i v[y_i]·clip(g_i)`` — the majority class counts ``1/max(w)``
    of the minority's, so the learning rate absorbs the ``1/max(w)`` factor.
    """
    w = np.asarray(class_weights, dtype=np.float64)
    if w.ndim != 1 or not np.all(np.isfinite(w)) or not np.all(w > 0):
        raise ValueError(f"class weights must be a 1-d array of finite positive numbers, got {class_weights!r}")
    v = torch.as_tensor(w / w.max(), dtype=torch.float32)
    optimizer = pt.optimizer
    clip = float(optimizer.max_grad_norm)
    labels: list[torch.Tensor] = []
    opacus_clip = optimizer.clip_and_accumulate

    def clip_weighted_then_accumulate() -> None:
        if not labels:
            raise RuntimeError("class_weighted_clipping: step() without a forward pass through its loss")
        y = labels.pop()
        labels.clear()
        params = [p for p in optimizer.params if getattr(p, "grad_sample", None) is not None]
        if params and len(y):
            samples = [optimizer._get_flat_grad_sample(p) for p in params]
            if any(len(g) != len(y) for g in samples):
                raise RuntimeError("class_weighted_clipping: per-sample gradients do not match the batch's labels "
                                   "(gradient accumulation over several batches is not supported)")
            norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples], dim=1).norm(2, dim=1)
            factor = (clip / (norms + 1e-6)).clamp(max=1.0) * v.to(norms.device)[y.to(norms.device)]
            for p, g in zip(params, samples, strict=True):
                p.grad_sample = g * factor.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
        opacus_clip()

    optimizer.clip_and_accumulate = clip_weighted_then_accumulate  # type: ignore[method-assign, unused-ignore]

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        labels.append(y.detach())
        return F.cross_entropy(logits, y)

    return loss

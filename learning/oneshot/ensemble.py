"""The teacher: the site models as one ensemble, their BatchNorm statistics hooks, and its adapted copy.

* :class:`Ensemble`: the weighted mean of the site models' logits (equal weights by default, as
  FedISCA; the frames' sample counts can weight it instead);
* :class:`BatchNormStatistics`: forward hooks on every BatchNorm layer of every site model that
  collect :func:`learning.oneshot.losses.bn_statistics_loss` of the current batch; the loss is
  the sum over one model's layers, averaged over the models (so its scale does not grow with the
  number of sites);
* :func:`batch_statistics_teacher`: the paper's client-model adaptation. A copy of the teacher
  whose BatchNorm layers normalize with the statistics of the batch they see (train-mode
  BatchNorm with momentum 0, so the copied running statistics never move) instead of the
  statistics of the site's real images: on noise-like synthetic images, whose statistics are
  far from the site's, its soft labels are the more reliable ones.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from learning.oneshot.losses import bn_statistics_loss
from learning.oneshot.models import OneShotError, batchnorm_layers, check_site_models


class Ensemble(nn.Module):
    """The weighted mean of several classifiers' logits (architectures may differ)."""

    weights: torch.Tensor

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        check_site_models(models)
        self.members = nn.ModuleList(models)
        w = torch.ones(len(models)) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
        if w.shape != (len(models),) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise OneShotError(f"need {len(models)} finite non-negative weights with a positive sum, got {weights}")
        self.register_buffer("weights", w / w.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the weighted mean of the members' logits for ``x``."""
        logits = torch.stack([m(x) for m in self.members])
        return torch.einsum("k,knc->nc", self.weights.to(logits.dtype), logits)


class BatchNormStatistics:
    """Hooks collecting the BatchNorm statistics loss of each forward pass through ``models``.

    Use as a context manager (the hooks are removed on exit); :meth:`pop` returns the loss of the
    forward passes since the last call.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        self._models = len(models)
        self._terms: list[torch.Tensor] = []
        self._handles: list[RemovableHandle] = []
        for m in models:
            for layer in batchnorm_layers(m):
                self._handles.append(layer.register_forward_hook(self._hook))

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        assert module.running_mean is not None and module.running_var is not None
        self._terms.append(bn_statistics_loss(inputs[0], module.running_mean, module.running_var))

    def pop(self) -> torch.Tensor:
        """Return the summed loss of the collected layers divided by the number of models, and reset."""
        if not self._terms:
            raise OneShotError("no BatchNorm statistics were collected (no forward pass since the last pop)")
        total = torch.stack(self._terms).sum() / self._models
        self._terms = []
        return total

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> BatchNormStatistics:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Switch off gradients of ``module``'s parameters for the block; restore each one's flag after."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield module
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


def batch_statistics_teacher(teacher: nn.Module) -> nn.Module:
    """Return a frozen copy of ``teacher`` whose BatchNorm layers use each batch's own statistics.

    Everything else is in eval mode; the running statistics are kept unchanged (momentum 0).
    Call it under ``torch.no_grad()``; do not call ``.train()``/``.eval()`` on the copy.
    """
    adapted = copy.deepcopy(teacher).eval()
    for p in adapted.parameters():
        p.requires_grad_(False)
    for layer in batchnorm_layers(adapted):
        layer.momentum = 0.0
        layer.train()
    return adapted

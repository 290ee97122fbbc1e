"""Local training of the autoencoder on a site's normal images (no labels, no lesions).

:func:`train_steps` runs ``steps`` Adam steps on random batches of the site's images with the
FedDis objective (``learning.anomaly.losses``); with both λ zero it is the plain L1 autoencoder.
The site keeps its model and optimizer between rounds: under FedDis the coordinator overwrites
only the shape branch, so the appearance branch and the merger carry on from the site's last round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from learning.anomaly.errors import AnomalyError
from learning.anomaly.losses import feddis_loss, gamma_shift, paint_hyperintensities
from learning.anomaly.model import DisentangledAE, ShareRule, get_named, set_named, shared_names
from protocol.errors import Reason


@dataclass(frozen=True)
class TrainConfig:
    """Local work per round and the objective's weights (``lambda_*`` 0: plain L1 autoencoder)."""

    steps: int = 20
    batch_size: int = 32
    lr: float = 2e-3
    lambda_s: float = 0.1
    lambda_l: float = 0.1
    gamma_low: float = 0.5
    gamma_high: float = 2.0
    paint: int = 0  # max painted bright rectangles per image (0: plain reconstruction)
    paint_width: tuple[int, int] = (2, 8)

    def check(self) -> None:
        """Refuse settings no run can honour (``AnomalyError``)."""
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise AnomalyError(f"steps, batch_size and lr must be positive: {self}")
        if self.paint < 0 or not 1 <= self.paint_width[0] <= self.paint_width[1]:
            raise AnomalyError(f"paint must be ≥ 0 and 1 ≤ paint_width[0] ≤ paint_width[1]: {self}")
        if self.lambda_s < 0 or self.lambda_l < 0 or not 0 < self.gamma_low <= self.gamma_high:
            raise AnomalyError(f"lambdas must be ≥ 0 and 0 < gamma_low ≤ gamma_high: {self}")

    @property
    def plain(self) -> TrainConfig:
        """The same settings with the latent terms off (the plain autoencoder's objective)."""
        return replace(self, lambda_s=0.0, lambda_l=0.0)


def as_batch(images: np.ndarray, size: int) -> torch.Tensor:
    """``(N, H, W)`` float images in [0, 1] as a ``(N, 1, H, W)`` tensor; typed refusal otherwise."""
    arr = np.asarray(images)
    if arr.ndim != 3 or arr.shape[1:] != (size, size):
        raise AnomalyError(f"expected images (N, {size}, {size}), got {arr.shape}", reason=Reason.SHAPE_MISMATCH)
    if not np.isfinite(arr).all():
        raise AnomalyError("images contain non-finite pixels", reason=Reason.NON_FINITE)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[:, None]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The site's optimizer (kept across rounds)."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def train_steps(model: DisentangledAE, opt: torch.optim.Optimizer, images: np.ndarray, cfg: TrainConfig,
                gen: torch.Generator, *, between: Callable[[], object] | None = None) -> dict[str, float]:
    """Run ``cfg.steps`` steps on random batches of ``images`` ``(N, H, W)``; mean loss terms.

    ``between`` is called before every step (a box waits there while inference has it).
    """
    cfg.check()
    data = as_batch(images, model.cfg.size)
    if len(data) == 0:
        raise AnomalyError("no normal images to train on", reason=Reason.BAD_CONFIG)
    latent = bool(cfg.lambda_s or cfg.lambda_l)
    sums = {"loss": 0.0, "recon_l1": 0.0, "scl": 0.0, "lol": 0.0}
    model.train()
    for _ in range(cfg.steps):
        if between is not None:
            between()
        idx = torch.randint(0, len(data), (min(cfg.batch_size, len(data)),), generator=gen)
        x = data[idx]
        out = model(paint_hyperintensities(x, gen, max_rects=cfg.paint, width=cfg.paint_width) if cfg.paint else x)
        shifted = None
        if latent and cfg.lambda_s:
            with torch.no_grad():
                shifted = model.shape_enc(gamma_shift(x, gen, low=cfg.gamma_low, high=cfg.gamma_high))
        parts = feddis_loss(x, out.recon, out.z_shape, out.z_app, shifted, lambda_s=cfg.lambda_s,
                            lambda_l=cfg.lambda_l)
        opt.zero_grad(set_to_none=True)
        parts.total.backward()  # type: ignore[no-untyped-call]
        opt.step()
        for k, v in zip(sums, parts, strict=True):
            sums[k] += float(v.detach())
    return {k: v / cfg.steps for k, v in sums.items()}


def site_round(model: DisentangledAE, opt: torch.optim.Optimizer, global_shared: Mapping[str, np.ndarray],
               images: np.ndarray, cfg: TrainConfig, rule: ShareRule, gen: torch.Generator, *,
               between: Callable[[], object] | None = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Run one site's round (what an agent runs).

    Load the global shared tensors, train locally, return the shared tensors to upload (the rest
    stays in ``model``) and the mean loss terms.
    """
    set_named(model, global_shared)
    metrics = train_steps(model, opt, images, cfg, gen, between=between)
    return get_named(model, shared_names(model, rule)), metrics

"""The segmentation model, its loss and its metric, all from MONAI.

- model: ``monai.networks.nets.UNet`` (2D, residual units, strided convolutions down and
  transposed convolutions up) with two output channels (background, lesion), norm layers chosen
  by :class:`SegModelConfig` — ``instance`` (with learnable affine, the default: per-image
  statistics, no running buffers, accepted by DP-SGD, and its affine parameters are what FedBN
  keeps local), ``group``, or ``batch`` (refused by DP-SGD: it mixes the samples of a batch);
- loss: ``monai.losses.DiceCELoss`` (softmax; the Dice term over the lesion channel only, per
  image, so it is a mean of per-image terms — what per-sample clipping needs);
- metric: ``monai.metrics.DiceMetric`` on the lesion channel, one score per *case* (a PH2 image;
  an MRI subject's slices pooled into one volume, the usual per-subject white-matter-lesion Dice).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses.dice import DiceCELoss
from monai.metrics.meandice import DiceMetric
from monai.networks.nets.unet import UNet
from torch import nn

from learning.segmentation.data import SegSet
from learning.segmentation.errors import SegmentationError

NormKind = Literal["instance", "group", "batch"]


@dataclass(frozen=True)
class SegModelConfig:
    """What builds the U-Net (recorded with results and manifests).

    Input channels, feature widths per level (each level halves the side), residual units per
    block and the norm layers.
    """

    in_channels: int = 1
    channels: tuple[int, ...] = (8, 16, 32, 64)
    num_res_units: int = 1
    norm: NormKind = "instance"

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for bench meta and model manifests)."""
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d


def _norm_arg(norm: NormKind) -> tuple[str, dict[str, Any]]:
    if norm == "instance":
        return ("instance", {"affine": True})
    if norm == "group":
        # MONAI's top up-sampling block normalises the 2 output channels too, so 2 groups at most
        return ("group", {"num_groups": 2})
    if norm == "batch":
        return ("batch", {})
    raise SegmentationError(f"unknown norm {norm!r} (use instance, group or batch)")


def build_unet(cfg: SegModelConfig, *, seed: int | None = None) -> nn.Module:
    """A fresh U-Net; with ``seed`` its initial weights are a function of the seed alone."""
    if len(cfg.channels) < 2:
        raise SegmentationError("a U-Net needs at least two levels")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return UNet(spatial_dims=2, in_channels=cfg.in_channels, out_channels=2, channels=tuple(cfg.channels),
                    strides=(2,) * (len(cfg.channels) - 1), num_res_units=cfg.num_res_units,
                    norm=_norm_arg(cfg.norm))


def seg_loss() -> nn.Module:
    """Dice (lesion channel, per image) + cross-entropy, on logits and one-hot targets."""
    return DiceCELoss(include_background=False, softmax=True, batch=False)


def one_hot(masks: torch.Tensor) -> torch.Tensor:
    """``(N, H, W)`` {0, 1} masks → ``(N, 2, H, W)`` float one-hot (background, lesion)."""
    return F.one_hot(masks.long(), 2).permute(0, 3, 1, 2).to(torch.float32)


def is_norm(module: nn.Module) -> bool:
    """True for normalization layers (batch / instance / group / layer norm)."""
    return isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)


def _batches(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@torch.no_grad()
def predict_masks(model: nn.Module, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """Argmax masks ``(N, H, W)`` uint8 for ``(N, C, H, W)`` images (model in eval mode)."""
    was_training = model.training
    model.eval()
    try:
        out = [model(torch.from_numpy(images[s])).argmax(dim=1).to(torch.uint8).numpy()
               for s in _batches(len(images), batch_size)]
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, *images.shape[2:]), dtype=np.uint8)


def dice_scores(pred: np.ndarray, truth: np.ndarray, cases: np.ndarray) -> dict[str, float]:
    """Lesion Dice per case (MONAI ``DiceMetric``); the masks of one case are stacked into one volume.

    A case whose ground truth is empty has no Dice (NaN, left out of means).
    """
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    out: dict[str, float] = {}
    for case in dict.fromkeys(cases.tolist()):
        idx = np.flatnonzero(cases == case)
        p = one_hot(torch.from_numpy(pred[idx])).permute(1, 0, 2, 3)[None]  # (1, 2, slices, H, W)
        t = one_hot(torch.from_numpy(truth[idx])).permute(1, 0, 2, 3)[None]
        res = metric(p, t)
        if not isinstance(res, torch.Tensor):
            raise TypeError(f"DiceMetric returned {type(res).__name__}, expected a tensor")
        out[str(case)] = float(res[0, 0])
    return out


def evaluate_dice(model: nn.Module, data: SegSet) -> dict[str, float]:
    """Per-case lesion Dice of ``model`` on ``data`` plus ``dice`` (their mean, NaN-aware)."""
    scores = dice_scores(predict_masks(model, data.images), data.masks, data.cases)
    vals = np.asarray(list(scores.values()), dtype=np.float64)
    mean = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return {"dice": mean, **{f"case/{k}": v for k, v in scores.items()}}

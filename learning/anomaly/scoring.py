"""Anomaly maps, image scores and per-site thresholds from the reconstruction residual.

- map: the residual ``x − x̂`` (``abs``, or ``positive`` for hyperintense lesions such as white-
  matter lesions in FLAIR), median-smoothed (``smooth`` px), zero outside the foreground
  (``x > foreground``, eroded by ``erode`` px: the skull-stripped edge reconstructs badly);
- image score: the mean of the top ``top_fraction`` of foreground map pixels (0: mean of all);
- site threshold (:func:`calibrate`): the ``percentile`` of the site's own held-out normal images'
  scores (image verdict), and the ``pixel_percentile`` of their foreground map pixels (mask).

Pure numpy on arrays, except :func:`reconstruct`, which runs the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
from scipy import ndimage

from learning.anomaly.errors import AnomalyError
from learning.anomaly.model import DisentangledAE
from learning.anomaly.train import as_batch


class ResidualSign(StrEnum):
    """Which residual marks an anomaly."""

    ABS = "abs"
    POSITIVE = "positive"  # brighter than the reconstruction (FLAIR hyperintensities)


@dataclass(frozen=True)
class ScoreConfig:
    """How residuals become maps, scores and thresholds (see module doc)."""

    sign: ResidualSign = ResidualSign.ABS
    smooth: int = 3
    foreground: float = -1.0
    erode: int = 0
    top_fraction: float = 0.0
    percentile: float = 95.0
    pixel_percentile: float = 99.0

    def check(self) -> None:
        """Refuse settings no scorer can honour (``AnomalyError``)."""
        if self.smooth < 0 or self.erode < 0 or not 0.0 <= self.top_fraction <= 1.0:
            raise AnomalyError(f"smooth/erode must be ≥ 0 and top_fraction in [0, 1]: {self}")
        if not (0.0 < self.percentile <= 100.0 and 0.0 < self.pixel_percentile <= 100.0):
            raise AnomalyError(f"percentiles must be in (0, 100]: {self}")


@dataclass(frozen=True)
class SiteThresholds:
    """A site's image-score and pixel thresholds, from ``n_normal`` of its own normal images."""

    image: float
    pixel: float
    percentile: float
    pixel_percentile: float
    n_normal: int


def reconstruct(model: DisentangledAE, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """The model's reconstructions ``(N, H, W)`` of ``images`` ``(N, H, W)`` (eval mode, no grad)."""
    x = as_batch(images, model.cfg.size)
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(x[i:i + batch_size]).recon[:, 0].numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.size, model.cfg.size), np.float32)


def foreground_masks(images: np.ndarray, cfg: ScoreConfig) -> np.ndarray:
    """Boolean ``(N, H, W)``: pixels above ``cfg.foreground``, eroded by ``cfg.erode`` px."""
    fg = np.asarray(images) > cfg.foreground
    if cfg.erode:
        fg = ndimage.binary_erosion(fg, structure=np.ones((1, 3, 3), bool), iterations=cfg.erode)
    return np.asarray(fg, dtype=bool)


def anomaly_maps(images: np.ndarray, recon: np.ndarray, cfg: ScoreConfig) -> np.ndarray:
    """Per-pixel anomaly maps ``(N, H, W)`` ≥ 0 from images and their reconstructions."""
    cfg.check()
    if np.shape(images) != np.shape(recon):
        raise AnomalyError(f"images {np.shape(images)} and reconstructions {np.shape(recon)} differ")
    diff = np.asarray(images, np.float32) - np.asarray(recon, np.float32)
    res = np.abs(diff) if ResidualSign(cfg.sign) is ResidualSign.ABS else np.clip(diff, 0.0, None)
    if cfg.smooth > 1:
        res = ndimage.median_filter(res, size=(1, cfg.smooth, cfg.smooth), mode="nearest")
    return np.where(foreground_masks(images, cfg), res, 0.0).astype(np.float32)


def image_scores(maps: np.ndarray, images: np.ndarray, cfg: ScoreConfig) -> np.ndarray:
    """One score per image: mean of its top ``top_fraction`` foreground map pixels (0: all of them)."""
    fg = foreground_masks(images, cfg)
    out = np.zeros(len(maps), np.float64)
    for i, (m, f) in enumerate(zip(maps, fg, strict=True)):
        vals = m[f]
        if vals.size == 0:
            continue
        if cfg.top_fraction > 0:
            k = max(1, round(cfg.top_fraction * vals.size))
            vals = np.partition(vals, vals.size - k)[vals.size - k:]
        out[i] = float(vals.mean())
    return out


def score_images(model: DisentangledAE, images: np.ndarray, cfg: ScoreConfig) -> tuple[np.ndarray, np.ndarray]:
    """Maps and image scores of ``images`` under ``model``."""
    maps = anomaly_maps(images, reconstruct(model, images), cfg)
    return maps, image_scores(maps, images, cfg)


def thresholds_from(scores: np.ndarray, maps: np.ndarray, images: np.ndarray, cfg: ScoreConfig) -> SiteThresholds:
    """Thresholds from normal images' scores and maps (pure: see :func:`calibrate`)."""
    cfg.check()
    if len(scores) == 0:
        raise AnomalyError("a site threshold needs at least one normal image")
    fg = foreground_masks(images, cfg)
    pix = maps[fg]
    return SiteThresholds(image=float(np.percentile(scores, cfg.percentile)),
                          pixel=float(np.percentile(pix, cfg.pixel_percentile)) if pix.size else 0.0,
                          percentile=cfg.percentile, pixel_percentile=cfg.pixel_percentile, n_normal=len(scores))


def calibrate(model: DisentangledAE, normal_images: np.ndarray, cfg: ScoreConfig) -> SiteThresholds:
    """A site's thresholds from its own held-out normal images under the model it serves."""
    maps, scores = score_images(model, normal_images, cfg)
    return thresholds_from(scores, maps, normal_images, cfg)

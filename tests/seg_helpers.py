"""Tiny synthetic segmentation sites for the segmentation tests (bright discs on noise)."""

from __future__ import annotations

import numpy as np

from learning.segmentation.data import PH2, SegSet, SiteData
from learning.segmentation.model import SegModelConfig

TINY = SegModelConfig(in_channels=1, channels=(4, 8), num_res_units=1, norm="instance")


def disc_set(n: int, size: int = 16, seed: int = 0, modality: str = PH2) -> SegSet:
    """``n`` images with one bright disc each (the lesion) on a dim noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((n, 1, size, size), np.float32)
    masks = np.empty((n, size, size), np.uint8)
    for i in range(n):
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        r = rng.integers(size // 8 + 1, size // 4 + 1)
        m = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
        images[i, 0] = np.clip(0.2 + 0.5 * m + rng.normal(0, 0.05, (size, size)), 0, 1)
        masks[i] = m
    return SegSet(images, masks, np.asarray([f"case{i}" for i in range(n)]), modality, None)


def disc_site(name: str = "site-a", n: int = 16, seed: int = 0, modality: str = PH2) -> SiteData:
    """A training site of :func:`disc_set` images."""
    return SiteData(name, modality, disc_set(n, seed=seed, modality=modality))

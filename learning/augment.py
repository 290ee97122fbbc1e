"""Training-time augmentation with MONAI's array transforms: flips, 90° rotations, crops, colour jitter.

Only training sees these; the deterministic preprocessing (decode, resize, colour normalization)
stays the profile's ``preprocessing`` steps, identical in training and serving. Which
augmentations suit a modality is the device profile's business (:class:`AugmentSpec`):
dermoscopy has no up or down, so flips and 90° rotations are label-preserving, and colour gains
per channel imitate the white balance of different dermatoscopes; a chest X-ray is neither
flipped nor rotated (the heart is on the left).

:class:`BatchAugment` works on a batch of images in [0, 1] (before normalization), one image at
a time through a MONAI ``Compose``, and is deterministic: the same batch and seed give the same
pixels (the trainer passes a seed derived from its own seed and the step number, so a run
resumed from a checkpoint augments exactly as an uninterrupted one). MONAI's metadata tracking
is switched off while it runs (plain tensors, about 3x faster) and restored afterwards.

MONAI is imported when a pipeline is first built, not with this module: importing it costs 2-3 s
of CPU (it pulls scipy and matplotlib), and every agent and coordinator process imports this
module through the trainer although most profiles (chest X-rays) augment nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from firmware.profile import AugmentSpec

if TYPE_CHECKING:
    from monai.transforms.compose import Compose

__all__ = ["DERMOSCOPY", "Augment", "AugmentSpec", "BatchAugment", "build_augment"]

Augment = Callable[[torch.Tensor, int], torch.Tensor]
"""``(x, seed) -> x'``: a batch ``(N, C, H, W)`` in [0, 1] to an augmented batch of the same shape."""


DERMOSCOPY = AugmentSpec(flip=True, rotate90=True, crop=0.8, brightness=0.1, contrast=0.2, colour=0.1)
"""Dermoscopy: every symmetry of the square, crops of 80-100 %, mild colour jitter."""


@contextmanager
def _plain_tensors() -> Iterator[None]:
    from monai.data.meta_obj import get_track_meta, set_track_meta

    before = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(before)


def _transforms(spec: AugmentSpec, size: tuple[int, int]) -> list[Any]:
    from monai.transforms.croppad.array import RandSpatialCrop
    from monai.transforms.intensity.array import RandAdjustContrast, RandScaleIntensity, RandShiftIntensity
    from monai.transforms.spatial.array import RandFlip, RandRotate90, Resize

    ts: list[Any] = []
    if spec.crop < 1.0:
        lo = tuple(max(1, round(spec.crop * s)) for s in size)
        ts += [RandSpatialCrop(roi_size=lo, max_roi_size=size, random_size=True, random_center=True),
               Resize(size, mode="bilinear", anti_aliasing=False)]
    if spec.flip:
        ts += [RandFlip(prob=0.5, spatial_axis=0), RandFlip(prob=0.5, spatial_axis=1)]
    if spec.rotate90:
        ts.append(RandRotate90(prob=0.75, max_k=3))  # k uniform in {1, 2, 3}: 0..3 quarter turns equally likely
    if spec.colour > 0:
        ts.append(RandScaleIntensity(factors=spec.colour, prob=spec.prob, channel_wise=True))
    if spec.brightness > 0:
        ts.append(RandShiftIntensity(offsets=spec.brightness, prob=spec.prob))
    if spec.contrast > 0:
        ts.append(RandAdjustContrast(prob=spec.prob, gamma=(1.0 - spec.contrast, 1.0 + spec.contrast)))
    return ts


class BatchAugment:
    """A seeded, per-image MONAI pipeline over NCHW batches in [0, 1]; output clipped back to [0, 1]."""

    def __init__(self, spec: AugmentSpec) -> None:
        """Keep the spec; the MONAI pipeline is built per image size on first use."""
        self.spec = spec
        self._by_size: dict[tuple[int, int], Compose] = {}

    def _compose(self, size: tuple[int, int]) -> Compose:
        from monai.transforms.compose import Compose

        if size not in self._by_size:
            self._by_size[size] = Compose(_transforms(self.spec, size))
        return self._by_size[size]

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """Augment every image of ``x`` ``(N, C, H, W)``; the same ``x`` and ``seed`` give the same output."""
        if x.ndim != 4:
            raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
        if not self.spec.active or len(x) == 0:
            return x
        size = (int(x.shape[2]), int(x.shape[3]))
        compose = self._compose(size)
        compose.set_random_state(seed=seed % (2**32))
        with _plain_tensors():
            out = torch.stack([torch.as_tensor(compose(img)) for img in x])
        return out.to(x.dtype).clamp_(0.0, 1.0)


def build_augment(spec: AugmentSpec | None) -> Augment | None:
    """Return the batch augmentation for ``spec``, or None when nothing is switched on."""
    return BatchAugment(spec) if spec is not None and spec.active else None

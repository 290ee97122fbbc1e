"""The serving output of the segmentation job: one image → lesion mask, lesion area, timings.

:func:`segment_image` runs the training preprocessing (``learning.segmentation.data``: PIL luma +
antialiased resize for dermoscopy; per-image brain-percentile scaling + bilinear resize for FLAIR),
the model, then brings the lesion probability back to the input's own size (bilinear) and
thresholds it at 0.5, so the mask and the area are in the *input's* pixels. With the input's
pixel spacing (DICOM ``PixelSpacing``, NIfTI zooms; row, column in mm) the area is also given in
mm². A FLAIR slice served alone is scaled by its own brain pixels; training scaled whole volumes
(``learning.brain_mri.normalise_volume``), so pass the volume's 99.5th brain percentile as
``flair_scale`` for identical pixels. :func:`mask_png` encodes a mask for the HTTP response.

Masks on brain FLAIR were learnt from automatic (DLWMLS) masks, not clinicians' — the result
carries that note.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from learning.datasets import DatasetError
from learning.segmentation.data import MASKS_NOTE, MODALITIES, PH2, PH2_NOTE, preprocess_rgb
from learning.segmentation.errors import SegmentationError
from protocol.errors import Reason


@dataclass(frozen=True)
class Segmentation:
    """What the box returns for one image.

    The mask ``(H, W)`` uint8 {0, 1} at the input's size, the lesion area in pixels and (with a
    spacing) in mm², the model version, the note on where the training masks came from, timings.
    """

    mask: np.ndarray
    area_px: int
    area_mm2: float | None
    spacing_mm: tuple[float, float] | None
    model_version: str
    note: str
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def lesion_fraction(self) -> float:
        """Share of the image's pixels marked as lesion."""
        return float(self.area_px) / float(self.mask.size)


def preprocess_flair(slice2d: np.ndarray, *, size: int, channels: int, scale: float | None = None) -> np.ndarray:
    """Turn one FLAIR slice ``(H, W)`` into ``(channels, size, size)`` float32 in [0, 1].

    Divided by ``scale`` (default: the 99.5th percentile of its non-zero pixels, as
    ``brain_mri.normalise_volume``), clipped, bilinear resize (as ``learning.brain_mri``).
    """
    x = np.asarray(slice2d, dtype=np.float32)
    if x.ndim != 2 or min(x.shape) < 2 or not np.all(np.isfinite(x)):
        raise DatasetError(f"expected a finite (H, W) FLAIR slice, got shape {x.shape}")
    if scale is None:
        brain = x[x > 0]
        scale = float(np.percentile(brain, 99.5)) if brain.size else 1.0
    x = np.clip(x / max(float(scale), 1e-6), 0.0, 1.0)
    t = F.interpolate(torch.from_numpy(x)[None, None], size=(size, size), mode="bilinear", align_corners=False)
    return np.repeat(t[0].numpy(), channels, axis=0).astype(np.float32)


def _check_spacing(spacing_mm: tuple[float, float] | None) -> tuple[float, float] | None:
    if spacing_mm is None:
        return None
    sp = tuple(float(s) for s in spacing_mm)
    if len(sp) != 2 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise DatasetError(f"pixel spacing must be two positive numbers (row, column mm), got {spacing_mm!r}")
    return (sp[0], sp[1])


@torch.no_grad()
def segment_image(model: nn.Module, image: np.ndarray, *, modality: str, size: int, channels: int,
                  spacing_mm: tuple[float, float] | None = None, model_version: str = "unknown",
                  flair_scale: float | None = None) -> Segmentation:
    """Segment one image of ``modality`` (``dermoscopy``: uint8 RGB/grey; ``brain_flair``: a 2D slice)."""
    if modality not in MODALITIES:
        raise DatasetError(f"unknown modality {modality!r}; known: {list(MODALITIES)}")
    spacing = _check_spacing(spacing_mm)
    t0 = time.perf_counter()
    if modality == PH2:
        x = preprocess_rgb(image, size=size, channels=channels)
    else:
        x = preprocess_flair(image, size=size, channels=channels, scale=flair_scale)
    h, w = np.asarray(image).shape[:2]
    t1 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        prob = torch.softmax(model(torch.from_numpy(x)[None]), dim=1)[:, 1:2]
    finally:
        model.train(was_training)
    t2 = time.perf_counter()
    full = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    mask = (full >= 0.5).to(torch.uint8).numpy()
    area = int(mask.sum())
    t3 = time.perf_counter()
    note = PH2_NOTE if modality == PH2 else f"trained on {MASKS_NOTE}"
    return Segmentation(mask, area, area * spacing[0] * spacing[1] if spacing else None, spacing, model_version,
                        note, {"preprocess_ms": (t1 - t0) * 1e3, "inference_ms": (t2 - t1) * 1e3,
                               "postprocess_ms": (t3 - t2) * 1e3})


def mask_png(mask: np.ndarray) -> bytes:
    """A {0, 1} mask as an 8-bit greyscale PNG (255 = lesion, the PH2 convention)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise SegmentationError(f"mask must be 2D, got shape {m.shape}", reason=Reason.BAD_SHAPE)
    buf = io.BytesIO()
    Image.fromarray(((m > 0) * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["Segmentation", "mask_png", "preprocess_flair", "segment_image"]

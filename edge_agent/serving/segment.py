"""Serving the segmentation job: the box's current mask model and one image → mask + lesion area.

:class:`SegmentServer` holds the segmentation model the box serves: built on activation of a
``segment`` manifest (verified and smoke-tested by the installer) with the site's own local
tensors put back (``edge_agent.segment_training``: FedBN's normalization layers). :meth:`segment`
runs :func:`learning.segmentation.serving.segment_image` — the training preprocessing, the model,
the mask back at the input's size, the lesion area in pixels and, with the pixel spacing, in mm².

The box's modality comes from its firmware profile: ``MR`` boxes serve brain FLAIR slices (masks
learnt from automatic DLWMLS masks: every answer says so), every other box dermoscopy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from edge_agent.serving.job_slot import JobModelSlot
from edge_agent.serving.model import ServingError
from learning.segmentation.data import MRI, PH2
from learning.segmentation.serving import Segmentation, segment_image
from protocol.codec import Tensors
from protocol.errors import Reason
from protocol.jobs import Job
from protocol.manifest import Manifest

__all__ = ["SegmentServer", "modality_of_profile"]

ModelBuilder = Callable[[Manifest, Tensors], nn.Module]


def modality_of_profile(dicom_modality: str) -> str:
    """The segmentation modality a box serves from its profile's DICOM modality code."""
    return MRI if dicom_modality.upper() == "MR" else PH2


@dataclass(frozen=True)
class _Served:
    manifest: Manifest
    model: nn.Module


class SegmentServer(JobModelSlot[_Served]):
    """The segmentation model this box serves (swapped atomically on activation)."""

    def __init__(self, build: ModelBuilder, *, modality: str) -> None:
        """``build(manifest, tensors)`` makes the served model (global tensors + the site's local ones)."""
        super().__init__()
        self.build, self.modality = build, modality

    def activate(self, manifest: Manifest, tensors: Tensors) -> bool:
        """Serve ``manifest`` if it is a segmentation model; return whether it was taken."""
        if manifest.job != Job.SEGMENT:
            return False
        model = self.build(manifest, tensors).eval()
        self._current = _Served(manifest, model)
        return True

    def segment(self, image: np.ndarray, *, spacing_mm: tuple[float, float] | None = None,
                flair_scale: float | None = None) -> Segmentation:
        """Segment one image (``ServingError`` ``not_ready`` before the first segmentation model)."""
        cur = self._current
        if cur is None:
            raise ServingError("no segmentation model is loaded yet", reason=Reason.NOT_READY)
        spec = cur.manifest.input
        with self._lock:
            return segment_image(cur.model, image, modality=self.modality, size=spec.height, channels=spec.channels,
                                 spacing_mm=spacing_mm, model_version=cur.manifest.version, flair_scale=flair_scale)

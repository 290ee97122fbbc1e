"""Serving the anomaly job: the box's current autoencoder, its own thresholds, one image → score + map.

:class:`AnomalyServer` holds the anomaly model the box serves: on activation of an ``anomaly``
manifest (verified and smoke-tested by the installer) it builds the global model with this site's
own appearance branch put back (``edge_agent.anomaly_training``). The site's thresholds belong to
the model it serves: when the box has its held-out normal images (``calibration``) it recalibrates
them on the activated model; otherwise it uses the ones its last round calibrated. :meth:`detect`
runs :func:`learning.anomaly.serving.detect`: score, the site threshold's verdict, the map at the
input's size, timings.

A box whose profile's modality is ``MR`` serves brain FLAIR slices: "normal" there means slices
without lesions in automatic (DLWMLS) masks, not masks drawn by hand, and every answer says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_agent.anomaly_training import AnomalyTrainer
from edge_agent.serving.job_slot import JobModelSlot
from edge_agent.serving.model import ServingError
from learning.anomaly.errors import AnomalyError
from learning.anomaly.model import DisentangledAE
from learning.anomaly.scoring import ScoreConfig, SiteThresholds
from learning.anomaly.serving import Detection, detect
from learning.brain_mri import MASKS_NOTE
from protocol.codec import Tensors
from protocol.errors import Reason
from protocol.jobs import Job
from protocol.manifest import Manifest

__all__ = ["AnomalyServer", "note_for_modality"]

log = logging.getLogger("fedscan.agent.anomaly")

BASE_NOTE = ("score: reconstruction residual of an autoencoder trained on normal images only; verdict: above this "
             "site's threshold, from its own held-out normal images")


def note_for_modality(dicom_modality: str) -> str:
    """What every answer of a box of this modality says about its model."""
    if dicom_modality.upper() == "MR":
        return f"{BASE_NOTE}; brain FLAIR: 'normal' slices are those without lesions in {MASKS_NOTE}"
    return BASE_NOTE


@dataclass(frozen=True)
class _Served:
    manifest: Manifest
    model: DisentangledAE
    thresholds: SiteThresholds | None
    score: ScoreConfig


class AnomalyServer(JobModelSlot[_Served]):
    """The anomaly model this box serves (swapped atomically on activation)."""

    def __init__(self, trainer: AnomalyTrainer, *, note: str,
                 calibration: Callable[[], np.ndarray | None] | None = None) -> None:
        """Serve with ``trainer``'s site state; ``calibration()`` gives the held-out normals (None: none here)."""
        super().__init__()
        self.trainer, self.note, self.calibration = trainer, note, calibration

    def activate(self, manifest: Manifest, tensors: Tensors) -> bool:
        """Serve ``manifest`` if it is an anomaly model; return whether it was taken."""
        if manifest.job != Job.ANOMALY:
            return False
        normals = self.calibration() if self.calibration is not None else None
        model, thresholds, score = self.trainer.serving_model(manifest, tensors, normals)
        if thresholds is None:
            log.warning("anomaly model %s active without a site threshold: /v1/anomaly answers not_ready until this "
                        "box has calibrated on its own normal images", manifest.version)
        self._current = _Served(manifest, model, thresholds, score)
        return True

    def detect(self, image: np.ndarray) -> Detection:
        """Score one greyscale image (``ServingError`` ``not_ready`` without a model or a site threshold)."""
        cur = self._current
        if cur is None:
            raise ServingError("no anomaly model is loaded yet", reason=Reason.NOT_READY)
        if cur.thresholds is None:
            raise ServingError(f"model {cur.manifest.version} has no threshold of this site yet (it calibrates on "
                               "its own held-out normal images)", reason=Reason.NOT_READY)
        with self._lock:
            try:
                return detect(cur.model, image, cur.thresholds, cur.score, model_version=cur.manifest.version,
                              note=self.note)
            except AnomalyError:
                raise
            except Exception as exc:  # the model's own failure: a refusal with a reason, never a crash of the box
                raise ServingError(f"anomaly inference failed: {type(exc).__name__}",
                                   reason=Reason.INFERENCE_FAILED) from exc

"""The serving output of the anomaly job: one image → anomaly score, the site's verdict, a map.

:func:`detect` scales the image to [0, 1] (uint8 ÷ 255; float images must already be in [0, 1]),
resizes it to the model's input (bilinear), reconstructs it with the model the site serves,
builds the anomaly map and image score exactly as in training-time evaluation
(``learning.anomaly.scoring``) and compares the score with the site's own threshold (from its
held-out normal images). The map comes back at the input's size. :func:`map_png` encodes a map as
8-bit greyscale with a fixed scale: 128 is the site's pixel threshold, 255 twice it or more, so a
viewer sees "above threshold" as the brighter half.

A model trained on brain FLAIR learnt "normal" from slices whose lesion masks are automatic
(DLWMLS), not drawn by hand; the result carries the dataset's note.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from learning.anomaly.errors import AnomalyError
from learning.anomaly.model import DisentangledAE
from learning.anomaly.scoring import ScoreConfig, SiteThresholds, anomaly_maps, image_scores, reconstruct
from protocol.errors import Reason


@dataclass(frozen=True)
class Detection:
    """What the box returns for one image."""

    score: float
    threshold: float
    anomalous: bool
    anomaly_map: np.ndarray
    pixel_threshold: float
    model_version: str
    note: str
    timings_ms: dict[str, float] = field(default_factory=dict)


def _to_unit(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise AnomalyError(f"expected one 2D greyscale image, got shape {arr.shape}", reason=Reason.SHAPE_MISMATCH)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    x = arr.astype(np.float32)
    if not np.isfinite(x).all():
        raise AnomalyError("image contains non-finite pixels", reason=Reason.NON_FINITE)
    if x.min() < 0.0 or x.max() > 1.0:
        raise AnomalyError(f"float images must be in [0, 1], got [{x.min():.3g}, {x.max():.3g}]",
                           reason=Reason.BAD_CONFIG)
    return x


def _resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def detect(model: DisentangledAE, image: np.ndarray, thresholds: SiteThresholds, score: ScoreConfig, *,
           model_version: str, note: str) -> Detection:
    """Score one image with the site's model and threshold (see module doc)."""
    t0 = time.perf_counter()
    x = _to_unit(image)
    small = np.clip(_resize(x, (model.cfg.size, model.cfg.size)), 0.0, 1.0)[None]
    t1 = time.perf_counter()
    recon = reconstruct(model, small)
    t2 = time.perf_counter()
    maps = anomaly_maps(small, recon, score)
    s = float(image_scores(maps, small, score)[0])
    full = np.clip(_resize(maps[0], x.shape), 0.0, None)
    t3 = time.perf_counter()
    return Detection(s, thresholds.image, bool(s > thresholds.image), full, thresholds.pixel, model_version, note,
                     {"preprocess_ms": (t1 - t0) * 1e3, "inference_ms": (t2 - t1) * 1e3,
                      "postprocess_ms": (t3 - t2) * 1e3})


def map_png(anomaly_map: np.ndarray, pixel_threshold: float) -> bytes:
    """The map as 8-bit greyscale PNG: 128 = the pixel threshold, 255 = twice it or more."""
    m = np.asarray(anomaly_map, np.float64)
    if m.ndim != 2:
        raise AnomalyError(f"anomaly map must be 2D, got shape {m.shape}", reason=Reason.SHAPE_MISMATCH)
    scale = 2.0 * pixel_threshold if pixel_threshold > 0 else max(float(m.max()), 1e-12)
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round(m / scale * 255.0), 0, 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()

"""``POST /v1/anomaly``: the anomaly job's route (``protocol.jobs.SERVING_ENDPOINT``).

One image in (PNG, JPEG or DICOM; a multipart ``file`` part or the raw body, as ``/v1/diagnose``),
out: the anomaly score, this site's threshold and its verdict (``anomalous``: score above the
threshold), the anomaly map as a PNG (base64, 8-bit grey at the input's own size, 128 = the site's
pixel threshold, 255 = twice it or more — as ``/v1/segment`` returns its mask), the model version,
a note on what the score means (and, on brain FLAIR boxes, that "normal" came from automatic
masks) and timings. Pixels: 8-bit images are divided by 255; any other depth (e.g. a 16-bit DICOM)
is scaled by its own non-zero pixels' 99.5th percentile (as the FLAIR volumes were for training);
colour images are averaged to grey.

Same bearer tokens and audit as diagnosis; every refusal has a reason: 409 ``job_mismatch`` on a
box of another job (the router is mounted there with no server, and names the box's own route),
503 ``not_ready`` before the first anomaly model or before the site has a threshold, 4xx for
images it cannot read or score.
"""

from __future__ import annotations

import base64
import time

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from edge_agent.api.deps import Caller, Service, request_id
from edge_agent.api.errors import http_error_for, http_status
from edge_agent.api.routes import _DIAGNOSE_BODY, _ERRORS, _read_body
from edge_agent.audit import AuditRecord
from edge_agent.serving.anomaly import AnomalyServer
from edge_agent.serving.diagnosis import decode_or_refuse
from firmware.profile import InputSection
from learning.anomaly.serving import map_png
from learning.dicom import Image, ImageRejected
from protocol.errors import FedscanError, Reason
from protocol.jobs import Job, serving_endpoint

__all__ = ["AnomalyOut", "anomaly_router", "grey_pixels"]


class AnomalyTimingsOut(BaseModel):
    """Where the time went, in milliseconds."""

    decode_ms: float
    preprocess_ms: float
    inference_ms: float
    postprocess_ms: float
    total_ms: float


class AnomalyOut(BaseModel):
    """One image's anomaly score, the site's verdict and the map."""

    model_version: str
    score: float = Field(ge=0, description="mean of the image's highest anomaly-map pixels")
    threshold: float = Field(description="this site's image threshold (a percentile of its normal images' scores)")
    anomalous: bool = Field(description="score above this site's threshold")
    pixel_threshold: float = Field(description="this site's map threshold: 128 in the PNG")
    map_png: str = Field(description="base64 PNG, 8-bit grey at the input's size; 128 = pixel threshold, "
                                     "255 = twice it or more")
    height: int
    width: int
    note: str = Field(description="what the score means and where 'normal' came from")
    timings: AnomalyTimingsOut


def grey_pixels(img: Image) -> np.ndarray:
    """The ``(H, W)`` greyscale array :func:`learning.anomaly.serving.detect` takes (see the module doc)."""
    if img.frames != 1:
        raise ImageRejected(f"one frame per request, got {img.frames}", reason=Reason.MULTI_FRAME)
    px = np.asarray(img.pixels[0])
    if min(px.shape[:2]) < 2:
        raise ImageRejected(f"an image of at least 2x2 pixels, got {px.shape[0]}x{px.shape[1]}",
                            reason=Reason.WRONG_SIZE)
    if px.shape[2] not in (1, 3):
        raise ImageRejected(f"a greyscale or RGB image, got {px.shape[2]} channels", reason=Reason.WRONG_CHANNELS)
    if px.dtype == np.uint8:
        return np.asarray(px[..., 0]) if px.shape[2] == 1 else np.round(px.mean(axis=2)).astype(np.uint8)
    x = px.astype(np.float32).mean(axis=2)
    if not np.isfinite(x).all():
        raise ImageRejected("the image has non-finite pixels", reason=Reason.UNSUPPORTED_PIXEL_FORMAT)
    x = x - min(float(x.min()), 0.0)
    bright = x[x > 0]
    scale = float(np.percentile(bright, 99.5)) if bright.size else 1.0
    out: np.ndarray = np.clip(x / max(scale, 1e-6), 0.0, 1.0).astype(np.float32)
    return out


def anomaly_router(server: AnomalyServer | None, accept: InputSection, *, job: Job = Job.ANOMALY) -> APIRouter:
    """The ``/v1/anomaly`` route over ``server``; with no server (a box of ``job``) it answers ``job_mismatch``."""
    router = APIRouter(tags=["anomaly"])

    @router.post(serving_endpoint(Job.ANOMALY), response_model=AnomalyOut, responses=_ERRORS,
                 openapi_extra=_DIAGNOSE_BODY,
                 summary="Anomaly score, verdict and map of one image (PNG, JPEG or DICOM; multipart 'file' or raw body)")
    async def anomaly(request: Request, caller: Caller, service: Service) -> AnomalyOut:
        """Score one uploaded image; every answer and refusal is audited with its request id."""
        t0 = time.perf_counter()
        rid = request_id(request)
        version = server.version if server is not None else None

        def audit_refusal(reason: str | None, status: int) -> None:
            service.audit.append(AuditRecord(event="rejected", caller=caller, source="http", reason=reason,
                                             status_code=status, model_version=version, request_id=rid))

        try:
            if server is None:
                raise FedscanError(f"this box serves {job} models: use {serving_endpoint(job)}",
                                   reason=Reason.JOB_MISMATCH)
            try:
                data, ctype = await _read_body(request, accept.max_bytes)
            except HTTPException as exc:
                audit_refusal(exc.detail.get("reason") if isinstance(exc.detail, dict) else None, exc.status_code)
                raise
            img = decode_or_refuse(data, ctype, accept)
            pixels = grey_pixels(img)
            t1 = time.perf_counter()
            for hook in list(service.on_inference_request):  # training yields to a clinician's request
                hook()
            det = server.detect(pixels)
        except FedscanError as exc:
            audit_refusal(exc.reason, http_status(exc))
            raise http_error_for(exc) from exc
        png = map_png(det.anomaly_map, det.pixel_threshold)
        service.audit.append(AuditRecord(event="anomaly", caller=caller, source="http",
                                         model_version=det.model_version, request_id=rid))
        h, w = det.anomaly_map.shape
        return AnomalyOut(
            model_version=det.model_version, score=det.score, threshold=det.threshold, anomalous=det.anomalous,
            pixel_threshold=det.pixel_threshold, map_png=base64.b64encode(png).decode(), height=int(h), width=int(w),
            note=det.note,
            timings=AnomalyTimingsOut(decode_ms=(t1 - t0) * 1e3, preprocess_ms=det.timings_ms["preprocess_ms"],
                                      inference_ms=det.timings_ms["inference_ms"],
                                      postprocess_ms=det.timings_ms["postprocess_ms"],
                                      total_ms=(time.perf_counter() - t0) * 1e3))

    return router

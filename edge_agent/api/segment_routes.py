"""``POST /v1/segment``: the segmentation job's route (``protocol.jobs.SERVING_ENDPOINT``).

One image in (PNG, JPEG or DICOM; a multipart ``file`` part or the raw body, as ``/v1/diagnose``),
the lesion mask out as a PNG (base64, 255 = lesion, at the input's own size), the lesion area in
pixels and — when the request gives the pixel spacing (``spacing_row_mm`` and ``spacing_col_mm``)
or the DICOM file carries ``PixelSpacing`` — in mm², the model version, the note on where the
training masks came from, and timings. Same bearer tokens and audit as diagnosis; every refusal
has a reason: 409 ``job_mismatch`` when the box serves a model of another job, 503 ``not_ready``
before its first segmentation model, 4xx for images it cannot read.
"""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from edge_agent.api.deps import Caller, Service, request_id
from edge_agent.api.errors import http_error_for, http_status
from edge_agent.api.routes import _DIAGNOSE_BODY, _ERRORS, _read_body
from edge_agent.audit import AuditRecord
from edge_agent.serving.diagnosis import decode_or_refuse
from edge_agent.serving.segment import SegmentServer
from firmware.profile import InputSection
from learning.dicom import Image, ImageRejected
from learning.segmentation.data import PH2
from learning.segmentation.serving import mask_png
from protocol.errors import FedscanError, Reason
from protocol.jobs import Job, serving_endpoint

__all__ = ["SegmentOut", "segment_router"]


class SegmentTimingsOut(BaseModel):
    """Where the time went, in milliseconds."""

    decode_ms: float
    preprocess_ms: float
    inference_ms: float
    postprocess_ms: float
    total_ms: float


class SegmentOut(BaseModel):
    """One image's lesion segmentation."""

    model_version: str
    modality: str = Field(description="dermoscopy or brain_flair")
    mask_png: str = Field(description="base64 PNG, 8-bit grey, 255 = lesion, at the input image's size")
    height: int
    width: int
    area_px: int = Field(ge=0, description="lesion pixels in the input image")
    area_mm2: float | None = Field(None, description="lesion area in mm², when the pixel spacing is known")
    spacing_mm: tuple[float, float] | None = Field(None, description="(row, column) pixel spacing used, mm")
    lesion_fraction: float = Field(ge=0, le=1)
    note: str = Field(description="where the masks the model learnt from came from")
    timings: SegmentTimingsOut


def _pixels(img: Image, modality: str) -> np.ndarray:
    """The array :func:`learning.segmentation.serving.segment_image` takes for ``modality``."""
    if img.frames != 1:
        raise ImageRejected(f"one frame per request, got {img.frames}", reason=Reason.MULTI_FRAME)
    px: np.ndarray = np.asarray(img.pixels[0])
    if modality == PH2:  # dermoscopy: 8-bit RGB or grey, as the training PNGs
        if px.dtype != np.uint8:
            raise ImageRejected(f"dermoscopy takes 8-bit images, got {px.dtype}", reason=Reason.UNSUPPORTED_PIXEL_FORMAT)
        return np.asarray(px[..., 0]) if px.shape[2] == 1 else px
    if px.shape[2] != 1:
        raise ImageRejected("a FLAIR slice has one channel", reason=Reason.WRONG_CHANNELS)
    return np.asarray(px[..., 0], dtype=np.float32)


def _dicom_spacing(img: Image) -> tuple[float, float] | None:
    ds = img.dataset
    sp = getattr(ds, "PixelSpacing", None) if ds is not None else None
    try:
        return (float(sp[0]), float(sp[1])) if sp is not None and len(sp) == 2 else None
    except (TypeError, ValueError):
        return None


def segment_router(server: SegmentServer, accept: InputSection) -> APIRouter:
    """The ``/v1/segment`` route over ``server``, taking images as the profile's ``input`` allows."""
    router = APIRouter(tags=["segmentation"])
    path = serving_endpoint(Job.SEGMENT)

    @router.post(path, response_model=SegmentOut, responses=_ERRORS,
                 openapi_extra=_DIAGNOSE_BODY,
                 summary="Segment the lesion in one image (PNG, JPEG or DICOM; multipart 'file' or raw body)")
    async def segment(
        request: Request, caller: Caller, service: Service,
        spacing_row_mm: Annotated[float | None, Query(gt=0, le=100, description="pixel spacing between rows")] = None,
        spacing_col_mm: Annotated[float | None, Query(gt=0, le=100, description="pixel spacing between columns")
                                  ] = None,
    ) -> SegmentOut:
        """Segment one uploaded image; every answer and refusal is audited with its request id."""
        t0 = time.perf_counter()
        rid = request_id(request)

        def refuse(exc: FedscanError) -> HTTPException:
            status = http_status(exc)
            service.audit.append(AuditRecord(event="rejected", caller=caller, source="http", reason=exc.reason,
                                             status_code=status, model_version=server.version, request_id=rid))
            return http_error_for(exc)

        try:
            if (spacing_row_mm is None) != (spacing_col_mm is None):
                raise FedscanError("give both spacing_row_mm and spacing_col_mm, or neither",
                                   reason=Reason.INVALID_REQUEST)
            served_job = _served_job(service)
            if not server.ready and served_job is not None and served_job != Job.SEGMENT:
                raise FedscanError(f"this box serves a {served_job} model: use {serving_endpoint(served_job)}",
                                   reason=Reason.JOB_MISMATCH)
            try:
                data, ctype = await _read_body(request, accept.max_bytes)
            except HTTPException as exc:
                reason = exc.detail.get("reason") if isinstance(exc.detail, dict) else None
                service.audit.append(AuditRecord(event="rejected", caller=caller, source="http", reason=reason,
                                                 status_code=exc.status_code, request_id=rid))
                raise
            img = decode_or_refuse(data, ctype, accept)
            t1 = time.perf_counter()
            spacing = (spacing_row_mm, spacing_col_mm) if spacing_row_mm is not None else _dicom_spacing(img)
            for hook in list(service.on_inference_request):  # training yields to a clinician's request
                hook()
            seg = server.segment(_pixels(img, server.modality), spacing_mm=spacing)  # type: ignore[arg-type]
        except FedscanError as exc:
            raise refuse(exc) from exc
        png = mask_png(seg.mask)
        total = (time.perf_counter() - t0) * 1e3
        service.audit.append(AuditRecord(event="segmentation", caller=caller, source="http",
                                         model_version=seg.model_version, request_id=rid))
        h, w = seg.mask.shape
        return SegmentOut(
            model_version=seg.model_version, modality=server.modality, mask_png=base64.b64encode(png).decode(),
            height=int(h), width=int(w), area_px=seg.area_px, area_mm2=seg.area_mm2, spacing_mm=seg.spacing_mm,
            lesion_fraction=seg.lesion_fraction, note=seg.note,
            timings=SegmentTimingsOut(decode_ms=(t1 - t0) * 1e3, preprocess_ms=seg.timings_ms["preprocess_ms"],
                                      inference_ms=seg.timings_ms["inference_ms"],
                                      postprocess_ms=seg.timings_ms["postprocess_ms"], total_ms=total))

    return router


def _served_job(service: Any) -> Job | None:
    """The job of the model the diagnosis side serves (None: none loaded)."""
    served = service.served
    if not served.ready:
        return None
    return Job(getattr(served.current(), "job", Job.CLASSIFY))

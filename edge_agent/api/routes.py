"""The inference API's routes: diagnose, findings, studies, model, health.

Every route has a ``response_model``; every refusal is an ``HTTPException`` whose detail is
``{"reason": <code>, "message": <text>}`` (see :class:`~edge_agent.api.schemas.ErrorOut`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from starlette.datastructures import UploadFile

from edge_agent.api.deps import Caller, Service, Settings, Store, request_id
from edge_agent.api.errors import http_error, http_error_for, http_status
from edge_agent.api.schemas import (
    DiagnosisOut,
    ErrorOut,
    FindingIn,
    HealthOut,
    InputOut,
    ModelOut,
    ReadyOut,
    StudyOut,
    TimingsOut,
)
from edge_agent.audit import AuditRecord
from edge_agent.serving import Diagnosis, ServingError
from edge_agent.store import StudyNotFound, StudyRecord
from protocol.errors import FedscanError, Reason
from protocol.jobs import Job, serving_endpoint

router = APIRouter()
health = APIRouter(tags=["health"])

StudyId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="the box's random study id")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorOut} for c in (400, 401, 404, 409, 411, 413, 415, 422, 500, 503, 504)
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_DIAGNOSE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                    "additionalProperties": False,
                },
                # the part's own type; a part sent without one is sniffed from its first bytes
                "encoding": {"file": {"contentType": "image/png, image/jpeg, application/dicom"}},
            },
            "image/png": _BINARY,
            "image/jpeg": _BINARY,
            "application/dicom": _BINARY,
        },
    }
}


def _sniff(data: bytes) -> str | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[128:132] == b"DICM":
        return "application/dicom"
    return None


async def _read_body(request: Request, limit: int) -> tuple[bytes, str | None]:
    """Read the image bytes and their declared content type, from a multipart form or a raw body."""
    declared = request.headers.get("content-type")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + 64 * 1024:
        raise http_error(Reason.TOO_LARGE, f"{length} bytes exceed the limit of {limit}")
    if (declared or "").lower().startswith("multipart/form-data"):
        if length is None:  # the form parser spools files to disk: bound it by the declared length
            raise http_error(Reason.LENGTH_REQUIRED, "a multipart upload needs a Content-Length")
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise http_error(Reason.MISSING_FILE, "a multipart request needs a 'file' part")
        extra = sorted(set(form.keys()) - {"file"})
        if extra or len(form.getlist("file")) != 1:  # the schema says: one 'file' part, nothing else
            raise http_error(Reason.INVALID_REQUEST, f"a multipart request has one 'file' part only, not {extra}"[:200])
        data = await upload.read(limit + 1)
        ctype = upload.content_type
    else:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise http_error(Reason.TOO_LARGE, f"the body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        data, ctype = b"".join(chunks), declared
    base = (ctype or "").split(";", 1)[0].strip().lower()
    if base in ("", "application/octet-stream"):
        ctype = _sniff(data) or ctype
    return data, ctype


def _diagnosis_out(d: Diagnosis) -> DiagnosisOut:
    t = d.timings
    return DiagnosisOut(
        study_id=d.study_id, label=d.label, probabilities=d.probabilities, confidence=d.confidence,
        reliability_percent=round(100.0 * d.confidence, 1), calibrated=d.calibrated, temperature=d.temperature,
        model_version=d.model_version, engine=d.engine,
        timings=TimingsOut(
            decode_ms=t.decode_ms, preprocess_ms=t.preprocess_ms, queue_ms=t.queue_ms, infer_ms=t.infer_ms,
            store_ms=t.store_ms, total_ms=t.total_ms, batch_size=t.batch_size,
        ),
    )


def _study_out(r: StudyRecord) -> StudyOut:
    return StudyOut(
        study_id=r.study_id, created_at=r.created_at, source=r.source, content_type=r.content_type,
        modality=r.modality, model_version=r.model_version, engine=r.engine, label=r.label,
        confidence=r.confidence, probabilities=r.probabilities, finding=r.finding, finding_at=r.finding_at,
    )


@router.post(
    "/v1/diagnose",
    response_model=DiagnosisOut,
    responses=_ERRORS,
    openapi_extra=_DIAGNOSE_BODY,
    summary="Diagnose one image (PNG, JPEG or DICOM; multipart 'file' or raw body)",
)
async def diagnose(request: Request, caller: Caller, service: Service, settings: Settings) -> DiagnosisOut:
    """Diagnose one uploaded image; every refusal is audited and answered with its reason and request id."""
    job = Job(getattr(request.app.state, "job", Job.CLASSIFY))
    if serving_endpoint(job) != "/v1/diagnose":  # a box of another job (e.g. segment) serves no classifier
        exc = FedscanError(f"this box serves {job} models: use {serving_endpoint(job)}", reason=Reason.JOB_MISMATCH)
        service.audit_refusal(exc, caller, "http", http_status(exc), request_id=request_id(request))
        raise http_error_for(exc)
    try:
        data, ctype = await _read_body(request, service.accept.max_bytes)
    except HTTPException as exc:  # refused before decoding (size, form): audited all the same
        reason = exc.detail.get("reason") if isinstance(exc.detail, dict) else None
        service.audit.append(AuditRecord(event="rejected", caller=caller, source="http", reason=reason,
                                         status_code=exc.status_code, request_id=request_id(request)))
        raise
    try:
        d = await service.diagnose_async(data, ctype, caller=caller, source="http", request_id=request_id(request))
    except FedscanError as exc:  # every refusal, whatever its cause, is audited with the status answered
        service.audit_refusal(exc, caller, "http", http_status(exc), request_id=request_id(request))
        raise http_error_for(exc, retry_after_s=settings.retry_after_s) from exc
    return _diagnosis_out(d)


@router.post(
    "/v1/studies/{study_id}/finding",
    response_model=StudyOut,
    responses=_ERRORS,
    summary="Record the clinician's confirmed label; the study becomes a training example",
)
def record_finding(study_id: StudyId, body: FindingIn, caller: Caller, service: Service) -> StudyOut:
    """Record a clinician's confirmed label on a study (a class of the served model)."""
    classes = service.served.current().classes if service.served.ready else None
    if classes is not None and body.label not in classes:
        raise http_error(Reason.UNKNOWN_LABEL, f"label {body.label!r} is not one of {list(classes)}")
    try:
        rec = service.store.record_finding(study_id, body.label, by=caller)
    except StudyNotFound as exc:
        raise http_error_for(exc) from exc
    service.audit.append(AuditRecord(event="finding", caller=caller, study_id=study_id, label=body.label,
                                     model_version=rec.model_version, engine=rec.engine))
    return _study_out(rec)


@router.get("/v1/studies/{study_id}", response_model=StudyOut, responses=_ERRORS, summary="One study and its result")
def get_study(study_id: StudyId, caller: Caller, store: Store) -> StudyOut:
    """Return one study of this box and its result."""
    try:
        return _study_out(store.get(study_id))
    except StudyNotFound as exc:
        raise http_error_for(exc) from exc


@router.get("/v1/studies", response_model=list[StudyOut], responses=_ERRORS, summary="Recent studies, newest first")
def list_studies(
    caller: Caller,
    store: Store,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    source: Annotated[str | None, Query(pattern=r"^(http|dicom)$")] = None,
) -> list[StudyOut]:
    """Return the newest studies, optionally of one source."""
    return [_study_out(r) for r in store.list(limit=limit, source=source)]


@router.get("/v1/model", response_model=ModelOut, responses=_ERRORS, summary="The model this box serves")
def get_model(caller: Caller, service: Service, settings: Settings) -> ModelOut:
    """Return the model this box serves."""
    try:
        m = service.served.current()
    except ServingError as exc:
        raise http_error_for(exc, retry_after_s=settings.retry_after_s) from exc
    return ModelOut(
        version=m.version, engine=m.engine.name, classes=list(m.classes), temperature=m.temperature,
        calibrated=m.calibrated, input=InputOut(channels=m.input.channels, height=m.input.height, width=m.input.width),
        preprocessing=[s.model_dump() for s in m.preprocessing], loaded_at=m.loaded_at,
    )


@health.get("/healthz", response_model=HealthOut, summary="The process is up")
def healthz() -> HealthOut:
    """Answer that the process is up."""
    return HealthOut()


@health.get("/readyz", response_model=ReadyOut, responses={503: {"model": ErrorOut}},
            summary="Ready once a verified model is loaded and the batcher runs")
def readyz(service: Service, settings: Settings) -> ReadyOut:
    """Answer ready once a verified model is served and the batcher runs, else 503."""
    if not service.served.ready or not service.batcher.running:
        raise http_error(Reason.NOT_READY, "no verified model is loaded yet",
                         {"Retry-After": str(settings.retry_after_s)})
    return ReadyOut(ready=True, model_version=service.served.current().version)

"""Request and response schemas of the inference API (separate from the internal types)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    """Why a request was refused; the same id is in the ``X-Request-ID`` header and the box's log."""

    reason: str = Field(description="stable machine-readable code, e.g. 'corrupt_image'")
    message: str
    request_id: str | None = Field(None, description="names this request in the box's log and audit")


class ErrorOut(BaseModel):
    """The body of every refusal."""

    detail: ErrorDetail


class TimingsOut(BaseModel):
    """Where the time of one diagnosis went, in milliseconds."""

    decode_ms: float
    preprocess_ms: float
    queue_ms: float
    infer_ms: float
    store_ms: float
    total_ms: float = Field(description="inside the service, from request start to answer")
    batch_size: int


class DiagnosisOut(BaseModel):
    """One diagnosis: label, calibrated probabilities, reliability, model and engine."""

    study_id: str
    label: str
    probabilities: dict[str, float] = Field(description="calibrated probability per class")
    confidence: float = Field(description="calibrated probability of the label, 0..1")
    reliability_percent: float = Field(description="confidence x 100, rounded to 0.1")
    calibrated: bool = Field(description="whether a fitted temperature was applied")
    temperature: float
    model_version: str
    engine: str
    timings: TimingsOut


class FindingIn(BaseModel):
    """A clinician's confirmed label for a study (the OpenAPI lists the served model's classes)."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1, max_length=64, description="the clinician's confirmed label (a class)")


class StudyOut(BaseModel):
    """One study of the local store and its result (no pixels, no identifiers)."""

    study_id: str
    created_at: float
    source: str
    content_type: str
    modality: str | None
    model_version: str | None
    engine: str | None
    label: str | None
    confidence: float | None
    probabilities: dict[str, float]
    finding: str | None
    finding_at: float | None


class InputOut(BaseModel):
    """The model input the served model takes."""

    channels: int
    height: int
    width: int


class ModelOut(BaseModel):
    """The model this box serves."""

    version: str
    engine: str
    classes: list[str]
    temperature: float
    calibrated: bool
    input: InputOut
    preprocessing: list[dict[str, object]]
    loaded_at: float


class HealthOut(BaseModel):
    """The process is up."""

    status: str = "ok"


class ReadyOut(BaseModel):
    """A verified model is served."""

    ready: bool
    model_version: str | None = None

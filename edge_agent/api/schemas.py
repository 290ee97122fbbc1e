"""Request and response schemas of the inference API (separate from the internal types)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    reason: str = Field(description="stable machine-readable code, e.g. 'corrupt_image'")
    message: str


class ErrorOut(BaseModel):
    detail: ErrorDetail


class TimingsOut(BaseModel):
    decode_ms: float
    preprocess_ms: float
    queue_ms: float
    infer_ms: float
    store_ms: float
    total_ms: float = Field(description="inside the service, from request start to answer")
    batch_size: int


class DiagnosisOut(BaseModel):
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
    label: str = Field(min_length=1, max_length=64, description="the clinician's confirmed label (a class)")


class StudyOut(BaseModel):
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
    channels: int
    height: int
    width: int


class ModelOut(BaseModel):
    version: str
    engine: str
    classes: list[str]
    temperature: float
    calibrated: bool
    input: InputOut
    preprocessing: list[dict[str, object]]
    loaded_at: float


class HealthOut(BaseModel):
    status: str = "ok"


class ReadyOut(BaseModel):
    ready: bool
    model_version: str | None = None

"""Model manifest v1: what a global model is, and the canonical bytes a signature covers.

The manifest is published retained on ``models/{version}/manifest``. ``canonical_bytes`` is the
canonical JSON (sorted keys, no whitespace) of every field except ``signature``; the Ed25519
signature (fleet issue) covers exactly those bytes, so any change to any other field breaks it.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.errors import ManifestError, Reason
from protocol.identifiers import Identifier
from protocol.jobs import Job
from protocol.messages import dumps_canonical
from protocol.preprocessing import PreprocessStep

MANIFEST_SCHEMA = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # signed JSON has no NaN/Infinity


class TensorEntry(_Strict):
    """One tensor of the model: name, shape, dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: Literal["float32"] = "float32"


class InputSpec(_Strict):
    """What the model takes: channels, height, width, dtype."""

    channels: int = Field(ge=1, le=4)
    height: int = Field(ge=8, le=4096)
    width: int = Field(ge=8, le=4096)
    dtype: Literal["float32"] = "float32"


class Architecture(_Strict):
    """The model family and the keyword arguments that build it."""

    name: str
    kwargs: dict[str, Any] = {}


class Artifact(_Strict):
    """An inference artifact: ONNX FP32/INT8, a TensorRT engine per target (export issue)."""

    kind: Literal["onnx-fp32", "onnx-int8", "tensorrt"]
    uri: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)
    target: str | None = None
    verification: dict[str, float | int | str] = {}


class Calibration(_Strict):
    """Temperature scaling fitted on the coordinator's validation split (diagnosis issue)."""

    temperature: float = Field(gt=0)
    fitted_on: str = "validation"
    ece_before: float | None = None
    ece_after: float | None = None


class ValidationBatch(_Strict):
    """A labelled batch shipped with the model for on-box health gates (fleet issue)."""

    uri: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    count: int = Field(ge=1)


class Signature(_Strict):
    """An Ed25519 signature over the manifest's canonical bytes."""

    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str
    value: str  # base64


class Manifest(_Strict):
    """Everything a box needs to verify, install and serve one global model (v1)."""

    schema_version: Literal[1] = 1
    version: Identifier
    parent: Identifier | None = None
    round_id: int | None = None
    created_at: float = Field(default_factory=time.time)
    architecture: Architecture
    classes: list[str] = Field(min_length=2)
    input: InputSpec
    preprocessing: list[PreprocessStep] = []
    metrics: dict[str, float] = {}
    participants: list[str] = []
    tensors: list[TensorEntry]
    tensor_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    artifacts: list[Artifact] = []
    calibration: Calibration | None = None
    validation_batch: ValidationBatch | None = None
    targets: list[str] | None = None
    # what kind of model this is, so the box knows what serves it (protocol.jobs); left off the
    # wire and out of the signed bytes when classify, so manifests signed before jobs still verify
    job: Job = Job.CLASSIFY
    signature: Signature | None = None

    def _unsent(self) -> set[str]:
        return {"job"} if self.job == Job.CLASSIFY else set()

    def canonical_bytes(self) -> bytes:
        """The bytes a signature covers: canonical JSON of every field but ``signature``.

        ``job`` is covered whenever it is not ``classify``: a segmentation model cannot be passed
        off as a classifier.
        """
        body = self.model_dump(mode="json", exclude={"signature"} | self._unsent())
        return dumps_canonical(body)

    def to_bytes(self) -> bytes:
        """Encode as UTF-8 JSON (the retained ``models/{version}/manifest`` payload)."""
        return self.model_dump_json(exclude=self._unsent()).encode("utf-8")


def parse_manifest(payload: bytes | str) -> Manifest:
    """Parse and validate a manifest; ``ManifestError`` (``bad_manifest``) if it does not."""
    try:
        manifest = Manifest.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ManifestError(f"manifest {where}: {first.get('msg')}", reason=Reason.BAD_MANIFEST) from exc
    except ValueError as exc:
        raise ManifestError(f"manifest is not JSON: {exc}", reason=Reason.BAD_MANIFEST) from exc
    try:  # a value canonical JSON cannot carry (e.g. 1e999 inside the architecture's kwargs) cannot be signed
        manifest.canonical_bytes()
    except ValueError as exc:
        raise ManifestError(f"manifest holds a value that cannot be signed: {exc}", reason=Reason.BAD_MANIFEST) from exc
    return manifest

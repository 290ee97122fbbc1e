"""Firmware (device) profile schema v1, validated at load with ``extra="forbid"``.

A profile says what a box is (modality, input, preprocessing, model), how it trains, and the
optional sections later features fill in (compression, export targets, resource gates,
training window, serving, telemetry). A malformed YAML fails at start-up with the file, the
line and the field: ``ProfileError("firmware_configs/x.yaml:12: training.lr: ...")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROFILE_SCHEMA = 1


class ProfileError(ValueError):
    """A profile that cannot be read or does not validate; message names file, line and field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- preprocessing steps: small units shared by training and inference -----------------------
class DicomRescale(_Section):
    op: Literal["dicom_rescale"]


class Window(_Section):
    op: Literal["window"]
    center: float | None = None  # None: use the file's VOI LUT / window, else min-max
    width: float | None = Field(None, gt=0)


class InvertMonochrome1(_Section):
    op: Literal["invert_monochrome1"]


class SelectFrame(_Section):
    op: Literal["select_frame"]
    index: int | Literal["middle"] = "middle"


class ToGrayscale(_Section):
    op: Literal["to_grayscale"]


class ToRGB(_Section):
    op: Literal["to_rgb"]


class Resize(_Section):
    op: Literal["resize"]
    height: int = Field(ge=8, le=4096)
    width: int = Field(ge=8, le=4096)


class ScaleTo01(_Section):
    op: Literal["scale_to_unit"]


class Normalize(_Section):
    op: Literal["normalize"]
    mean: list[float]
    std: list[Annotated[float, Field(gt=0)]]


PreprocessStep = Annotated[
    DicomRescale | Window | InvertMonochrome1 | SelectFrame | ToGrayscale | ToRGB | Resize | ScaleTo01 | Normalize,
    Field(discriminator="op"),
]


# -- sections -----------------------------------------------------------------------------------
class ModelSection(_Section):
    architecture: Literal["small_cnn", "resnet18", "unet", "autoencoder"] = "small_cnn"
    norm: Literal["group", "batch"] = "group"
    width: int = Field(32, ge=4, le=512)
    classes: list[str] = Field(min_length=2)


class InputSection(_Section):
    channels: Literal[1, 3] = 1
    height: int = Field(28, ge=8, le=4096)
    width: int = Field(28, ge=8, le=4096)
    formats: list[Literal["png", "jpeg", "dicom"]] = ["png", "jpeg", "dicom"]
    modalities: list[str] = []  # DICOM modality codes accepted, empty = any
    max_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(64 * 1024 * 1024, ge=64)


class TrainingSection(_Section):
    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(0.01, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    qat: bool = False
    threads: int | None = Field(None, ge=1, le=256)


class CompressionSection(_Section):
    uplink: str = "raw"
    downlink: str = "xor|zstd"
    bandwidth_class: Literal["lan", "wan", "constrained"] = "lan"
    chunk_bytes: int = Field(256 * 1024, ge=1024)
    window: int = Field(8, ge=1, le=1024)


class ExportTarget(_Section):
    name: str
    device: Literal["cpu", "cuda"] = "cpu"
    gpu: str | None = None
    precision: Literal["fp32", "fp16", "int8"] = "fp32"


class ExportSection(_Section):
    targets: list[ExportTarget] = []
    engine_order: list[Literal["tensorrt", "ort-tensorrt", "ort-cuda", "ort-cpu", "torch-cuda", "torch"]] = [
        "tensorrt",
        "ort-cuda",
        "ort-cpu",
        "torch",
    ]


class ResourceGates(_Section):
    max_cpu_percent: float = Field(80.0, gt=0, le=100)
    max_gpu_percent: float = Field(80.0, gt=0, le=100)
    max_gpu_temp_c: float = Field(80.0, gt=0, le=120)
    min_free_memory_mb: int = Field(512, ge=0)
    pause_on_inference: bool = True


class TrainingWindow(_Section):
    start: str = Field("00:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    end: str = Field("23:59", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = [
        "mon", "tue", "wed", "thu", "fri", "sat", "sun"
    ]


class ServingSection(_Section):
    max_batch: int = Field(8, ge=1, le=1024)
    max_wait_ms: float = Field(5.0, ge=0, le=1000)
    queue_size: int = Field(64, ge=1)
    threads: int | None = Field(None, ge=1, le=256)


class TelemetrySection(_Section):
    period_s: float = Field(5.0, gt=0, le=3600)


class PrivacySection(_Section):
    dp_sgd: bool = False
    noise_multiplier: float = Field(1.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    target_delta: float = Field(1e-5, gt=0, lt=1)
    epsilon_budget: float | None = Field(None, gt=0)


class FirmwareProfile(_Section):
    schema_version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str = ""
    modality: str
    model: ModelSection
    input: InputSection = InputSection()
    preprocessing: list[PreprocessStep] = []
    training: TrainingSection = TrainingSection()
    compression: CompressionSection | None = None
    export: ExportSection | None = None
    resource_gates: ResourceGates | None = None
    training_window: TrainingWindow | None = None
    serving: ServingSection | None = None
    telemetry: TelemetrySection | None = None
    privacy: PrivacySection | None = None

    @model_validator(mode="after")
    def _check_norm(self) -> FirmwareProfile:
        if self.privacy is not None and self.privacy.dp_sgd and self.model.norm == "batch":
            raise ValueError("privacy.dp_sgd needs model.norm 'group' (DP-SGD refuses BatchNorm)")
        if self.privacy is not None and self.privacy.dp_sgd and self.training.qat:
            raise ValueError("privacy.dp_sgd and training.qat cannot be combined: opacus has no per-sample "
                             "gradients for fake-quant layers (the export still quantizes to INT8 after training)")
        return self


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Walk a composed YAML node tree along a pydantic error location; 1-based line."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if getattr(k, "value", None) == str(key):
                    nxt, line = v, k.start_mark.line + 1
                    break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
        if node is None:
            break
    return line


def parse_profile(text: str, source: str = "<string>") -> FirmwareProfile:
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ProfileError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile must be a mapping, got {type(data).__name__}")
    try:
        return FirmwareProfile.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(p for p in err.get("loc", ()) if not (isinstance(p, str) and p in _UNION_TAGS))
            field = ".".join(str(p) for p in loc) or "<root>"
            line = _line_of(root, loc)
            lines.append(f"{source}:{line if line is not None else '?'}: {field}: {err.get('msg')}")
        raise ProfileError("\n".join(lines)) from exc


_UNION_TAGS = {
    "dicom_rescale", "window", "invert_monochrome1", "select_frame", "to_grayscale", "to_rgb",
    "resize", "scale_to_unit", "normalize",
}


def load_profile(path: str | Path) -> FirmwareProfile:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"{p}: cannot read profile: {exc.strerror}") from exc
    return parse_profile(text, str(p))


def profiles_dir() -> Path:
    """The firmware_configs/ folder shipped beside the packages."""
    return Path(__file__).resolve().parent.parent / "firmware_configs"


def find_profile(name_or_path: str) -> FirmwareProfile:
    """Load a profile by path, or by name from ``firmware_configs/``."""
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"} or p.exists():
        return load_profile(p)
    return load_profile(profiles_dir() / f"{name_or_path}.yaml")

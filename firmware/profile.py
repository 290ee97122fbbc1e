"""Firmware (device) profile schema v1: the configuration of one box, validated at load.

A profile says what a box is (modality, input, preprocessing, model), how it trains, and the
optional sections later features fill in (compression, export targets, resource gates,
training window, serving, telemetry, privacy). It is read from ``firmware_configs/*.yaml`` with
``extra="forbid"``; a malformed YAML fails at start-up with the file, the line and the field:
``ProfileError("firmware_configs/x.yaml:12: training.lr: ...")``. Device configuration, not wire
protocol: only the preprocessing steps travel (``protocol.preprocessing``, inside a manifest),
and the training hyper-parameters a round sends (``protocol.messages.TrainingConfig``) are the
base of the profile's ``training`` section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protocol.codec import CodecError, parse_codec
from protocol.errors import FedscanError, Reason
from protocol.identifiers import Identifier
from protocol.jobs import Job
from protocol.messages import TrainingConfig
from protocol.preprocessing import OPS, PreprocessStep
from protocol.preprocessing import Normalize as NormalizeStep

PROFILE_SCHEMA = 1


class ProfileError(FedscanError, ValueError):
    """A profile that cannot be read or does not validate; message names file, line and field."""

    reason = Reason.BAD_PROFILE


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- sections -----------------------------------------------------------------------------------
class ModelSection(_Section):
    """The model family a box trains and serves, its normalisation, width and class names."""

    architecture: Literal["small_cnn", "resnet18", "unet", "autoencoder", "seg_unet", "feddis_ae"] = "small_cnn"
    norm: Literal["group", "batch", "instance"] = "group"  # instance: the segmentation U-Net's default
    width: int = Field(32, ge=4, le=512)
    classes: list[str] = Field(min_length=2)


class InputSection(_Section):
    """What images the box accepts: channels, size, formats, DICOM modalities, byte and pixel limits."""

    channels: Literal[1, 3] = 1
    height: int = Field(28, ge=8, le=4096)
    width: int = Field(28, ge=8, le=4096)
    formats: list[Literal["png", "jpeg", "dicom"]] = ["png", "jpeg", "dicom"]
    modalities: list[str] = []  # DICOM modality codes accepted, empty = any
    max_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(64 * 1024 * 1024, ge=64)


class TrainingSection(TrainingConfig):
    """The box's training defaults.

    A round's hyper-parameters (one definition, in the protocol) plus what only the box decides
    (quantization-aware training, CPU threads).
    """

    qat: bool = False
    threads: int | None = Field(None, ge=1, le=256)


class CompressionSection(_Section):
    """Update codecs (uplink, downlink), the link class, and how updates are chunked and paced."""

    uplink: str = "raw"
    # xor|zstd: each model reaches the box exactly (whole, or an XOR delta from what it holds);
    # a delta pipeline: each version is the coordinator's compressed step from its parent;
    # auto: xor|zstd while the uplink codec is lossless, the default step codec once it is lossy
    downlink: str = "auto"
    bandwidth_class: Literal["lan", "wan", "constrained"] = "lan"
    chunk_bytes: int = Field(256 * 1024, ge=1024)
    window: int = Field(8, ge=1, le=1024)

    @field_validator("downlink")
    @classmethod
    def _downlink(cls, v: str) -> str:
        if v.replace(" ", "") in ("xor|zstd", "auto"):
            return v
        try:
            pipeline = parse_codec(v)
        except CodecError as exc:
            raise ValueError(f"downlink codec {v!r}: {exc.message}") from exc
        if not pipeline.needs_base:
            raise ValueError(f"downlink codec {v!r}: auto, xor|zstd or a pipeline that starts with delta")
        return v


class ExportTarget(_Section):
    """One inference target an artifact is built for (device, GPU model, precision)."""

    name: str
    device: Literal["cpu", "cuda"] = "cpu"
    gpu: str | None = None
    precision: Literal["fp32", "fp16", "int8"] = "fp32"


class ExportSection(_Section):
    """Export targets and the order in which the box tries inference engines."""

    targets: list[ExportTarget] = []
    engine_order: list[Literal["tensorrt", "ort-tensorrt", "ort-cuda", "ort-cpu", "torch-cuda", "torch"]] = [
        "tensorrt",
        "ort-cuda",
        "ort-cpu",
        "torch",
    ]


class ResourceGates(_Section):
    """Limits under which training may run beside serving (CPU, GPU, temperature, free memory)."""

    max_cpu_percent: float = Field(80.0, gt=0, le=100)
    max_gpu_percent: float = Field(80.0, gt=0, le=100)
    max_gpu_temp_c: float = Field(80.0, gt=0, le=120)
    min_free_memory_mb: int = Field(512, ge=0)
    pause_on_inference: bool = True


class TrainingWindow(_Section):
    """Hours and days in which the box may train."""

    start: str = Field("00:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    end: str = Field("23:59", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = [
        "mon", "tue", "wed", "thu", "fri", "sat", "sun"
    ]


class ServingSection(_Section):
    """Micro-batching and queueing of inference requests."""

    max_batch: int = Field(8, ge=1, le=1024)
    max_wait_ms: float = Field(5.0, ge=0, le=1000)
    queue_size: int = Field(64, ge=1)
    threads: int | None = Field(None, ge=1, le=256)


class TelemetrySection(_Section):
    """How often the box publishes telemetry."""

    period_s: float = Field(5.0, gt=0, le=3600)


class PrivacySection(_Section):
    """DP-SGD on the box: noise, clipping, δ and the ε budget."""

    dp_sgd: bool = False
    noise_multiplier: float = Field(1.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    target_delta: float = Field(1e-5, gt=0, lt=1)
    epsilon_budget: float | None = Field(None, gt=0)


class AugmentSpec(_Section):
    """Which training augmentations a device's images tolerate, and how strong (all off by default).

    Built into MONAI transforms by ``learning/augment.py``; training only (serving runs the
    ``preprocessing`` steps alone, as training does before augmenting).
    """

    flip: bool = False  # horizontal and vertical flips, each with probability 1/2
    rotate90: bool = False  # 0, 90, 180 or 270 degrees, uniformly
    crop: float = Field(1.0, gt=0.3, le=1.0)  # random crop of this to 100 % of each side, resized back
    brightness: float = Field(0.0, ge=0.0, le=0.5)  # additive shift in [-b, b] (intensities in [0, 1])
    contrast: float = Field(0.0, ge=0.0, le=0.9)  # gamma in [1 - c, 1 + c]
    colour: float = Field(0.0, ge=0.0, le=0.5)  # gain per channel in [1 - c, 1 + c] (white balance)
    prob: float = Field(0.8, gt=0.0, le=1.0)  # probability of each of crop / brightness / contrast / colour

    @property
    def active(self) -> bool:
        """Tell whether any augmentation is switched on."""
        return self.flip or self.rotate90 or self.crop < 1.0 or self.brightness > 0 or self.contrast > 0 \
            or self.colour > 0


class FirmwareProfile(_Section):
    """One box's whole profile (schema v1); cross-section rules are checked after the fields."""

    schema_version: Literal[1] = 1
    name: Identifier
    description: str = ""
    modality: str
    job: Job = Job.CLASSIFY  # what the box trains and serves (protocol.jobs): its data, its API route
    model: ModelSection
    input: InputSection = InputSection()
    preprocessing: list[PreprocessStep] = []
    augmentation: AugmentSpec | None = None  # training only, when a round's training.augment asks for it
    training: TrainingSection = TrainingSection()
    compression: CompressionSection | None = None
    export: ExportSection | None = None
    resource_gates: ResourceGates | None = None
    training_window: TrainingWindow | None = None
    serving: ServingSection | None = None
    telemetry: TelemetrySection | None = None
    privacy: PrivacySection | None = None

    def normalization(self) -> tuple[list[float], list[float]] | None:
        """The ``(mean, std)`` of the ``normalize`` step, which training applies per batch; None without one."""
        for step in self.preprocessing:
            if isinstance(step, NormalizeStep):
                return list(step.mean), list(step.std)
        return None

    @model_validator(mode="after")
    def _check_norm(self) -> FirmwareProfile:
        if self.privacy is not None and self.privacy.dp_sgd and self.model.norm == "batch":
            raise ValueError("privacy.dp_sgd needs model.norm 'group' (DP-SGD refuses BatchNorm)")
        if self.job == Job.SEGMENT and self.model.architecture != "seg_unet":
            raise ValueError("job: segment needs model.architecture 'seg_unet'")
        if (self.job == Job.ANOMALY) != (self.model.architecture == "feddis_ae"):
            raise ValueError("job: anomaly and model.architecture 'feddis_ae' go together (the FedDis autoencoder)")
        if self.job == Job.ANOMALY and (self.input.channels != 1 or self.input.height != self.input.width):
            raise ValueError("job: anomaly takes square greyscale images (input.channels: 1, height = width)")
        if self.model.norm == "instance" and self.model.architecture != "seg_unet":
            raise ValueError("model.norm 'instance' is for the segmentation U-Net (seg_unet) only")
        if self.privacy is not None and self.privacy.dp_sgd and self.training.qat:
            raise ValueError("privacy.dp_sgd and training.qat cannot be combined: opacus has no per-sample "
                             "gradients for fake-quant layers (the export still quantizes to INT8 after training)")
        return self


def yaml_line(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
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


def read_yaml(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """Parse YAML text and its node tree (for line numbers); ``ProfileError`` names the source and line."""
    try:
        return yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ProfileError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc


def parse_profile(text: str, source: str = "<string>") -> FirmwareProfile:
    """Validate a profile's YAML text; ``ProfileError`` names ``source``, the line and the field."""
    root, data = read_yaml(text, source)
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile must be a mapping, got {type(data).__name__}")
    try:
        return FirmwareProfile.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(p for p in err.get("loc", ()) if not (isinstance(p, str) and p in _UNION_TAGS))
            field = ".".join(str(p) for p in loc) or "<root>"
            line = yaml_line(root, loc)
            lines.append(f"{source}:{line if line is not None else '?'}: {field}: {err.get('msg')}")
        raise ProfileError("\n".join(lines)) from exc


_UNION_TAGS = frozenset(OPS)


def load_profile(path: str | Path) -> FirmwareProfile:
    """Read and validate the profile at ``path``."""
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

"""What a federation's rounds are: their settings, the model every round trains, and names.

Pure values: :class:`RoundSettings` (how many rounds, how many updates close one, deadlines,
uplink codec, sync or async), :class:`ModelSpec` (the global model, from the firmware profile),
:func:`round_training` (the training config a round's tasks carry) and :func:`version_name`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from coordinator.states import RoundMode
from coordinator.strategies import Strategy
from firmware.profile import FirmwareProfile
from protocol.codec import CodecError, parse_codec
from protocol.errors import Reason
from protocol.frame import DOWNLINK_DELTA
from protocol.jobs import Job, JobParams
from protocol.manifest import InputSpec
from protocol.messages import TrainingConfig
from protocol.preprocessing import PreprocessStep

#: The downlink step codec ``auto`` picks once the uplink is lossy: chosen on validation accuracy among
#: top-k 5 % / 10 % at 4 / 8 bits (bench/downlink.py, bench/results/downlink.json: it holds test accuracy over
#: 3 seeds, +1.4 points against the exact downlink, at 0.14 of the float32 model per box and round).
DEFAULT_DOWNLINK_STEP = "delta|topk:0.1|q:8|ef|zstd"


@dataclass(frozen=True)
class RoundSettings:
    """How the coordinator runs its rounds."""

    rounds: int = 3
    min_clients: int = 2
    deadline_s: float = 300.0
    reannounce_s: float = 10.0
    training: TrainingConfig = field(default_factory=TrainingConfig)
    codec: str = "raw"
    # None: each version travels exact (whole, or an XOR delta per box on request). A lossy delta
    # pipeline (e.g. "delta|topk:0.05|ef|q:4|zstd"): each version is published as that compressed
    # step from its parent, with error feedback on the coordinator, and broadcast once for all boxes.
    downlink_codec: str | None = None
    chunk_bytes: int = 256 * 1024
    window: int = 8
    max_update_norm: float | None = 1e4
    seed: int = 0
    # auto: every new round model is served by every agent (recorded active); manual: round models
    # are candidates that agents train from, served only after approval + a staged rollout.
    rollout: Literal["auto", "manual"] = "auto"
    # sync: a round waits for min_clients updates trained from its base and refuses later ones.
    # async (buffered, as FedBuff): a round closes once min_clients updates are in its buffer; an
    # update trained from an older round's model still counts, scaled by
    # (1 + staleness) ** -staleness_exponent, when it is at most max_staleness rounds old; an agent
    # that is still training is not sent a newer task.
    mode: RoundMode = RoundMode.SYNC
    max_staleness: int = 4
    staleness_exponent: float = 0.5
    # auto rollout: the fleet serves the round model best on the coordinator's validation split by this
    # manifest metric (learning/selection.py; e.g. "val_auc"); None serves every round's model (the latest).
    select_metric: str | None = None
    # the federation's job (protocol.jobs): sent with every task, written into every manifest;
    # job_params are that job's federation-wide knobs, sent with every task
    job: Job = Job.CLASSIFY
    job_params: JobParams = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", RoundMode(self.mode))
        object.__setattr__(self, "job", Job(self.job))
        if self.downlink_codec is not None and not parse_codec(self.downlink_codec).needs_base:
            raise CodecError(f"downlink codec {self.downlink_codec!r} must start with delta", reason=Reason.BAD_PARAMETER)


@dataclass(frozen=True)
class ModelSpec:
    """What every global model of this federation is (from the firmware profile)."""

    architecture: str
    kwargs: dict[str, Any]
    classes: list[str]
    input: InputSpec
    preprocessing: list[PreprocessStep] = field(default_factory=list)


def round_training(base: TrainingConfig, strategy: Strategy, seed: int, round_id: int) -> TrainingConfig:
    """The training config sent with a round's tasks: the strategy's overrides and a per-round seed.

    With a learning-rate schedule over a step budget, round ``r`` starts ``(r - 1) × max_steps`` steps in.
    """
    update: dict[str, Any] = {"seed": seed * 100_003 + round_id, **strategy.configure_round(round_id)}
    if base.schedule != "constant" and base.max_steps is not None:
        update["step_offset"] = (round_id - 1) * base.max_steps
    return TrainingConfig.model_validate({**base.model_dump(), **update})


def version_name(round_id: int) -> str:
    """The model version a round produces (``v0`` is the initial model)."""
    return f"v{round_id}"


def downlink_step_codec(flag: str | None, profile: FirmwareProfile, uplink: str) -> str | None:
    """Return the round settings' downlink codec: ``None`` for the exact downlink (``xor|zstd``), else a delta pipeline.

    ``--downlink-codec`` if given, else the profile's ``compression.downlink``, else exact. ``auto``
    is exact while the uplink is lossless and :data:`DEFAULT_DOWNLINK_STEP` once it is lossy. The
    default is exact because the step costs accuracy (``bench/downlink.py``: 0.848 vs 0.869 test
    accuracy over 3 seeds): a fleet opts in to the 10x smaller downlink knowingly.
    """
    spec = flag or (profile.compression.downlink if profile.compression else DOWNLINK_DELTA)
    if spec == "auto":
        spec = DOWNLINK_DELTA if parse_codec(uplink).lossless else DEFAULT_DOWNLINK_STEP
    return None if spec.replace(" ", "") == DOWNLINK_DELTA else spec

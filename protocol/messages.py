"""Versioned JSON message schemas of protocol v1 (everything except binary chunk payloads).

Every message carries ``v`` (schema version). Unknown fields are refused (``extra="forbid"``) so
that a message from a newer, incompatible sender fails loudly instead of being half-understood;
new optional fields get a default and keep ``v=1``; a breaking change bumps ``v``. States are
``StrEnum`` members: on the wire they are the same strings as before.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.errors import MalformedMessage
from protocol.identifiers import Identifier
from protocol.jobs import Job, JobParams

__all__ = [
    "SCHEMA_VERSION",
    "Ack",
    "AckStatus",
    "AgentEvent",
    "EventDetail",
    "EventKind",
    "GpuStats",
    "Identifier",
    "Job",
    "Loss",
    "Message",
    "ModelRequest",
    "Presence",
    "Role",
    "RollbackOrder",
    "RoundMode",
    "Shadow",
    "ShadowDetail",
    "Status",
    "Task",
    "Telemetry",
    "TrainingConfig",
    "TrainingState",
    "dumps_canonical",
    "parse_message",
]

SCHEMA_VERSION = 1


class Presence(StrEnum):
    """Retained presence of an agent or the coordinator."""

    ONLINE = "online"
    OFFLINE = "offline"


class Role(StrEnum):
    """Who publishes a ``Status``."""

    AGENT = "agent"
    COORDINATOR = "coordinator"


class RoundMode(StrEnum):
    """Synchronous rounds, or buffered asynchronous ones (FedBuff)."""

    SYNC = "sync"
    ASYNC = "async"


class AckStatus(StrEnum):
    """The coordinator's end-to-end answer to one update upload."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    INCOMPLETE = "incomplete"
    REJECTED = "rejected"


class Loss(StrEnum):
    """Local training loss; ``balanced_ce`` weights classes by the site's own label counts."""

    CE = "ce"
    BALANCED_CE = "balanced_ce"


class TrainingState(StrEnum):
    """What an agent's training job is doing (the telemetry ``training.state``)."""

    IDLE = "idle"
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"
    UPLOADING = "uploading"
    DONE = "done"
    FAILED = "failed"


class EventKind(StrEnum):
    """Things an agent puts on the record (``AgentEvent.kind``)."""

    ERROR = "error"
    MODEL_REFUSED = "model_refused"
    ARTIFACT_REFUSED = "artifact_refused"
    INSTALL_REFUSED = "install_refused"
    TRAINING_REFUSED = "training_refused"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Message(_Strict):
    """Base of every JSON message: the schema version ``v`` and its wire encoding."""

    v: Literal[1] = 1

    def to_bytes(self) -> bytes:
        """Encode as UTF-8 JSON."""
        return self.model_dump_json().encode("utf-8")


M = TypeVar("M", bound=Message)


def parse_message(model: type[M], payload: bytes | str) -> M:
    """Parse and validate a message; any failure becomes ``MalformedMessage`` with a reason."""
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "<root>"
        raise MalformedMessage(f"{model.__name__}: {where}: {first.get('msg')}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessage(f"{model.__name__}: not valid JSON: {exc}") from exc


class Status(Message):
    """Retained presence: ``online`` birth message, ``offline`` as Last Will or clean exit."""

    state: Presence
    role: Role = Role.AGENT
    profile: str | None = None
    software: str | None = None
    at: float = Field(default_factory=time.time)


class TrainingConfig(_Strict):
    """Hyper-parameters a round asks for; the agent's profile supplies anything left at None."""

    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(0.01, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    prox_mu: float = Field(0.0, ge=0)
    loss: Loss = Loss.CE
    seed: int = 0
    max_steps: int | None = Field(None, ge=1)
    # Added for the step-budget defaults (issue 16); the defaults keep the behaviour of older senders.
    optimizer: Literal["sgd", "adamw"] = "sgd"
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: warm-up, then a half cosine over total_steps
    warmup_steps: int = Field(0, ge=0)
    total_steps: int | None = Field(None, ge=1)  # the budget the schedule spans (all rounds), in local steps
    step_offset: int = Field(0, ge=0)  # steps of that budget done before this call (earlier rounds)
    augment: bool = False  # apply the device profile's training augmentation


class Task(Message):
    """Work for one agent: train from ``base_version`` and upload an update for ``round_id``."""

    round_id: int = Field(ge=0)
    base_version: Identifier
    mode: RoundMode = RoundMode.SYNC
    deadline: float
    training: TrainingConfig = TrainingConfig()
    codec: str = "raw"
    chunk_bytes: int = Field(256 * 1024, ge=1024, le=8 * 1024 * 1024)
    window: int = Field(8, ge=1, le=1024)
    # which job this round belongs to, and the job's federation-wide knobs (protocol.jobs); both
    # are left off the wire at their defaults so that agents older than jobs accept classify tasks
    job: Job = Job.CLASSIFY
    job_params: JobParams = {}

    def to_bytes(self) -> bytes:
        """Encode as UTF-8 JSON; ``job``/``job_params`` only when they are not the classify defaults."""
        drop = {k for k, default in (("job", Job.CLASSIFY), ("job_params", {})) if getattr(self, k) == default}
        return self.model_dump_json(exclude=drop).encode("utf-8")


class Ack(Message):
    """Coordinator's end-to-end answer to an update upload.

    ``reason`` is a ``protocol.errors.Reason`` value; it stays a plain string on this message so that
    an agent keeps understanding the status of an ack that names a reason newer than itself.
    """

    update_id: str
    round_id: int
    status: AckStatus
    missing: list[int] = []
    reason: str | None = None
    detail: str | None = None


class ShadowDetail(_Strict):
    """What a reported shadow says besides the version (every field optional).

    Who reports, the engine choice, a refusal, and the health figures the rollout gates read.
    """

    agent: Identifier | None = None  # the reporting agent; must match the topic's
    skipped: dict[str, str] = {}  # engine name -> why it was not used
    refused: Identifier | None = None  # a desired version the box refused ...
    reason: str | None = None  # ... and why (a Reason value)
    error_rate: float | None = Field(None, ge=0, le=1)
    p95_ms: float | None = Field(None, ge=0)
    val_accuracy: float | None = Field(None, ge=0, le=1)  # the served model on the manifest's batch
    val_accuracy_active: float | None = Field(None, ge=0, le=1)  # the model it replaced, same batch
    val_count: int | None = Field(None, ge=0)
    val_error: str | None = None  # why the batch could not be used


class RollbackOrder(Message):
    """A signed instruction to one agent: serve ``to_version`` again instead of ``from_version``.

    Agents only move forward to a newer model; this is the one way back. It is signed with a fleet
    model-signing key (``protocol.signing``: ``SigningKey.sign_rollback``,
    ``TrustStore.verify_rollback``) and names the fleet, the agent, the version being rolled back
    and the time it was issued, so it cannot be replayed against another box, another model, or
    twice.
    """

    fleet: Identifier
    agent_id: Identifier
    from_version: Identifier
    to_version: Identifier
    issued_at: float
    key_id: str = Field(default="", max_length=16)
    signature: str = Field(default="", max_length=128)

    def signed_bytes(self) -> bytes:
        """Return the bytes the signature covers: a domain tag and every field but the signature."""
        return b"fedscan/v1/rollback-order\x00" + dumps_canonical(self.model_dump(mode="json", exclude={"signature"}))


class Shadow(Message):
    """Desired (coordinator → agent) or reported (agent → coordinator) model state.

    A desired shadow that moves an agent back to an older model carries the signed ``rollback``
    order that allows it.
    """

    version: Identifier | None
    rollback: RollbackOrder | None = None
    engine: str | None = None
    detail: ShadowDetail = ShadowDetail()
    at: float = Field(default_factory=time.time)


class ModelRequest(Message):
    """Agent asks for a model version (as a delta against ``have`` if given), or for missing chunks."""

    version: Identifier
    have: Identifier | None = None
    transfer_id: str | None = None
    missing: list[int] | None = None
    artifact: str | None = None  # an artifact ``uri`` listed in the manifest, instead of the weights


class EventDetail(_Strict):
    """What an ``AgentEvent`` is about (the fields its kind uses)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    version: Identifier | None = None
    artifact: str | None = None
    round_id: int | None = Field(None, ge=0)
    reason: str | None = None  # a Reason value
    during: str | None = Field(None, alias="while")  # kind=error: the work item that failed
    at: str | None = None  # when: "start" for what the box refused at start-up
    error: str | None = Field(None, max_length=1000)
    detail: str | None = Field(None, max_length=2000)


class AgentEvent(Message):
    """Things an agent wants on the record: installs, refusals, errors."""

    kind: EventKind
    detail: EventDetail = EventDetail()
    at: float = Field(default_factory=time.time)

    def to_bytes(self) -> bytes:
        """Encode as UTF-8 JSON with the wire names (``while``), leaving out what is unset."""
        return self.model_dump_json(by_alias=True, exclude_none=True).encode("utf-8")


class GpuStats(_Strict):
    """One GPU in a telemetry sample."""

    index: int = Field(ge=0)
    util_percent: float | None = None
    mem_percent: float | None = None
    mem_used_mb: float | None = None
    temp_c: float | None = None
    power_w: float | None = None


class Telemetry(Message):
    """Periodic resource sample (QoS 0). Sections beyond ``at`` are optional and compact.

    ``inference`` and ``training`` are small numeric sections whose keys the agent's providers
    choose (counters, latency percentiles, progress); the one string they may carry is the
    training ``state``.
    """

    at: float = Field(default_factory=time.time)
    cpu_percent: float | None = None
    memory_percent: float | None = None
    disk_percent: float | None = None
    temperatures_c: dict[str, float] = {}
    gpu: list[GpuStats] = []
    inference: dict[str, float] = {}
    training: dict[str, float | TrainingState] = {}
    model_version: str | None = None


def dumps_canonical(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8. Used for hashing and signatures."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )

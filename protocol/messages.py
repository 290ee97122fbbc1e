"""Versioned JSON message schemas of protocol v1 (everything except binary chunk payloads).

Every message carries ``v`` (schema version). Unknown fields are refused (``extra="forbid"``) so
that a message from a newer, incompatible sender fails loudly instead of being half-understood;
new optional fields get a default and keep ``v=1``; a breaking change bumps ``v``.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.errors import MalformedMessage

SCHEMA_VERSION = 1
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1

    def to_bytes(self) -> bytes:
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

    state: Literal["online", "offline"]
    role: Literal["agent", "coordinator"] = "agent"
    profile: str | None = None
    software: str | None = None
    at: float = Field(default_factory=time.time)


class TrainingConfig(BaseModel):
    """Hyper-parameters a round asks for; the agent's profile supplies anything left at None."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(0.01, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    prox_mu: float = Field(0.0, ge=0)
    loss: Literal["ce", "balanced_ce"] = "ce"  # balanced_ce: weights from the site's own label counts
    seed: int = 0
    max_steps: int | None = Field(None, ge=1)


class Task(Message):
    """Work for one agent: train from ``base_version`` and upload an update for ``round_id``."""

    round_id: int = Field(ge=0)
    base_version: Identifier
    mode: Literal["sync", "async"] = "sync"
    deadline: float
    training: TrainingConfig = TrainingConfig()
    codec: str = "raw"
    chunk_bytes: int = Field(256 * 1024, ge=1024, le=8 * 1024 * 1024)
    window: int = Field(8, ge=1, le=1024)


class Ack(Message):
    """Coordinator's end-to-end answer to an update upload."""

    update_id: str
    round_id: int
    status: Literal["accepted", "duplicate", "incomplete", "rejected"]
    missing: list[int] = []
    reason: str | None = None
    detail: str | None = None


class Shadow(Message):
    """Desired (coordinator → agent) or reported (agent → coordinator) model state."""

    version: Identifier | None
    engine: str | None = None
    detail: dict[str, Any] = {}
    at: float = Field(default_factory=time.time)


class ModelRequest(Message):
    """Agent asks for a model version (as a delta against ``have`` if given), or for missing chunks."""

    version: Identifier
    have: Identifier | None = None
    transfer_id: str | None = None
    missing: list[int] | None = None
    artifact: str | None = None  # an artifact ``uri`` listed in the manifest, instead of the weights


class AgentEvent(Message):
    """Things an agent wants on the record: installs, refusals, errors."""

    kind: str
    detail: dict[str, Any] = {}
    at: float = Field(default_factory=time.time)


class Telemetry(Message):
    """Periodic resource sample (QoS 0). Sections beyond ``at`` are optional and compact."""

    at: float = Field(default_factory=time.time)
    cpu_percent: float | None = None
    memory_percent: float | None = None
    disk_percent: float | None = None
    temperatures_c: dict[str, float] = {}
    gpu: list[dict[str, float | str | None]] = []
    inference: dict[str, float] = {}
    training: dict[str, float | str] = {}
    model_version: str | None = None


def dumps_canonical(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8. Used for hashing and signatures."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )

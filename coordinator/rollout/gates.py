"""Rollout health gates, pure: what agents reported, and one gate decision from it and the clock.

Gates per stage: every agent of the stage reports the version installed and serving (reported
shadow); none reports refusing it (``detail.refused``); where agents report them in their
shadow ``detail``, ``error_rate`` and ``p95_ms`` stay under the limits and ``val_accuracy`` is
not below ``val_accuracy_active`` by more than ``accuracy_margin``; then all of it holds for the
soak period. A stage not installed within ``stage_timeout_s`` fails too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from coordinator.rollout.errors import RolloutError
from coordinator.rollout.plan import stage_agents
from coordinator.store import RolloutRecord
from protocol.errors import Reason
from protocol.messages import Shadow


@dataclass(frozen=True)
class GateConfig:
    """Limits a stage must meet, and how long it must meet them, before the next stage starts."""

    soak_s: float = 30.0
    stage_timeout_s: float = 600.0
    max_error_rate: float | None = 0.05
    max_p95_ms: float | None = None
    accuracy_margin: float = 0.02

    def __post_init__(self) -> None:
        for name in ("soak_s", "stage_timeout_s", "accuracy_margin"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise RolloutError(f"{name} must be a finite number >= 0, got {value}", reason=Reason.BAD_CONFIG)
        for name in ("max_error_rate", "max_p95_ms"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise RolloutError(f"{name} must be a finite number >= 0, got {value}", reason=Reason.BAD_CONFIG)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateConfig:
        """The gates stored in a rollout's config (other keys ignored)."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class AgentReport:
    """What one agent last reported on ``shadow/reported``."""

    version: str | None
    at: float = 0.0
    refused: str | None = None
    reason: str | None = None
    error_rate: float | None = None
    p95_ms: float | None = None
    val_accuracy: float | None = None
    val_accuracy_active: float | None = None

    @classmethod
    def from_shadow(cls, sh: Shadow) -> AgentReport:
        """The report carried by a reported shadow (non-finite or non-numeric figures dropped)."""
        d = sh.detail

        def num(v: float | None) -> float | None:
            return v if v is not None and math.isfinite(v) else None

        return cls(version=sh.version, at=sh.at, refused=d.refused, reason=d.reason, error_rate=num(d.error_rate),
                   p95_ms=num(d.p95_ms), val_accuracy=num(d.val_accuracy),
                   val_accuracy_active=num(d.val_accuracy_active))


@dataclass(frozen=True)
class Decision:
    """One gate decision: wait, advance a stage, complete, or fail (with a reason)."""

    action: Literal["wait", "advance", "complete", "fail"]
    healthy_since: float | None = None
    reason: Reason | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def evaluate(r: RolloutRecord, reports: Mapping[str, AgentReport], now: float) -> Decision:
    """The gate decision for a running rollout's current stage."""
    cfg = GateConfig.from_dict(r.config)
    agents = stage_agents(r)
    waiting: list[str] = []
    for a in agents:
        rep = reports.get(a)
        if rep is None:
            waiting.append(a)
            continue
        if rep.refused == r.version and rep.at >= r.created_at:
            return Decision("fail", reason=Reason.INSTALL_REFUSED,
                            detail={"agent": a, "agent_reason": rep.reason or "unknown"})
        if rep.version != r.version:
            waiting.append(a)
            continue
        if cfg.max_error_rate is not None and rep.error_rate is not None and rep.error_rate > cfg.max_error_rate:
            return Decision("fail", reason=Reason.ERROR_RATE, detail={"agent": a, "error_rate": rep.error_rate,
                                                                 "limit": cfg.max_error_rate})
        if cfg.max_p95_ms is not None and rep.p95_ms is not None and rep.p95_ms > cfg.max_p95_ms:
            return Decision("fail", reason=Reason.LATENCY_P95, detail={"agent": a, "p95_ms": rep.p95_ms,
                                                                  "limit": cfg.max_p95_ms})
        if (rep.val_accuracy is not None and rep.val_accuracy_active is not None
                and rep.val_accuracy < rep.val_accuracy_active - cfg.accuracy_margin):
            return Decision("fail", reason=Reason.ACCURACY, detail={"agent": a, "val_accuracy": rep.val_accuracy,
                                                               "val_accuracy_active": rep.val_accuracy_active,
                                                               "margin": cfg.accuracy_margin})
    started = r.stage_started_at if r.stage_started_at is not None else r.created_at
    if waiting:
        if now - started > cfg.stage_timeout_s:
            return Decision("fail", reason=Reason.INSTALL_TIMEOUT, detail={"agents": waiting[:20]})
        return Decision("wait", healthy_since=None, detail={"waiting": len(waiting)})
    healthy_since = r.healthy_since if r.healthy_since is not None else now
    if now - healthy_since < cfg.soak_s:
        return Decision("wait", healthy_since=healthy_since)
    if r.stage + 1 >= len(r.stages):
        return Decision("complete", healthy_since=healthy_since)
    return Decision("advance", healthy_since=healthy_since)

"""Staged rollouts: a person approves a candidate; the model goes to a cohort stage by stage,
each stage gated on what its agents report, and a failed gate undoes the stage by itself.

Three layers:

* pure functions — :func:`plan_stages` (cumulative agents per stage, each stage ≥ 1 new agent),
  :func:`order_agents` (deterministic, per-version order, so the canary is not always the same
  box), :func:`select_cohort`, :func:`evaluate` (one gate decision from a rollout record, the
  agents' latest reports and the clock) and :func:`desired_targets` (which version each agent
  must be desired to serve right now);
* :class:`RolloutController` — the commands a person gives (approve, start, pause, resume,
  rollback; each refused with a reason and the store unchanged when it does not apply) and
  ``tick`` (applies :func:`evaluate` and persists the result). It only talks to the store, so
  the CLI uses it directly;
* :class:`RolloutDriver` — a thread in the coordinator process: listens to reported shadows,
  calls ``tick`` and reconciles desired shadows (store + retained MQTT message) with
  :func:`desired_targets`. Everything it needs is in the store, so a restarted coordinator
  resumes an open rollout where it was.

Gates per stage: every agent of the stage reports the version installed and serving (reported
shadow); none reports refusing it (``detail.refused``); where agents report them in their
shadow ``detail``, ``error_rate`` and ``p95_ms`` stay under the limits and ``val_accuracy`` is
not below ``val_accuracy_active`` by more than ``accuracy_margin``; then all of it holds for the
soak period. A stage not installed within ``stage_timeout_s`` fails too.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from coordinator.lifecycle import LifecycleError, transition
from coordinator.store import AgentRecord, DuplicateError, ModelRecord, RolloutRecord, Store, StoreError
from protocol.errors import ManifestError
from protocol.manifest import Manifest
from protocol.messages import Shadow
from protocol.signing import TrustStore
from protocol.topics import Topics
from protocol.transport import Transport

log = logging.getLogger("fedscan.coordinator.rollout")

OPEN_STATES = ("running", "paused", "rolling_back")
DEFAULT_STAGES: tuple[float, ...] = (5.0, 25.0, 100.0)


class RolloutError(ValueError):
    """A refused rollout command; ``reason`` is machine-readable and the store is unchanged."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return f"[{self.reason}] {super().__str__()}"


@dataclass(frozen=True)
class GateConfig:
    soak_s: float = 30.0
    stage_timeout_s: float = 600.0
    max_error_rate: float | None = 0.05
    max_p95_ms: float | None = None
    accuracy_margin: float = 0.02

    def __post_init__(self) -> None:
        for name in ("soak_s", "stage_timeout_s", "accuracy_margin"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise RolloutError(f"{name} must be a finite number >= 0, got {value}", reason="bad_config")
        for name in ("max_error_rate", "max_p95_ms"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise RolloutError(f"{name} must be a finite number >= 0, got {value}", reason="bad_config")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------------- pure functions
def plan_stages(n_agents: int, percents: Sequence[float]) -> list[int]:
    """Cumulative number of agents per stage: ``ceil(p% of n)``, at least one more than the stage
    before, the last stage reaching every agent; stages that would add nobody are dropped."""
    if n_agents < 1:
        raise RolloutError("the cohort is empty", reason="empty_cohort")
    if not percents:
        raise RolloutError("no stages given", reason="bad_stages")
    prev_p = 0.0
    for p in percents:
        if not math.isfinite(p) or p <= 0 or p > 100 or p <= prev_p:
            raise RolloutError(f"stages must be increasing percentages in (0, 100], got {list(percents)}",
                               reason="bad_stages")
        prev_p = p
    if percents[-1] != 100:
        raise RolloutError(f"the last stage must be 100 %, got {percents[-1]}", reason="bad_stages")
    out: list[int] = []
    for p in percents:
        n = min(n_agents, max(math.ceil(p * n_agents / 100 - 1e-9), (out[-1] + 1) if out else 1))
        if not out or n > out[-1]:
            out.append(n)
    return out


def order_agents(agent_ids: Iterable[str], version: str) -> list[str]:
    """Deterministic rollout order: by SHA-256 of ``version:agent`` (then id)."""
    return sorted(agent_ids, key=lambda a: (hashlib.sha256(f"{version}:{a}".encode()).hexdigest(), a))


def select_cohort(agents: Iterable[AgentRecord], *, profile: str | None, tags: Sequence[str]) -> list[AgentRecord]:
    """Agents of ``profile`` (any if None) carrying every one of ``tags``."""
    want = set(tags)
    return [a for a in agents if (profile is None or a.profile == profile) and want <= set(a.tags)]


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
        d = sh.detail

        def num(key: str) -> float | None:
            v = d.get(key)
            return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None

        refused = d.get("refused")
        reason = d.get("reason")
        return cls(version=sh.version, at=sh.at, refused=refused if isinstance(refused, str) else None,
                   reason=reason if isinstance(reason, str) else None, error_rate=num("error_rate"),
                   p95_ms=num("p95_ms"), val_accuracy=num("val_accuracy"),
                   val_accuracy_active=num("val_accuracy_active"))


@dataclass(frozen=True)
class Decision:
    action: Literal["wait", "advance", "complete", "fail"]
    healthy_since: float | None = None
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def stage_agents(r: RolloutRecord, stage: int | None = None) -> list[str]:
    return r.agents[: r.stages[r.stage if stage is None else stage]]


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
            return Decision("fail", reason="install_refused",
                            detail={"agent": a, "agent_reason": rep.reason or "unknown"})
        if rep.version != r.version:
            waiting.append(a)
            continue
        if cfg.max_error_rate is not None and rep.error_rate is not None and rep.error_rate > cfg.max_error_rate:
            return Decision("fail", reason="error_rate", detail={"agent": a, "error_rate": rep.error_rate,
                                                                 "limit": cfg.max_error_rate})
        if cfg.max_p95_ms is not None and rep.p95_ms is not None and rep.p95_ms > cfg.max_p95_ms:
            return Decision("fail", reason="latency_p95", detail={"agent": a, "p95_ms": rep.p95_ms,
                                                                  "limit": cfg.max_p95_ms})
        if (rep.val_accuracy is not None and rep.val_accuracy_active is not None
                and rep.val_accuracy < rep.val_accuracy_active - cfg.accuracy_margin):
            return Decision("fail", reason="accuracy", detail={"agent": a, "val_accuracy": rep.val_accuracy,
                                                               "val_accuracy_active": rep.val_accuracy_active,
                                                               "margin": cfg.accuracy_margin})
    started = r.stage_started_at if r.stage_started_at is not None else r.created_at
    if waiting:
        if now - started > cfg.stage_timeout_s:
            return Decision("fail", reason="install_timeout", detail={"agents": waiting[:20]})
        return Decision("wait", healthy_since=None, detail={"waiting": len(waiting)})
    healthy_since = r.healthy_since if r.healthy_since is not None else now
    if now - healthy_since < cfg.soak_s:
        return Decision("wait", healthy_since=healthy_since)
    if r.stage + 1 >= len(r.stages):
        return Decision("complete", healthy_since=healthy_since)
    return Decision("advance", healthy_since=healthy_since)


def desired_targets(r: RolloutRecord) -> dict[str, str]:
    """Which version each agent touched by an open rollout must be desired to serve now."""
    if r.state in ("running", "paused"):
        return {a: r.version for a in stage_agents(r)}
    if r.state == "rolling_back":
        return {a: prev for a in stage_agents(r) if (prev := r.previous.get(a)) is not None}
    return {}


# ---------------------------------------------------------------------------------- controller
class RolloutController:
    """Commands on rollouts (refused with a reason, store unchanged) and the gate ``tick``."""

    def __init__(self, store: Store, trust: TrustStore | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store, self.trust, self.clock = store, trust, clock

    # -- person's commands ------------------------------------------------------------------------
    def approve(self, version: str) -> ModelRecord:
        try:
            return transition(self.store, version, "approved")
        except LifecycleError as exc:
            raise RolloutError(str(exc.args[0]), reason=exc.reason) from exc

    def open_rollout(self) -> RolloutRecord | None:
        return next((r for r in reversed(self.store.list_rollouts()) if r.state in OPEN_STATES), None)

    def get(self, rollout_id: int | None) -> RolloutRecord:
        if rollout_id is None:
            rs = self.store.list_rollouts()
            r = self.open_rollout() or (rs[-1] if rs else None)
        else:
            r = self.store.get_rollout(rollout_id)
        if r is None:
            raise RolloutError("no such rollout" if rollout_id is not None else "no rollouts yet",
                               reason="unknown_rollout")
        return r

    def start(self, version: str, *, profile: str | None = None, tags: Sequence[str] = (),
              stages: Sequence[float] = DEFAULT_STAGES, gates: GateConfig | None = None) -> RolloutRecord:
        gates = gates or GateConfig()
        model = self.store.get_model(version)
        if model is None:
            raise RolloutError(f"no model {version!r}", reason="unknown_version")
        if model.state not in ("approved", "active"):
            raise RolloutError(f"model {version} is {model.state}; a person must approve it first",
                               reason="not_approved")
        self._check_signature(model)
        cohort = select_cohort(self.store.list_agents(), profile=profile, tags=tags)
        if not cohort:
            raise RolloutError(f"no enrolled agent matches profile={profile} tags={list(tags)}", reason="empty_cohort")
        plan = plan_stages(len(cohort), stages)
        order = order_agents([a.agent_id for a in cohort], version)
        by_id = {a.agent_id: a for a in cohort}
        previous = {a: by_id[a].desired_version or by_id[a].reported_version for a in order}
        if self.open_rollout() is not None:
            raise RolloutError("another rollout is still open", reason="rollout_open")
        try:
            r = self.store.create_rollout(version=version, cohort={"profile": profile, "tags": list(tags)},
                                          stages=plan, agents=order, previous=previous,
                                          config={**asdict(gates), "percents": list(stages)}, at=self.clock())
        except DuplicateError as exc:
            raise RolloutError(str(exc), reason="rollout_open") from exc
        if model.state == "approved":
            transition(self.store, version, "canary")
        self.store.record_event("rollout_started", reason=version,
                                detail={"rollout": r.rollout_id, "stages": plan, "agents": order})
        log.info("rollout %d of %s started: %d agents in stages %s", r.rollout_id, version, len(order), plan)
        return r

    def _check_signature(self, model: ModelRecord) -> None:
        if self.trust is None:
            return
        try:
            self.trust.verify_manifest(Manifest.model_validate(model.manifest))
        except ManifestError as exc:
            raise RolloutError(f"model {model.version}: {exc}", reason=f"untrusted_{exc.reason}") from exc
        except ValueError as exc:
            raise RolloutError(f"model {model.version}: stored manifest invalid: {exc}", reason="bad_manifest") from exc

    def _set(self, r: RolloutRecord, expect: str, **values: Any) -> RolloutRecord:
        try:
            return self.store.update_rollout(r.rollout_id, expect_state=expect, **values)
        except StoreError as exc:
            raise RolloutError(str(exc), reason="bad_state") from exc

    def pause(self, rollout_id: int | None = None) -> RolloutRecord:
        r = self.get(rollout_id)
        if r.state != "running":
            raise RolloutError(f"rollout {r.rollout_id} is {r.state}, not running", reason="bad_state")
        out = self._set(r, "running", state="paused", healthy_since=None)
        self.store.record_event("rollout_paused", detail={"rollout": r.rollout_id, "stage": r.stage})
        return out

    def resume(self, rollout_id: int | None = None) -> RolloutRecord:
        r = self.get(rollout_id)
        if r.state != "paused":
            raise RolloutError(f"rollout {r.rollout_id} is {r.state}, not paused", reason="bad_state")
        out = self._set(r, "paused", state="running", stage_started_at=self.clock(), healthy_since=None)
        self.store.record_event("rollout_resumed", detail={"rollout": r.rollout_id, "stage": r.stage})
        return out

    def rollback(self, rollout_id: int | None = None, *, reason: str = "manual",
                 detail: dict[str, Any] | None = None) -> RolloutRecord:
        r = self.get(rollout_id)
        if r.state not in ("running", "paused"):
            raise RolloutError(f"rollout {r.rollout_id} is {r.state}; only a running or paused one rolls back",
                               reason="bad_state")
        out = self._set(r, r.state, state="rolling_back", reason=reason, detail=detail)
        model = self.store.get_model(r.version)
        if model is not None and model.state == "canary":
            # a failed gate retires the model; a person's rollback returns it to approved (may retry)
            transition(self.store, r.version, "approved" if reason == "manual" else "retired")
        self.store.record_event("rollout_rollback", reason=reason[:128],
                                detail={"rollout": r.rollout_id, "stage": r.stage, **(detail or {})})
        log.warning("rollout %d of %s: rolling back stage %d (%s %s)", r.rollout_id, r.version, r.stage, reason,
                    detail or "")
        return out

    # -- driver's step ----------------------------------------------------------------------------
    def tick(self, reports: Mapping[str, AgentReport]) -> RolloutRecord | None:
        """Apply the gates to the open running rollout; persist and return its new record."""
        r = self.open_rollout()
        if r is None or r.state != "running":
            return r
        now = self.clock()
        d = evaluate(r, reports, now)
        try:
            if d.action == "fail":
                return self.rollback(r.rollout_id, reason=d.reason or "gate_failed", detail=d.detail)
            if d.action == "wait":
                if d.healthy_since != r.healthy_since:
                    return self._set(r, "running", healthy_since=d.healthy_since)
                return r
            if d.action == "complete":
                out = self._set(r, "running", state="complete", healthy_since=d.healthy_since)
                model = self.store.get_model(r.version)
                if model is not None and model.state == "canary":
                    transition(self.store, r.version, "active")
                self.store.record_event("rollout_complete", reason=r.version, detail={"rollout": r.rollout_id})
                log.info("rollout %d of %s complete (%d agents)", r.rollout_id, r.version, len(r.agents))
                return out
            out = self._set(r, "running", stage=r.stage + 1, stage_started_at=now, healthy_since=None)
            self.store.record_event("rollout_stage", reason=r.version,
                                    detail={"rollout": r.rollout_id, "stage": r.stage + 1,
                                            "agents": r.stages[r.stage + 1]})
            log.info("rollout %d of %s: stage %d healthy, stage %d (%d agents)", r.rollout_id, r.version, r.stage,
                     r.stage + 1, r.stages[r.stage + 1])
            return out
        except RolloutError as exc:  # a person paused or rolled back between our read and our write
            log.info("rollout %d changed under the driver: %s", r.rollout_id, exc)
            return self.store.get_rollout(r.rollout_id)

    def finish_rollback(self, r: RolloutRecord) -> RolloutRecord:
        out = self._set(r, "rolling_back", state="rolled_back")
        log.info("rollout %d of %s rolled back", r.rollout_id, r.version)
        return out


# ---------------------------------------------------------------------------------- driver
class RolloutDriver:
    """The coordinator-side loop: gates, then desired shadows (store + retained MQTT)."""

    def __init__(self, controller: RolloutController, transport: Transport, topics: Topics, *,
                 period_s: float = 0.5, publish_manifest: Callable[[str], None] | None = None) -> None:
        self.controller, self.store = controller, controller.store
        self.transport, self.topics, self.period_s = transport, topics, period_s
        self.publish_manifest = publish_manifest
        self._reports: dict[str, AgentReport] = {}
        self._lock = threading.Lock()
        self._published: set[str] = set()
        self._announced: set[str] = set()

    def on_report(self, agent: str, shadow: Shadow) -> None:
        """Called by the coordinator for every accepted ``shadow/reported``."""
        with self._lock:
            self._reports[agent] = AgentReport.from_shadow(shadow)

    def reports(self) -> dict[str, AgentReport]:
        with self._lock:
            out = dict(self._reports)
        for a in self.store.list_agents():  # before the retained report arrives, the store's view
            if a.agent_id not in out and a.reported_version is not None:
                out[a.agent_id] = AgentReport(version=a.reported_version)
        return out

    def adopt_new_agents(self) -> None:
        """Agents enrolled after the last model was published get the newest active model."""
        agents = [a for a in self.store.list_agents() if a.desired_version is None]
        active = self.store.latest_model(state="active") if agents else None
        if active is None:
            return
        for a in agents:
            self.store.set_desired_version(a.agent_id, active.version)
            self.transport.publish(self.topics.shadow_desired(a.agent_id), Shadow(version=active.version).to_bytes(),
                                   retain=True)

    def step(self) -> RolloutRecord | None:
        self.adopt_new_agents()
        r = self.controller.tick(self.reports())
        if r is None or r.state not in OPEN_STATES:
            return r
        if r.version not in self._announced and self.publish_manifest is not None:
            self.publish_manifest(r.version)
            self._announced.add(r.version)
        self._reconcile(r)
        if r.state == "rolling_back":
            r = self.controller.finish_rollback(r)
        return r

    def _reconcile(self, r: RolloutRecord) -> None:
        targets = desired_targets(r)
        if not targets:
            return
        current = {a.agent_id: a.desired_version for a in self.store.list_agents()}
        for agent, version in targets.items():
            key = f"{r.rollout_id}:{agent}:{version}"
            if agent not in current:
                continue  # removed from the fleet since the rollout started
            if current[agent] != version or key not in self._published:
                self.store.set_desired_version(agent, version)
                self.transport.publish(self.topics.shadow_desired(agent), Shadow(version=version).to_bytes(),
                                       retain=True)
                self._published.add(key)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.step()
            except Exception:  # the driver must outlive a bad tick (database busy, broker down)
                log.exception("rollout driver step failed")
            stop.wait(self.period_s)

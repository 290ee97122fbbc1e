"""Rollout commands and the gate step: what a person may do to a rollout, and ``tick``.

:class:`RolloutController` — the commands a person gives (approve, start, pause, resume,
rollback; each refused with a reason and the store unchanged when it does not apply) and
``tick`` (applies :func:`~coordinator.rollout.gates.evaluate` and persists the result). It only
talks to the store, so the CLI uses it directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from coordinator.lifecycle import LifecycleError, transition
from coordinator.rollout.errors import UNTRUSTED, RolloutError
from coordinator.rollout.gates import AgentReport, GateConfig, evaluate
from coordinator.rollout.plan import DEFAULT_STAGES, order_agents, plan_stages, select_cohort
from coordinator.states import OPEN_ROLLOUT_STATES, ModelState, RolloutState
from coordinator.store import DuplicateError, ModelRecord, RolloutRecord, Store, StoreError
from protocol.errors import ManifestError, Reason
from protocol.manifest import Manifest
from protocol.signing import TrustStore

log = logging.getLogger("fedscan.coordinator.rollout")


class RolloutController:
    """Commands on rollouts (refused with a reason, store unchanged) and the gate ``tick``."""

    def __init__(self, store: Store, trust: TrustStore | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store, self.trust, self.clock = store, trust, clock

    # -- person's commands ------------------------------------------------------------------------
    def approve(self, version: str) -> ModelRecord:
        """A person approves a candidate: it may now be rolled out."""
        try:
            return transition(self.store, version, ModelState.APPROVED)
        except LifecycleError as exc:
            raise RolloutError(exc.message, reason=exc.reason) from exc

    def open_rollout(self) -> RolloutRecord | None:
        """The rollout still running, paused or rolling back, if any."""
        return next((r for r in reversed(self.store.list_rollouts()) if r.state in OPEN_ROLLOUT_STATES), None)

    def get(self, rollout_id: int | None) -> RolloutRecord:
        """Rollout ``rollout_id``; with None the open one, else the newest."""
        if rollout_id is None:
            rs = self.store.list_rollouts()
            r = self.open_rollout() or (rs[-1] if rs else None)
        else:
            r = self.store.get_rollout(rollout_id)
        if r is None:
            raise RolloutError("no such rollout" if rollout_id is not None else "no rollouts yet",
                               reason=Reason.UNKNOWN_ROLLOUT)
        return r

    def start(self, version: str, *, profile: str | None = None, tags: Sequence[str] = (),
              stages: Sequence[float] = DEFAULT_STAGES, gates: GateConfig | None = None) -> RolloutRecord:
        """Start rolling an approved (or active), correctly signed ``version`` out to a cohort."""
        gates = gates or GateConfig()
        model = self.store.get_model(version)
        if model is None:
            raise RolloutError(f"no model {version!r}", reason=Reason.UNKNOWN_VERSION)
        if model.state not in (ModelState.APPROVED, ModelState.ACTIVE):
            raise RolloutError(f"model {version} is {model.state}; a person must approve it first",
                               reason=Reason.NOT_APPROVED)
        self._check_signature(model)
        cohort = select_cohort(self.store.list_agents(), profile=profile, tags=tags)
        if not cohort:
            raise RolloutError(f"no enrolled agent matches profile={profile} tags={list(tags)}", reason=Reason.EMPTY_COHORT)
        plan = plan_stages(len(cohort), stages)
        order = order_agents([a.agent_id for a in cohort], version)
        by_id = {a.agent_id: a for a in cohort}
        previous = {a: by_id[a].desired_version or by_id[a].reported_version for a in order}
        if self.open_rollout() is not None:
            raise RolloutError("another rollout is still open", reason=Reason.ROLLOUT_OPEN)
        try:
            r = self.store.create_rollout(version=version, cohort={"profile": profile, "tags": list(tags)},
                                          stages=plan, agents=order, previous=previous,
                                          config={**asdict(gates), "percents": list(stages)}, at=self.clock())
        except DuplicateError as exc:
            raise RolloutError(exc.message, reason=Reason.ROLLOUT_OPEN) from exc
        if model.state == ModelState.APPROVED:
            transition(self.store, version, ModelState.CANARY)
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
            raise RolloutError(f"model {model.version}: {exc}",
                               reason=UNTRUSTED.get(exc.reason, Reason.UNTRUSTED_BAD_MANIFEST)) from exc
        except ValueError as exc:
            raise RolloutError(f"model {model.version}: stored manifest invalid: {exc}", reason=Reason.BAD_MANIFEST) from exc

    def _set(self, r: RolloutRecord, expect: RolloutState, **values: Any) -> RolloutRecord:
        try:
            return self.store.update_rollout(r.rollout_id, expect_state=expect, **values)
        except StoreError as exc:
            raise RolloutError(exc.message, reason=Reason.BAD_STATE) from exc

    def pause(self, rollout_id: int | None = None) -> RolloutRecord:
        """Hold a running rollout at its stage."""
        r = self.get(rollout_id)
        if r.state != RolloutState.RUNNING:
            raise RolloutError(f"rollout {r.rollout_id} is {r.state}, not running", reason=Reason.BAD_STATE)
        out = self._set(r, RolloutState.RUNNING, state=RolloutState.PAUSED, healthy_since=None)
        self.store.record_event("rollout_paused", detail={"rollout": r.rollout_id, "stage": r.stage})
        return out

    def resume(self, rollout_id: int | None = None) -> RolloutRecord:
        """Resume a paused rollout; its stage restarts its clock."""
        r = self.get(rollout_id)
        if r.state != RolloutState.PAUSED:
            raise RolloutError(f"rollout {r.rollout_id} is {r.state}, not paused", reason=Reason.BAD_STATE)
        out = self._set(r, RolloutState.PAUSED, state=RolloutState.RUNNING, stage_started_at=self.clock(), healthy_since=None)
        self.store.record_event("rollout_resumed", detail={"rollout": r.rollout_id, "stage": r.stage})
        return out

    def rollback(self, rollout_id: int | None = None, *, reason: Reason = Reason.MANUAL,
                 detail: dict[str, Any] | None = None) -> RolloutRecord:
        """Undo the reached stages: a person's (``manual``) or a failed gate's rollback."""
        r = self.get(rollout_id)
        if r.state not in (RolloutState.RUNNING, RolloutState.PAUSED):
            raise RolloutError(f"rollout {r.rollout_id} is {r.state}; only a running or paused one rolls back",
                               reason=Reason.BAD_STATE)
        out = self._set(r, r.state, state=RolloutState.ROLLING_BACK, reason=reason, detail=detail)
        model = self.store.get_model(r.version)
        if model is not None and model.state == ModelState.CANARY:
            # a failed gate retires the model; a person's rollback returns it to approved (may retry)
            transition(self.store, r.version, ModelState.APPROVED if reason == Reason.MANUAL else ModelState.RETIRED)
        self.store.record_event("rollout_rollback", reason=reason[:128],
                                detail={"rollout": r.rollout_id, "stage": r.stage, **(detail or {})})
        log.warning("rollout %d of %s: rolling back stage %d (%s %s)", r.rollout_id, r.version, r.stage, reason,
                    detail or "")
        return out

    # -- driver's step ----------------------------------------------------------------------------
    def tick(self, reports: Mapping[str, AgentReport]) -> RolloutRecord | None:
        """Apply the gates to the open running rollout; persist and return its new record."""
        r = self.open_rollout()
        if r is None or r.state != RolloutState.RUNNING:
            return r
        now = self.clock()
        d = evaluate(r, reports, now)
        try:
            if d.action == "fail":
                return self.rollback(r.rollout_id, reason=d.reason or Reason.GATE_FAILED, detail=d.detail)
            if d.action == "wait":
                if d.healthy_since != r.healthy_since:
                    return self._set(r, RolloutState.RUNNING, healthy_since=d.healthy_since)
                return r
            if d.action == "complete":
                out = self._set(r, RolloutState.RUNNING, state=RolloutState.COMPLETE, healthy_since=d.healthy_since)
                model = self.store.get_model(r.version)
                if model is not None and model.state == ModelState.CANARY:
                    transition(self.store, r.version, ModelState.ACTIVE)
                self.store.record_event("rollout_complete", reason=r.version, detail={"rollout": r.rollout_id})
                log.info("rollout %d of %s complete (%d agents)", r.rollout_id, r.version, len(r.agents))
                return out
            out = self._set(r, RolloutState.RUNNING, stage=r.stage + 1, stage_started_at=now, healthy_since=None)
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
        """Record that the desired shadows of a rolling-back rollout have been restored."""
        out = self._set(r, RolloutState.ROLLING_BACK, state=RolloutState.ROLLED_BACK)
        log.info("rollout %d of %s rolled back", r.rollout_id, r.version)
        return out

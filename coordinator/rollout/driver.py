"""The rollout driver: a thread in the coordinator process applying gates and desired shadows.

:class:`RolloutDriver` listens to reported shadows, calls the controller's ``tick`` and
reconciles desired shadows (store + retained MQTT message) with
:func:`~coordinator.rollout.plan.desired_targets`. Everything it needs is in the store, so a
restarted coordinator resumes an open rollout where it was.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from coordinator.rollout.controller import RolloutController
from coordinator.rollout.gates import AgentReport
from coordinator.rollout.plan import desired_targets
from coordinator.states import OPEN_ROLLOUT_STATES, ModelState, RolloutState
from coordinator.store import RolloutRecord
from protocol.messages import RollbackOrder, Shadow
from protocol.signing import SigningKey
from protocol.topics import Topics
from protocol.transport import Transport

log = logging.getLogger("fedscan.coordinator.rollout")


def rollback_shadow(*, fleet: str, agent: str, from_version: str, to_version: str, signer: SigningKey) -> Shadow:
    """Return a desired shadow that sends ``agent`` back from ``from_version`` to ``to_version``.

    It carries the signed :class:`~protocol.messages.RollbackOrder` agents require to move to an older model.
    """
    order = RollbackOrder(fleet=fleet, agent_id=agent, from_version=from_version, to_version=to_version,
                          issued_at=time.time())
    return Shadow(version=to_version, rollback=signer.sign_rollback(order))


class RolloutDriver:
    """The coordinator-side loop: gates, then desired shadows (store + retained MQTT)."""

    def __init__(self, controller: RolloutController, transport: Transport, topics: Topics, *,
                 period_s: float = 0.5, publish_manifest: Callable[[str], None] | None = None,
                 signer: SigningKey | None = None) -> None:
        self.controller, self.store = controller, controller.store
        self.signer = signer  # signs the rollback orders agents need to go back to an older model
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
        """The latest report per agent; the store's reported version for agents not heard from yet."""
        with self._lock:
            out = dict(self._reports)
        for a in self.store.list_agents():  # before the retained report arrives, the store's view
            if a.agent_id not in out and a.reported_version is not None:
                out[a.agent_id] = AgentReport(version=a.reported_version)
        return out

    def adopt_new_agents(self) -> None:
        """Agents enrolled after the last model was published get the newest active model."""
        agents = [a for a in self.store.list_agents() if a.desired_version is None]
        active = self.store.latest_model(state=ModelState.ACTIVE) if agents else None
        if active is None:
            return
        for a in agents:
            self.store.set_desired_version(a.agent_id, active.version)
            self.transport.publish(self.topics.shadow_desired(a.agent_id), Shadow(version=active.version).to_bytes(),
                                   retain=True)

    def step(self) -> RolloutRecord | None:
        """One pass: adopt new agents, apply the gates, publish what the open rollout wants served."""
        self.adopt_new_agents()
        r = self.controller.tick(self.reports())
        if r is None or r.state not in OPEN_ROLLOUT_STATES:
            return r
        if r.version not in self._announced and self.publish_manifest is not None:
            self.publish_manifest(r.version)
            self._announced.add(r.version)
        self._reconcile(r)
        if r.state == RolloutState.ROLLING_BACK:
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
                self.transport.publish(self.topics.shadow_desired(agent), self._desired(r, agent, version).to_bytes(),
                                       retain=True)
                self._published.add(key)

    def _desired(self, r: RolloutRecord, agent: str, version: str) -> Shadow:
        """The desired shadow; rolling back, with the signed order an agent needs to go back."""
        if r.state != RolloutState.ROLLING_BACK or self.signer is None or version == r.version:
            return Shadow(version=version)
        return rollback_shadow(fleet=self.topics.fleet, agent=agent, from_version=r.version, to_version=version,
                               signer=self.signer)

    def run(self, stop: threading.Event) -> None:
        """Step every ``period_s`` until ``stop`` is set; a failed step is logged and retried."""
        while not stop.is_set():
            try:
                self.step()
            except Exception:  # the driver must outlive a bad tick (database busy, broker down)
                log.exception("rollout driver step failed")
            stop.wait(self.period_s)

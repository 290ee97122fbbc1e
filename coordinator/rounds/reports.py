"""What agents report: the version each one serves (reported shadow) and their events.

:class:`ReportHandler` takes ``shadow/reported`` (the version the box runs, refusals of a
version it would not install, rollout gate figures) after checking it names the reporting agent
and a known model, records it, and passes it to the listeners (the rollout driver); and records
``events`` in the audit trail. Status and telemetry (presence) are
:class:`~coordinator.presence.PresenceTracker`'s.
"""

from __future__ import annotations

from collections.abc import Callable

from coordinator.rounds.inbound import Inbound
from coordinator.store import Store
from protocol.errors import FedscanError, MalformedMessage, Reason
from protocol.messages import Shadow, parse_message

ReportListener = Callable[[str, Shadow], None]


class ReportHandler:
    """The ``shadow/reported`` and ``events`` handlers."""

    def __init__(self, store: Store, inbound: Inbound) -> None:
        self.store, self.inbound = store, inbound
        self.listeners: list[ReportListener] = []

    def on_reported(self, topic: str, payload: bytes) -> None:
        """A reported shadow: the version a box serves (empty payload: retained message cleared)."""
        sender = self.inbound.sender(topic, "shadow")
        if sender is None or not payload:
            return
        agent, _ = sender
        if self.inbound.enrolled(agent, "shadow") is not None:
            return
        try:
            sh = parse_message(Shadow, payload)
        except MalformedMessage as exc:
            self.inbound.reject("shadow", agent, None, exc)
            return
        claimed = sh.detail.agent
        if claimed is not None and claimed != agent:
            self.inbound.reject("shadow", agent, None, FedscanError(f"shadow from {claimed!r} on {agent!r}'s topic",
                                                                    reason=Reason.TOPIC_MISMATCH))
            return
        if sh.version is not None and self.store.get_model(sh.version) is None:
            self.inbound.reject("shadow", agent, None, FedscanError(f"reported unknown model {sh.version!r}",
                                                                    reason=Reason.UNKNOWN_VERSION))
            return
        self.store.set_reported_version(agent, sh.version)
        if sh.detail.refused is not None:
            self.store.record_event("install_refused", agent_id=agent, reason=str(sh.detail.reason)[:128],
                                    detail={"version": sh.detail.refused, "serving": sh.version})
        for listener in self.listeners:
            listener(agent, sh)

    def on_event(self, topic: str, payload: bytes) -> None:
        """An agent's event, kept in the audit trail as it came (bounded)."""
        sender = self.inbound.sender(topic, "event")
        if sender is None:
            return
        agent, _ = sender
        if self.inbound.enrolled(agent, "event") is None:
            self.store.record_event("agent_event", agent_id=agent,
                                    detail={"raw": payload[:2000].decode("utf-8", "replace")})

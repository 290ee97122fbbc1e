"""The coordinator's live view of the fleet: who is enrolled and there, and what each box reports.

:class:`FleetView` subscribes to every agent's ``status`` (retained birth / Last Will),
``telemetry`` (QoS 0 samples) and ``shadow/reported`` + ``shadow/desired`` (served vs. wanted
model version), keeps the latest of each per agent plus a bounded history for charts, and
answers two readers: the Prometheus collector (:mod:`coordinator.fleet_metrics`) and
:meth:`FleetView.snapshot` (JSON for the dashboard, one page at a time).

With a ``roster`` (the coordinator's store) the list of agents and whether each is online come
from the store — every enrolled agent, paged and filtered by the database, with the presence
:class:`~coordinator.presence.PresenceTracker` keeps there, so the dashboard, ``/metrics`` and
``fedscan fleet ls`` give one answer, also right after a restart. Without one (tests, a bare
view) it lists the agents it heard from and an agent is *up* when its last status is not
``offline`` and its last telemetry (or birth message) is younger than ``stale_after_s``.
Messages that do not parse are counted and logged by topic and reason only, never by content.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from coordinator.fleet_metrics import FleetCollector, fleet_registry
from coordinator.fleet_state import AgentState, HistoryPoint
from coordinator.presence import STALE_AFTER_S, agent_presence
from coordinator.states import AgentPresence
from coordinator.store import AgentRecord, Store
from protocol.errors import MalformedMessage, UnknownTopic
from protocol.messages import Shadow, Status, Telemetry, parse_message
from protocol.topics import Kind, Topics
from protocol.transport import Transport

__all__ = ["AgentState", "FleetCollector", "FleetView", "HistoryPoint", "fleet_registry"]

log = logging.getLogger(__name__)


def _all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True


def _max(values: Iterable[Any]) -> float | None:
    nums = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return max(nums) if nums else None


def _row(st: AgentState, online: bool, presence: str, now: float, history_points: int) -> dict[str, Any]:
    t = st.telemetry
    hist = list(st.history)[-history_points:] if history_points > 0 else []
    return {
        "agent": st.agent,
        "online": online,
        "presence": presence,
        "status": st.status,
        "last_seen": st.last_seen,
        "age_s": None if st.last_seen is None else round(now - st.last_seen, 1),
        "model_version": st.model_version,
        "desired_version": st.desired_version,
        "drift": st.drift,
        "cpu_percent": t.cpu_percent if t else None,
        "memory_percent": t.memory_percent if t else None,
        "disk_percent": t.disk_percent if t else None,
        "temperatures_c": dict(t.temperatures_c) if t else {},
        "gpu": [g.model_dump(exclude_none=True) for g in t.gpu] if t else [],
        "training": dict(t.training) if t else {},
        "inference": dict(t.inference) if t else {},
        "history": {
            "t": [round(p.t - now, 1) for p in hist],
            "cpu": [p.cpu for p in hist],
            "mem": [p.mem for p in hist],
            "disk": [p.disk for p in hist],
            "gpu_util": [p.gpu_util for p in hist],
            "gpu_temp": [p.gpu_temp for p in hist],
        },
    }


class FleetView:
    """Every agent's latest status, telemetry and shadows, a bounded history, and presence."""

    def __init__(
        self,
        topics: Topics,
        *,
        stale_after_s: float = 30.0,
        history: int = 360,
        accept: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.time,
        roster: Store | None = None,
    ) -> None:
        self.topics = topics
        self.stale_after_s = stale_after_s
        self.history = history
        self.accept = accept
        self.clock = clock
        self.roster = roster
        self._lock = threading.Lock()
        self._agents: dict[str, AgentState] = {}
        self.counts: dict[str, int] = {"telemetry": 0, "status": 0, "shadow": 0, "malformed": 0, "refused": 0}

    # -- wiring -----------------------------------------------------------------------------------
    def attach(self, transport: Transport) -> None:
        """Subscribe on ``transport`` (connected or not: subscriptions survive reconnects)."""
        transport.subscribe(self.topics.all_agents(Kind.TELEMETRY), self.handle, qos=0)
        for kind in (Kind.STATUS, Kind.SHADOW_REPORTED, Kind.SHADOW_DESIRED):
            transport.subscribe(self.topics.all_agents(kind), self.handle, qos=1)

    def handle(self, topic: str, payload: bytes) -> None:
        """Take one message from an agent topic (malformed or refused ones are counted, not kept)."""
        try:
            parsed = self.topics.parse(topic)
            agent = parsed.agent
            if agent is None:
                return
            if self.accept is not None and not self.accept(agent):
                with self._lock:
                    self.counts["refused"] += 1
                return
            if parsed.kind is Kind.TELEMETRY:
                msg = parse_message(Telemetry, payload)
                if not _all_finite(msg.model_dump()):
                    raise MalformedMessage("Telemetry: non-finite number")
                self._on_telemetry(agent, msg)
            elif parsed.kind is Kind.STATUS:
                if not payload:  # retained status cleared
                    return
                self._on_status(agent, parse_message(Status, payload))
            elif parsed.kind in (Kind.SHADOW_REPORTED, Kind.SHADOW_DESIRED):
                if not payload:
                    return
                self._on_shadow(agent, parsed.kind, parse_message(Shadow, payload))
        except (MalformedMessage, UnknownTopic) as exc:
            with self._lock:
                self.counts["malformed"] += 1
            log.warning("fleet view: dropped message on %s: %s", topic, exc)

    def _state(self, agent: str) -> AgentState:
        st = self._agents.get(agent)
        if st is None:
            st = self._agents[agent] = AgentState(agent, history=deque(maxlen=self.history))
        return st

    def _on_telemetry(self, agent: str, msg: Telemetry) -> None:
        now = self.clock()
        point = HistoryPoint(
            t=now,
            cpu=msg.cpu_percent,
            mem=msg.memory_percent,
            disk=msg.disk_percent,
            gpu_util=_max(g.util_percent for g in msg.gpu),
            gpu_temp=_max(g.temp_c for g in msg.gpu),
        )
        with self._lock:
            st = self._state(agent)
            st.telemetry, st.last_seen = msg, now
            st.messages += 1
            key = tuple(msg.training.get(k) for k in ("round", "step", "state"))
            if key != st.progress_key:
                st.progress_key, st.progress_seen = key, now
            st.history.append(point)
            self.counts["telemetry"] += 1

    def _on_status(self, agent: str, msg: Status) -> None:
        if msg.role != "agent":
            return
        with self._lock:
            st = self._state(agent)
            st.status, st.status_at = msg.state, self.clock()
            self.counts["status"] += 1

    def _on_shadow(self, agent: str, kind: Kind, msg: Shadow) -> None:
        with self._lock:
            st = self._state(agent)
            if kind is Kind.SHADOW_REPORTED:
                st.reported_version = msg.version
            else:
                st.desired_version = msg.version
            self.counts["shadow"] += 1

    # -- reading ----------------------------------------------------------------------------------
    def _is_up(self, st: AgentState, now: float) -> bool:
        if st.status == "offline":
            return False
        seen = st.last_seen if st.last_seen is not None else st.status_at
        return seen is not None and now - seen <= self.stale_after_s

    def _merged(self, rec: AgentRecord) -> AgentState:
        """An enrolled agent as the store knows it, with what this process heard (telemetry, history).

        Caller holds the lock.
        """
        heard = self._agents.get(rec.agent_id)
        return AgentState(
            rec.agent_id, None if rec.last_seen is None else ("online" if rec.online else "offline"),
            heard.status_at if heard else None, rec.last_seen, heard.telemetry if heard else None,
            rec.reported_version, rec.desired_version, heard.messages if heard else 0,
            heard.progress_key if heard else None, heard.progress_seen if heard else None,
            heard.history if heard else deque(),
        )

    def agents(self) -> list[str]:
        """Every agent listed: the enrolled ones (with a roster), else those heard from; by id."""
        if self.roster is not None:
            return [a.agent_id for a in self.roster.list_agents()]
        with self._lock:
            return sorted(self._agents)

    def is_up(self, agent: str) -> bool:
        """Whether ``agent`` is online (with a roster: its presence in the store)."""
        if self.roster is not None:
            rec = self.roster.get_agent(agent)
            return rec is not None and agent_presence(rec, self.clock()) is AgentPresence.ONLINE
        with self._lock:
            st = self._agents.get(agent)
            return st is not None and self._is_up(st, self.clock())

    def states(self) -> Iterator[tuple[AgentState, bool]]:
        """A consistent copy of every agent's state with its up flag (history not copied)."""
        now = self.clock()
        records = self.roster.list_agents() if self.roster is not None else None
        with self._lock:
            if records is not None:
                merged = [(self._merged(r), agent_presence(r, now) is AgentPresence.ONLINE) for r in records]
            else:
                merged = [(st, self._is_up(st, now)) for st in sorted(self._agents.values(), key=lambda s: s.agent)]
            rows = [
                (
                    AgentState(
                        st.agent, st.status, st.status_at, st.last_seen, st.telemetry,
                        st.reported_version, st.desired_version, st.messages,
                        st.progress_key, st.progress_seen, deque(),
                    ),
                    up,
                )
                for st, up in merged
            ]
        yield from rows

    def snapshot(self, *, history_points: int = 120, offset: int = 0, limit: int | None = None,
                 query: str | None = None, online: bool | None = None) -> dict[str, Any]:
        """JSON-ready fleet state for the dashboard: one page of agents and the fleet's counts.

        ``query`` keeps agents whose id contains it (any case), ``online`` only the agents that are
        (True) or are not (False) online; ``matching`` says how many pass, ``total``/``online``
        count the whole fleet.
        """
        now = self.clock()
        if self.roster is not None:
            return self._roster_snapshot(now, history_points, offset, limit, query, online)
        with self._lock:
            everyone = [(st, self._is_up(st, now)) for st in sorted(self._agents.values(), key=lambda s: s.agent)]
            chosen = [(st, up) for st, up in everyone
                      if (not query or query.lower() in st.agent.lower()) and (online is None or up == online)]
            page = chosen[max(0, offset):][:limit] if limit is not None else chosen[max(0, offset):]
            agents = [_row(st, up, (AgentPresence.ONLINE if up else AgentPresence.OFFLINE).value, now, history_points)
                      for st, up in page]
        return {"generated_at": now, "agents": agents, "online": sum(up for _, up in everyone),
                "total": len(everyone), "matching": len(chosen), "offset": offset, "limit": limit}

    def _roster_snapshot(self, now: float, history_points: int, offset: int, limit: int | None, query: str | None,
                         online: bool | None) -> dict[str, Any]:
        assert self.roster is not None
        since = now - STALE_AFTER_S
        records, matching = self.roster.agents.page(offset=offset, limit=100 if limit is None else limit,
                                                    query=query, online=online, online_since=since)
        total, up = self.roster.agents.count_online(since)
        with self._lock:
            agents = []
            for rec in records:
                p = agent_presence(rec, now)
                agents.append(_row(self._merged(rec), p is AgentPresence.ONLINE, p.value, now, history_points))
        return {"generated_at": now, "agents": agents, "online": up, "total": total, "matching": matching,
                "offset": offset, "limit": limit}

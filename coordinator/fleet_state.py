"""What the coordinator knows of one agent from its messages: the fleet view's record types.

:class:`AgentState` is one agent's latest status, telemetry and shadows with a bounded history of
:class:`HistoryPoint` samples for the dashboard's charts; shared by the fleet view (which fills
them) and the Prometheus collector (which reads them).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from protocol.messages import Telemetry

TRAINING_ACTIVE_STATES = frozenset({"waiting", "running", "paused", "uploading"})


@dataclass(frozen=True)
class HistoryPoint:
    """One telemetry sample kept for the dashboard's charts."""

    t: float
    cpu: float | None
    mem: float | None
    disk: float | None
    gpu_util: float | None
    gpu_temp: float | None


@dataclass
class AgentState:
    """What the coordinator last heard from one agent."""

    agent: str
    status: str | None = None
    status_at: float | None = None  # coordinator clock
    last_seen: float | None = None  # coordinator clock, last telemetry
    telemetry: Telemetry | None = None
    reported_version: str | None = None
    desired_version: str | None = None
    messages: int = 0
    progress_key: tuple[Any, ...] | None = None  # (round, step, state) of the training section
    progress_seen: float | None = None  # coordinator clock when progress_key last changed
    history: deque[HistoryPoint] = field(default_factory=lambda: deque(maxlen=360))

    @property
    def model_version(self) -> str | None:
        """The version the box serves: its reported shadow, else what its telemetry says."""
        if self.reported_version is not None:
            return self.reported_version
        return self.telemetry.model_version if self.telemetry is not None else None

    @property
    def drift(self) -> bool:
        """Whether the agent serves another version than the one it is desired to serve."""
        return self.desired_version is not None and self.model_version != self.desired_version

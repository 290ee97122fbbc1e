"""The agent's unit of work: typed work items, the stop signal, the event sink.

The typed items are what the work thread takes; ``check_stop`` is how a wait is told to stop;
an ``EventSink`` is how a part of the agent puts an event on the record.

The transport's dispatcher thread only records and signals; everything slow (training, model
downloads, installs) runs on the agent's one work thread, in the order the items arrived.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from protocol.messages import RollbackOrder, Task

#: ``(kind, detail)`` of an agent event (``AgentEvent``) to publish; set by the agent.
EventSink = Callable[[str, dict[str, object]], None]


class Stopped(Exception):
    """The agent was told to stop while waiting."""


def check_stop(stop: threading.Event) -> None:
    """Raise :class:`Stopped` once ``stop`` is set (called inside every wait loop)."""
    if stop.is_set():
        raise Stopped("agent is stopping")


@dataclass(frozen=True)
class TrainRound:
    """A round the coordinator announced: train on local data, upload, wait for the ack."""

    task: Task


@dataclass(frozen=True)
class ServeModel:
    """The desired shadow names the model version this box should serve (back: with a signed order)."""

    version: str
    rollback: RollbackOrder | None = None


WorkItem = TrainRound | ServeModel

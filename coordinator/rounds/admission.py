"""Which complete updates a round takes: the synchronous rule and the asynchronous (FedBuff) one.

The intake hands each chunk of an enrolled agent to one :class:`Admission`, chosen once by the
round mode:

* :class:`SyncAdmission` — a round takes updates trained from its own base, for itself, while it
  is open; one per agent (a resend is answered ``duplicate``); anything for another round is
  refused ``round_closed``.
* :class:`AsyncAdmission` — the open round's buffer takes an update trained for an earlier
  round too, while it is at most ``max_staleness`` rounds old (discounted when aggregated); an
  update completed between two buffers waits for the next one; one per agent per buffer.

Both run with the open round's lock held and act through the intake (reassemble, accept,
refuse, answer duplicates), which they see as :class:`IntakeCore`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from coordinator.rounds.state import OpenRound
from coordinator.store import Store
from protocol.chunks import Chunk
from protocol.codec import Tensors
from protocol.errors import FedscanError, Reason


class IntakeCore(Protocol):
    """What an admission rule needs from the intake."""

    state: OpenRound

    def reassemble(self, agent: str, round_id: int, update_id: str, chunk: Chunk) -> bytes | None:
        """Add a chunk; the whole frame once complete."""
        ...

    def refuse(self, agent: str, round_id: int, update_id: str, err: FedscanError) -> None:
        """Record the refusal and answer ``rejected``."""
        ...

    def duplicate(self, agent: str, round_id: int, update_id: str) -> None:
        """Answer ``duplicate``: the agent's update is already in."""
        ...

    def accept(self, agent: str, task_round: int, update_id: str, frame: bytes, *, base_version: str,
               base: Tensors, staleness: int) -> None:
        """Decode, check, persist and acknowledge a complete update."""
        ...


class Admission(ABC):
    """One round mode's rule for which updates the open round takes."""

    def __init__(self, intake: IntakeCore, store: Store) -> None:
        self.intake, self.store = intake, store

    @abstractmethod
    def on_chunk(self, agent: str, round_id: int, update_id: str, chunk: Chunk) -> None:
        """A chunk of ``agent``'s update for ``round_id`` (lock held)."""

    @abstractmethod
    def opened(self) -> None:
        """A round was opened (lock held)."""


class SyncAdmission(Admission):
    """Synchronous rounds: only the open round's own updates, one per agent."""

    def opened(self) -> None:
        """Nothing waits for a synchronous round: an update for a round not open was refused."""

    def on_chunk(self, agent: str, round_id: int, update_id: str, chunk: Chunk) -> None:
        """Take the chunk if its round is open and the agent has no update in it yet."""
        state = self.intake.state
        if self.store.has_update(round_id, agent):
            self.intake.duplicate(agent, round_id, update_id)
            return
        if state.round_id != round_id:
            self.intake.refuse(agent, round_id, update_id,
                               FedscanError(f"round {round_id} is not open", reason=Reason.ROUND_CLOSED))
            return
        frame = self.intake.reassemble(agent, round_id, update_id, chunk)
        if frame is not None:
            assert state.base is not None and state.base_version is not None
            self.intake.accept(agent, round_id, update_id, frame, base_version=state.base_version, base=state.base,
                               staleness=0)


class AsyncAdmission(Admission):
    """Buffered asynchronous rounds (FedBuff): stale updates count while young enough."""

    def __init__(self, intake: IntakeCore, store: Store, *, max_staleness: int) -> None:
        super().__init__(intake, store)
        self.max_staleness = max_staleness
        self._deferred: list[tuple[str, int, str, bytes]] = []  # complete frames that arrived between buffers

    def on_chunk(self, agent: str, round_id: int, update_id: str, chunk: Chunk) -> None:
        """Reassemble; admit the complete update into the open buffer, or keep it for the next one."""
        if self.store.get_update(agent, update_id) is not None:  # a resend whose ack was lost
            self.intake.duplicate(agent, round_id, update_id)
            return
        frame = self.intake.reassemble(agent, round_id, update_id, chunk)
        if frame is None:
            return
        if self.intake.state.round_id is None:  # between two buffers: admitted when the next one opens
            self._deferred.append((agent, round_id, update_id, frame))
            return
        self._admit(agent, round_id, update_id, frame)

    def opened(self) -> None:
        """Admit the updates that completed while no buffer was open."""
        deferred, self._deferred = self._deferred, []
        for agent, task_round, update_id, frame in deferred:
            self._admit(agent, task_round, update_id, frame)

    def _admit(self, agent: str, task_round: int, update_id: str, frame: bytes) -> None:
        current = self.intake.state.round_id
        assert current is not None
        staleness = current - task_round
        task = self.store.get_round(task_round) if staleness >= 0 else None
        if task is None:
            self.intake.refuse(agent, task_round, update_id, FedscanError(
                f"round {task_round} was never announced", reason=Reason.ROUND_CLOSED))
        elif staleness > self.max_staleness:
            self.intake.refuse(agent, task_round, update_id, FedscanError(
                f"trained for round {task_round}, {staleness} rounds behind (max {self.max_staleness})",
                reason=Reason.TOO_STALE))
        elif self.store.has_update(current, agent):
            self.intake.refuse(agent, task_round, update_id, FedscanError(
                f"round {current} already holds an update from {agent}", reason=Reason.ALREADY_IN_BUFFER))
        else:
            self.intake.accept(agent, task_round, update_id, frame, base_version=task.base_version,
                               base=self.intake.state.tensors_of(task.base_version), staleness=staleness)

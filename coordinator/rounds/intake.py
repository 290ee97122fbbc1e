"""Update intake: chunks in, one acknowledged, durable update per agent and round out.

:class:`UpdateIntake` handles ``agents/{agent}/updates/{round}`` on the transport's dispatcher
thread: the sender must be enrolled; each chunk is checked and reassembled per agent
(:class:`~protocol.reassembly.Reassembler`: transfers keyed by (agent, transfer id) and bounded
per agent, so another agent can neither complete, replace nor evict them); the round mode's :class:`~coordinator.rounds.admission.Admission` decides whether
the open round takes the update. A complete update is decoded against the base it was trained
from, checked against what the store can hold, written to the blob store, recorded (the commit
point) and acknowledged ``accepted``; every refusal is answered ``rejected`` with its reason
(:func:`rejection_ack`, the one mapping from a refusal to an ``Ack``) and leaves nothing behind.
"""

from __future__ import annotations

import logging

from coordinator.rounds.admission import Admission, AsyncAdmission, SyncAdmission
from coordinator.rounds.inbound import Inbound
from coordinator.rounds.settings import RoundSettings
from coordinator.rounds.state import OpenRound
from coordinator.rounds.tasks import TaskAnnouncer
from coordinator.states import RoundMode
from coordinator.store import BlobStore, DuplicateError, Store
from coordinator.update_checks import check_storable
from protocol.chunks import Chunk, parse_chunk
from protocol.codec import Tensors
from protocol.errors import FedscanError, FrameError, Reason
from protocol.frame import decode_update
from protocol.messages import Ack
from protocol.reassembly import Reassembler
from protocol.topics import Topics
from protocol.transport import Transport

log = logging.getLogger("fedscan.coordinator")

def rejection_ack(update_id: str, round_id: int, err: FedscanError) -> Ack:
    """The one mapping from a refusal to the agent's ``Ack``: ``rejected`` with the reason and message."""
    return Ack(update_id=update_id, round_id=round_id, status="rejected", reason=err.reason, detail=err.message[:300])


class UpdateIntake:
    """The ``updates`` handler: reassembly per agent, admission by mode, acceptance and answers."""

    def __init__(self, *, store: Store, blobs: BlobStore, transport: Transport, topics: Topics, inbound: Inbound,
                 tasks: TaskAnnouncer, state: OpenRound, settings: RoundSettings) -> None:
        self.store, self.blobs, self.transport, self.topics = store, blobs, transport, topics
        self.inbound, self.tasks, self.state, self.settings = inbound, tasks, state, settings
        self._reassembler = Reassembler()  # keyed by (agent, transfer id), bounded per agent
        self.admission: Admission = (AsyncAdmission(self, store, max_staleness=settings.max_staleness)
                                     if settings.mode == RoundMode.ASYNC else SyncAdmission(self, store))

    def on_update(self, topic: str, payload: bytes) -> None:
        """One chunk on ``agents/{agent}/updates/{round}``."""
        sender = self.inbound.sender(topic, "update")
        if sender is None:
            return
        agent, round_id = sender
        assert round_id is not None
        refused = self.inbound.enrolled(agent, "update", round_id)
        if refused is not None:
            self._ack(agent, rejection_ack("?", round_id, refused))
            return
        try:
            chunk = parse_chunk(payload)
        except FrameError as exc:
            self.inbound.reject("update", agent, round_id, exc)
            return
        with self.state.lock:
            self.admission.on_chunk(agent, round_id, chunk.header.transfer_id, chunk)

    # -- what the admission rules act through (lock held) -------------------------------------------
    def reassemble(self, agent: str, round_id: int, update_id: str, chunk: Chunk) -> bytes | None:
        """Add a chunk to the agent's transfer; the whole frame once complete, else None.

        The last chunk of an incomplete transfer is answered with the missing indices.
        """
        try:
            transfer = self._reassembler.add(agent, chunk)
            frame = transfer.blob() if transfer.complete else None
        except FrameError as exc:
            self._reassembler.discard(agent, update_id)
            self.refuse(agent, round_id, update_id, exc)
            return None
        if frame is None:
            if chunk.header.index == chunk.header.count - 1:
                self._ack(agent, Ack(update_id=update_id, round_id=round_id, status="incomplete",
                                     missing=transfer.missing[:1000]))
            return None
        self._reassembler.discard(agent, update_id)
        return frame

    def refuse(self, agent: str, round_id: int, update_id: str, err: FedscanError) -> None:
        """Record the refusal and answer ``rejected``; the agent's task for that round is over."""
        self.inbound.reject("update", agent, round_id, err)
        self._ack(agent, rejection_ack(update_id, round_id, err))
        self.tasks.done(agent, round_id)  # it gets the current task next

    def duplicate(self, agent: str, round_id: int, update_id: str) -> None:
        """Answer ``duplicate``: this agent's update is already in (only ever about its own update)."""
        self._ack(agent, Ack(update_id=update_id, round_id=round_id, status="duplicate"))

    def accept(self, agent: str, task_round: int, update_id: str, frame: bytes, *, base_version: str,
               base: Tensors, staleness: int) -> None:
        """Decode and check a complete update, persist it in the open round and acknowledge it.

        The update was trained from ``base_version`` for ``task_round``; nothing is written unless
        every check passed.
        """
        round_id = self.state.round_id
        assert round_id is not None
        try:
            decoded = decode_update(frame, expected=self.state.specs, base=base,
                                    max_update_norm=self.settings.max_update_norm)
            h = decoded.header
            if h.agent_id != agent or h.round_id != task_round:
                raise FedscanError(f"frame says agent {h.agent_id} round {h.round_id}, topic says {agent} {task_round}",
                                   reason=Reason.TOPIC_MISMATCH)
            if h.base_version != base_version:
                raise FedscanError(f"update trained from {h.base_version}, round {task_round} base is {base_version}",
                                   reason=Reason.STALE_BASE)
            check_storable(h)  # before anything is written: a refused update leaves no blob behind
        except FedscanError as exc:
            self.refuse(agent, task_round, update_id, exc)
            return
        sha = self.blobs.put(frame)
        try:
            self.store.add_update(round_id=round_id, agent_id=agent, update_id=h.update_id,
                                  sample_count=h.sample_count, metrics=dict(h.metrics), blob_sha256=sha,
                                  nbytes=len(frame), staleness=staleness)
        except DuplicateError:
            self.duplicate(agent, task_round, update_id)
            return
        except ValueError as exc:  # a value the checks above let through: refused, its blob removed
            self.blobs.delete(sha)
            self.refuse(agent, task_round, update_id, FrameError(str(exc), reason=Reason.BAD_HEADER))
            return
        self.state.accepted.add(agent)  # its tensors stay in the blob store until the round closes
        self.tasks.done(agent)
        self.inbound.accepted += 1
        log.info("round %d: accepted update from %s (%d samples, %d bytes%s)", round_id, agent, h.sample_count,
                 len(frame), f", {staleness} rounds stale" if staleness else "")
        self._ack(agent, Ack(update_id=update_id, round_id=task_round, status="accepted"))
        self.state.lock.notify_all()

    # -- plumbing ---------------------------------------------------------------------------------------
    def _ack(self, agent: str, ack: Ack) -> None:
        self.transport.publish(self.topics.acks(agent), ack.to_bytes())

"""Tasks: telling each enrolled agent what to train, again until its update is in.

:class:`TaskAnnouncer` sends every agent without an accepted update the task of the open round
(every ``reannounce_s``, and at once when a box comes back online), with the uplink codec of
the round or of the agent's firmware profile. In async mode it remembers the task each agent is
working on and keeps re-sending that one while it can still count, so a slow box is not made
to start over.
"""

from __future__ import annotations

import logging
import time

from coordinator.rounds.settings import RoundSettings, round_training
from coordinator.rounds.state import RoundTask
from coordinator.states import RoundMode
from coordinator.store import Store
from coordinator.strategies import Strategy
from firmware.profile import CompressionSection, ProfileError, find_profile
from protocol.messages import Task, TrainingConfig
from protocol.topics import Topics
from protocol.transport import Transport

log = logging.getLogger("fedscan.coordinator")


class TaskAnnouncer:
    """Sends tasks on each agent's ``tasks`` topic; in async mode, tracks which task each one holds."""

    def __init__(self, store: Store, transport: Transport, topics: Topics, strategy: Strategy,
                 settings: RoundSettings) -> None:
        self.store, self.transport, self.topics = store, transport, topics
        self.strategy, self.settings = strategy, settings
        self._sent: dict[str, RoundTask] = {}  # async: agent -> the task it is working on
        self._profiles: dict[str, CompressionSection | None] = {}

    def training(self, round_id: int) -> TrainingConfig:
        """The training config of ``round_id``'s tasks."""
        return round_training(self.settings.training, self.strategy, self.settings.seed, round_id)

    def announce(self, task: RoundTask) -> None:
        """The task to every enrolled agent without an update in the round."""
        for agent in self.store.list_agents():
            if not self.store.has_update(task.round_id, agent.agent_id):
                self.send(agent.agent_id, agent.profile, self.task_for(agent.agent_id, task))

    def task_for(self, agent_id: str, current: RoundTask) -> RoundTask:
        """The task an agent should hold.

        The current round's, or in async mode the earlier task it is still working on while that
        one can still count (a re-announcement it ignores).
        """
        sent = self._sent.get(agent_id) if self.settings.mode == RoundMode.ASYNC else None
        if sent is not None and current.round_id - sent.round_id <= self.settings.max_staleness \
                and time.time() < sent.deadline:
            return sent
        return current

    def send(self, agent_id: str, profile: str, task: RoundTask) -> None:
        """Publish ``task`` to one agent."""
        codec, chunk_bytes, window = self.uplink_for(profile)
        msg = Task(round_id=task.round_id, base_version=task.base_version, deadline=task.deadline,
                   mode=self.settings.mode, training=self.training(task.round_id), codec=codec,
                   chunk_bytes=chunk_bytes, window=window, job=self.settings.job,
                   job_params=dict(self.settings.job_params))
        if self.settings.mode == RoundMode.ASYNC:
            self._sent[agent_id] = task
        self.transport.publish(self.topics.tasks(agent_id), msg.to_bytes())

    def done(self, agent_id: str, round_id: int | None = None) -> None:
        """The agent's task is over (its update was accepted, or refused for ``round_id``)."""
        sent = self._sent.get(agent_id)
        if sent is not None and (round_id is None or sent.round_id == round_id):
            del self._sent[agent_id]

    def uplink_for(self, profile_name: str) -> tuple[str, int, int]:
        """The uplink codec, chunk size and window for an agent of ``profile_name``.

        The round's codec, or with ``codec="profile"`` the one the agent's firmware profile asks
        for (its bandwidth class), falling back to ``raw`` when the profile has no compression section.
        """
        s = self.settings
        if s.codec != "profile":
            return s.codec, s.chunk_bytes, s.window
        if profile_name not in self._profiles:
            try:
                self._profiles[profile_name] = find_profile(profile_name).compression
            except ProfileError as exc:
                log.warning("profile %s unreadable (%s); sending raw updates", profile_name, exc)
                self._profiles[profile_name] = None
        c = self._profiles[profile_name]
        return (c.uplink, c.chunk_bytes, c.window) if c is not None else ("raw", s.chunk_bytes, s.window)

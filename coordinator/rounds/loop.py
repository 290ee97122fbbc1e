"""The coordinator's round loop: announce → collect → aggregate → evaluate → publish.

:class:`Coordinator` wires the parts (intake, tasks, downloads, reports, presence, publishing,
aggregation) on one transport and runs the rounds on the caller's thread; handlers run on the
transport's dispatcher thread and only validate, persist and acknowledge.

Every step is written to the state store before it is taken, so a coordinator killed at any
point resumes the round it was in: accepted updates live in the blob store + ``updates`` table
and are never lost or counted twice (one per (round, agent), one per (agent, update id)); a
round found ``aggregating`` is aggregated again from the same accepted updates,
deterministically (results sorted by agent id, strategy state restored from the base version).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from coordinator.model_repo import ModelRepository
from coordinator.presence import PresenceTracker
from coordinator.refusals import RefusalLog
from coordinator.rounds.aggregation import RoundCloser, RoundListener
from coordinator.rounds.downloads import DownloadServer
from coordinator.rounds.inbound import Inbound
from coordinator.rounds.intake import UpdateIntake
from coordinator.rounds.publishing import Calibrator, Evaluator, Exporter, ModelPublisher
from coordinator.rounds.reports import ReportHandler, ReportListener
from coordinator.rounds.settings import ModelSpec, RoundSettings
from coordinator.rounds.state import OpenRound, RoundTask
from coordinator.rounds.tasks import TaskAnnouncer
from coordinator.states import RoundStatus
from coordinator.store import BlobStore, Store
from coordinator.strategies import Strategy, check_round_size
from protocol.codec import Tensors
from protocol.errors import Reason
from protocol.manifest import ValidationBatch
from protocol.messages import Status
from protocol.signing import SigningKey
from protocol.topics import Kind, Topics
from protocol.transport import Transport

log = logging.getLogger("fedscan.coordinator")


class Coordinator:
    """Runs a federation's rounds over one transport, resuming from the store after a restart."""

    def __init__(
        self,
        *,
        store: Store,
        blobs: BlobStore,
        repo: ModelRepository,
        transport: Transport,
        topics: Topics,
        strategy: Strategy,
        settings: RoundSettings,
        model_spec: ModelSpec,
        initial_tensors: Callable[[], Tensors],
        evaluator: Evaluator | None = None,
        calibrator: Calibrator | None = None,
        exporter: Exporter | None = None,
        on_round: RoundListener | None = None,
        signer: SigningKey | None = None,
        validation_batch: ValidationBatch | None = None,
        refusals: RefusalLog | None = None,
        report_listeners: list[ReportListener] | None = None,
    ) -> None:
        check_round_size(strategy, settings.min_clients)
        self.store, self.blobs, self.repo, self.transport, self.topics = store, blobs, repo, transport, topics
        self.strategy, self.settings, self.initial_tensors = strategy, settings, initial_tensors
        self.refusals = refusals if refusals is not None else RefusalLog(store)
        self.state = OpenRound(repo, max_staleness=settings.max_staleness,
                               staleness_exponent=settings.staleness_exponent)
        self.tasks = TaskAnnouncer(store, transport, topics, strategy, settings)
        self.presence = PresenceTracker(store, topics, on_online=self._agent_online)
        self.inbound = Inbound(store, topics, self.refusals, self.presence)
        self.intake = UpdateIntake(store=store, blobs=blobs, transport=transport, topics=topics,
                                   inbound=self.inbound, tasks=self.tasks, state=self.state, settings=settings)
        self.downloads = DownloadServer(repo=repo, transport=transport, topics=topics, inbound=self.inbound,
                                        chunk_bytes=settings.chunk_bytes)
        self.reports = ReportHandler(store, self.inbound)
        self.reports.listeners.extend(report_listeners or [])
        self.publisher = ModelPublisher(store=store, repo=repo, transport=transport, topics=topics, spec=model_spec,
                                        settings=settings, evaluator=evaluator, calibrator=calibrator,
                                        exporter=exporter, signer=signer, validation_batch=validation_batch)
        self.closer = RoundCloser(store=store, blobs=blobs, transport=transport, strategy=strategy, state=self.state,
                                  publisher=self.publisher, on_round=on_round)

    @property
    def report_listeners(self) -> list[ReportListener]:
        """Called with every accepted reported shadow (the rollout driver listens here)."""
        return self.reports.listeners

    def publish_manifest(self, version: str) -> None:
        """Announce ``version``'s manifest (the rollout driver calls this)."""
        self.publisher.publish_manifest(version)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Clean up after a crash, subscribe the handlers, make ``v0`` if needed, announce ourselves."""
        self.repo.remove_partial()
        swept = self.blobs.sweep_temp(max_age_s=0)  # nothing of ours writes blobs before start()
        if swept:
            log.info("removed %d partial blob files left by a crash", swept)
        t = self.topics
        self.transport.subscribe(t.all_agents(Kind.UPDATES), self.intake.on_update)
        self.transport.subscribe(t.all_agents(Kind.MODEL_REQUEST), self.downloads.on_model_request)
        self.presence.attach(self.transport)
        self.transport.subscribe(t.all_agents(Kind.SHADOW_REPORTED), self.reports.on_reported)
        self.transport.subscribe(t.all_agents(Kind.EVENTS), self.reports.on_event)
        self.publisher.ensure_initial_model(self.initial_tensors, self.strategy)
        self.transport.publish(t.coordinator_status(), Status(state="online", role="coordinator").to_bytes(), retain=True)

    def _agent_online(self, agent: str) -> None:
        """An enrolled agent announced itself online: it may have missed its task (or restarted)."""
        record = self.store.get_agent(agent)
        current = self.state.task
        if record is not None and current is not None and not self.store.has_update(current.round_id, agent):
            self.tasks.send(record.agent_id, record.profile, self.tasks.task_for(agent, current))

    # -- round loop ----------------------------------------------------------------------------------
    def completed_rounds(self) -> int:
        """How many rounds completed (failed ones do not count)."""
        return self.store.rounds.count(RoundStatus.COMPLETE)

    def run(self, stop: threading.Event | None = None) -> None:
        """Resume the round in progress, then run rounds until ``settings.rounds`` completed or ``stop``."""
        stop = stop or threading.Event()
        latest = self.store.latest_round()
        if latest is not None and latest.status in (RoundStatus.COLLECTING, RoundStatus.AGGREGATING):
            log.info("resuming round %d (%s)", latest.round_id, latest.status)
            self._run_round(latest.round_id, stop, resume=True)
        while not stop.is_set() and self.completed_rounds() < self.settings.rounds:
            latest = self.store.latest_round()
            self._run_round((latest.round_id + 1) if latest else 1, stop, resume=False)

    def _load_base(self, version: str) -> None:
        self.state.load_base(version)
        self.strategy.load_state_dict(self.repo.strategy_state(version))

    def _run_round(self, round_id: int, stop: threading.Event, *, resume: bool) -> None:
        if resume:
            rec = self.store.get_round(round_id)
            assert rec is not None
            task = RoundTask(round_id, rec.base_version, rec.deadline)
            if rec.status == RoundStatus.AGGREGATING:
                self._load_base(task.base_version)
                self.closer.close(round_id)
                return
        else:
            latest_model = self.store.latest_model()
            assert latest_model is not None
            task = RoundTask(round_id, latest_model.version, time.time() + self.settings.deadline_s)
        with self.state.lock:  # recorded and opened at once: a handler never sees a recorded round that is not open
            if not resume:
                self.store.create_round(round_id, base_version=task.base_version,
                                        config=self.tasks.training(round_id).model_dump(), deadline=task.deadline,
                                        mode=self.settings.mode)
            self._load_base(task.base_version)
            self.state.task = task
            self.state.accepted = set()
            self.intake.admission.opened()
        log.info("round %d: collecting from base %s (min %d clients, deadline in %.0fs)", round_id,
                 task.base_version, self.settings.min_clients, task.deadline - time.time())
        self._collect(task, stop)
        with self.state.lock:
            self.state.task = None
        if stop.is_set():
            return
        updates = self.store.list_updates(round_id)
        if not updates:
            log.warning("round %d: deadline passed with no updates; round failed", round_id)
            self.store.set_round_status(round_id, RoundStatus.FAILED,
                                        detail={"reason": Reason.NO_UPDATES_BEFORE_DEADLINE})
            return
        if len(updates) < self.settings.min_clients:
            log.warning("round %d: deadline passed with %d/%d updates; aggregating what arrived", round_id,
                        len(updates), self.settings.min_clients)
        self.closer.close(round_id)

    def _collect(self, task: RoundTask, stop: threading.Event) -> None:
        """Announce (again every ``reannounce_s``) until ``min_clients`` updates are in or the deadline."""
        last_announce = 0.0
        while not stop.is_set():
            with self.state.lock:
                if len(self.store.list_updates(task.round_id)) >= self.settings.min_clients:
                    return
                if time.time() >= task.deadline:
                    return
            if time.monotonic() - last_announce >= self.settings.reannounce_s:
                self.tasks.announce(task)
                last_announce = time.monotonic()
            self.refusals.flush()
            with self.state.lock:
                self.state.lock.wait(timeout=0.5)

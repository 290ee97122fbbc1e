"""The edge agent process loop: announce itself, take tasks and desired models, do them in order.

Threads: the transport's dispatcher runs the handlers (they only parse, record and enqueue typed
:mod:`~edge_agent.work` items); one work thread trains and installs, in order. The parts:
:class:`~edge_agent.fetcher.ModelFetcher` (manifests, downloads),
:class:`~edge_agent.installer.ModelInstaller` (verify, store, activate),
:class:`~edge_agent.training_job.TrainingJob` (local training, update frame),
:class:`~edge_agent.outbox.Outbox` and :class:`~edge_agent.uploader.Uploader` (durable upload
until acknowledged). The last encoded update of each round is kept in the outbox so a restarted
agent resends the same bytes (same update id: the coordinator answers ``duplicate`` if it had it).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.artifact_rebuild import ArtifactRebuilder
from edge_agent.engine_report import EngineReport
from edge_agent.fetcher import ModelFetcher
from edge_agent.installer import InstallError, ModelInstaller
from edge_agent.jobs import JobError, TrainerRegistry
from edge_agent.outbox import Binding, Outbox, new_update_id
from edge_agent.private_training import PrivacyStateError
from edge_agent.training_job import TrainingJob, TrainingObserver
from edge_agent.trust import TrustSource
from edge_agent.uploader import Uploader
from edge_agent.validation import validation_detail
from edge_agent.work import EventSink, ServeModel, Stopped, TrainRound, WorkItem
from firmware.profile import FirmwareProfile
from learning.privacy_accounting import BudgetExhausted
from learning.trainer import PauseHook, TrainData, TrainingCancelled
from protocol.errors import FrameError, MalformedMessage, ManifestError, Reason
from protocol.messages import AgentEvent, Shadow, ShadowDetail, Status, Task, parse_message
from protocol.signing import TrustStore
from protocol.topics import Topics
from protocol.transport import Transport

__all__ = ["AgentSettings", "EdgeAgent", "EventSink", "Stopped", "TrainingObserver"]

log = logging.getLogger("fedscan.agent")

DatasetProvider = Callable[[], TrainData | None]


@dataclass
class AgentSettings:
    """What an agent is and how patient it is."""

    agent_id: str
    profile: FirmwareProfile
    state_dir: Path
    fleet: str = "default"
    threads: int | None = None
    ack_timeout_s: float = 20.0
    model_timeout_s: float = 30.0
    software: str = "fedscan-0.1"
    #: trusted model-signing keys; ``None`` refuses every model unless ``insecure_unsigned_models``
    trust: TrustStore | TrustSource | None = None
    insecure_unsigned_models: bool = False  # development only (see edge_agent.trust)
    #: rebuild ONNX FP32 artifacts from the installed weights instead of downloading them (when identical)
    rebuild_artifacts: bool = True


class EdgeAgent:
    """One box's federated-learning side: tasks in, updates out, models in (see the module doc).

    Collaborators come in through the constructor: ``dataset`` (a fixed local dataset) or
    ``dataset_provider`` (called per round, e.g. the clinician-confirmed studies of the local
    store), ``training_observer`` (the agent's ``/metrics``), ``engine_report`` (which engine the
    activation listener chose, reported in the shadow), ``pause`` (the trainer's pause switch,
    shared with the resource gates) and ``jobs`` (the trainers of the jobs besides ``classify``
    this box runs, ``edge_agent.jobs``).
    """

    def __init__(
        self,
        settings: AgentSettings,
        transport: Transport,
        dataset: TrainData | None,
        *,
        dataset_provider: DatasetProvider | None = None,
        training_observer: TrainingObserver | None = None,
        engine_report: EngineReport | None = None,
        pause: PauseHook | None = None,
        jobs: TrainerRegistry | None = None,
    ) -> None:
        """Wire the agent's parts around ``transport`` (nothing is subscribed before ``start``)."""
        self.s = settings
        self.transport = transport
        self.dataset = dataset
        self.dataset_provider = dataset_provider
        self.engine_report = engine_report or EngineReport()
        self.topics = Topics(settings.fleet)
        self.pause = pause or PauseHook()
        self.installer = ModelInstaller(settings.state_dir / "models", trust=settings.trust,
                                        allow_unsigned=settings.insecure_unsigned_models,
                                        profile=settings.profile.name, agent_id=settings.agent_id,
                                        fleet=settings.fleet)
        self._stop = threading.Event()
        self.fetcher = ModelFetcher(settings.agent_id, transport, self.topics, self.installer, settings.profile,
                                    stop=self._stop, events=self._event, timeout_s=settings.model_timeout_s,
                                    rebuilder=ArtifactRebuilder(enabled=settings.rebuild_artifacts))
        self.training = TrainingJob(settings.agent_id, settings.profile, settings.state_dir, self.installer,
                                    self.fetcher.ensure_model, pause=self.pause, observer=training_observer,
                                    threads=settings.threads, jobs=jobs)
        self.outbox = Outbox(settings.state_dir / "outbox")
        self.uploader = Uploader(settings.agent_id, transport, self.topics, ack_timeout_s=settings.ack_timeout_s)
        self._work: queue.Queue[WorkItem | None] = queue.Queue()
        self._done_rounds: set[int] = set()
        self._current_task: int | None = None
        self.serving: str | None = None  # the version activated (verified) by this process

    @property
    def rounds_trained(self) -> int:
        """Training jobs finished since start."""
        return self.training.rounds_trained

    # -- wiring ---------------------------------------------------------------------------------
    def status_payload(self, state: str) -> bytes:
        """Encode the retained status message (``online``; ``offline`` is the Last Will)."""
        return Status(state=state, role="agent", profile=self.s.profile.name, software=self.s.software).to_bytes()

    def start(self) -> None:
        """Serve what was served before a restart (verified again), subscribe, announce, report."""
        t, a = self.topics, self.s.agent_id
        self.resume_serving()
        self.transport.subscribe(t.tasks(a), self._on_task)
        self.uploader.attach()
        self.fetcher.attach()
        self.transport.subscribe(t.shadow_desired(a), self._on_desired)
        self.transport.publish(t.status(a), self.status_payload("online"), retain=True)
        if self.serving is not None:
            self._report(self.serving)

    def resume_serving(self) -> str | None:
        """Activate the version the ``ACTIVE`` pointer names, verified against today's trust store.

        A model whose key was retired (or that fails its smoke test) is not served; the refusal is
        logged and put on the record, and the box waits for its desired model.
        """
        version = self.installer.active_version
        if version is None or self.serving == version:
            return self.serving
        try:
            self.installer.activate(version)
        except (ManifestError, InstallError) as exc:  # SignatureError, DirectionError are ManifestErrors
            log.error("agent %s: will not serve %s again: %s", self.s.agent_id, version, exc)
            self._event("install_refused", {"version": version, "reason": exc.reason, "at": "start"})
            return None
        self.serving = version
        return version

    def run(self, stop: threading.Event) -> None:
        """Take work items and do them in order until ``stop`` is set."""
        threading.Thread(target=self._wake_on_stop, args=(stop,), daemon=True).start()
        while not stop.is_set():
            try:
                item = self._work.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None or stop.is_set():
                return
            try:
                if isinstance(item, TrainRound):
                    self._handle_task(item.task, stop)
                else:
                    self._handle_desired(item)
            except (Stopped, TrainingCancelled):
                return
            except Exception as exc:
                kind = "task" if isinstance(item, TrainRound) else "desired"
                log.exception("agent %s: %s failed", self.s.agent_id, kind)
                self._event("error", {"while": kind, "error": str(exc)[:300]})

    def _wake_on_stop(self, stop: threading.Event) -> None:
        """Wake every wait when the agent is told to stop, so SIGTERM is obeyed promptly."""
        stop.wait()
        self._stop.set()
        self.pause.cancel()
        self.fetcher.wake()
        self.uploader.wake()

    def _event(self, kind: str, detail: dict[str, object]) -> None:
        self.transport.publish(self.topics.events(self.s.agent_id), AgentEvent(kind=kind, detail=detail).to_bytes())

    # -- handlers (dispatcher thread): parse, enqueue --------------------------------------------
    def _on_task(self, topic: str, payload: bytes) -> None:
        try:
            task = parse_message(Task, payload)
        except MalformedMessage as exc:
            log.warning("ignoring malformed task: %s", exc)
            return
        if task.round_id == self._current_task:
            return  # re-announcement of the round we are working on
        self._work.put(TrainRound(task))

    def _on_desired(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            sh = parse_message(Shadow, payload)
        except MalformedMessage as exc:
            log.warning("ignoring malformed desired shadow: %s", exc)
            return
        if sh.version is not None:
            self._work.put(ServeModel(sh.version, sh.rollback))

    # -- models ---------------------------------------------------------------------------------
    def _report(self, version: str | None, **detail: object) -> None:
        report = self.engine_report
        self.transport.publish(self.topics.shadow_reported(self.s.agent_id),
                               Shadow(version=version, engine=report.engine,
                                      detail=ShadowDetail(agent=self.s.agent_id,
                                                          skipped=report.detail().get("skipped", {}), **detail)
                                      ).to_bytes(), retain=True)

    def _handle_desired(self, item: ServeModel) -> None:
        version = item.version
        if self.serving == version:
            self._report(version)
            return
        previous = self.installer.active_version
        try:
            manifest = self.installer.manifest(version) if self.installer.has(version) else (
                self.fetcher.wait_manifest(version))
            self.installer.check_move(manifest, item.rollback)  # refuse a way back before downloading it
            self.fetcher.ensure_model(version)
            self.fetcher.fetch_artifacts(version)
            batch = self.fetcher.validation_batch(version)
            self.installer.activate(version, rollback=item.rollback)
            self.serving = version
        except (ManifestError, FrameError, InstallError, TimeoutError) as exc:  # SignatureError: ManifestError
            reason = getattr(exc, "reason", Reason.TIMEOUT)
            log.warning("agent %s: refused model %s: %s", self.s.agent_id, version, exc)
            self._event("install_refused", {"version": version, "reason": reason})
            self._report(self.serving, refused=version, reason=reason)
            return
        # accuracy of the new model and of the one it replaced, on the manifest's labelled batch (rollout gate)
        self._report(version, **validation_detail(self.installer, version, previous, batch))

    # -- training and upload --------------------------------------------------------------------
    def _training_data(self) -> TrainData | None:
        if self.dataset is not None:
            return self.dataset
        return self.dataset_provider() if self.dataset_provider is not None else None

    def _handle_task(self, task: Task, stop: threading.Event) -> None:
        if task.round_id in self._done_rounds:
            return
        if time.time() > task.deadline:
            log.info("agent %s: task for round %d expired", self.s.agent_id, task.round_id)
            return
        self._current_task = task.round_id
        try:
            binding = Binding.of(task.round_id, self.fetcher.base_manifest(task.base_version))
            self.outbox.prune(keep=task.round_id)  # older rounds are closed: their frames only take disk
            frame = self.outbox.get(binding)  # never a frame of another federation
            if frame is not None:
                log.info("agent %s: resending stored update for round %d", self.s.agent_id, task.round_id)
            else:
                data = self._training_data()
                if data is None or len(data) == 0:
                    log.info("agent %s: no local data, skipping round %d", self.s.agent_id, task.round_id)
                    return
                try:
                    frame = self.training.run(task, data, new_update_id())
                except JobError as exc:  # a job this box cannot train, or a base model of another job
                    log.warning("agent %s: round %d refused: %s", self.s.agent_id, task.round_id, exc)
                    self._event("training_refused", {"round_id": task.round_id, "reason": exc.reason,
                                                     "detail": str(exc)[:2000]})
                    self._done_rounds.add(task.round_id)
                    return
                except (BudgetExhausted, PrivacyStateError) as exc:
                    log.warning("agent %s: round %d refused: %s", self.s.agent_id, task.round_id, exc)
                    self._event("training_refused", {"round_id": task.round_id, "reason": Reason.PRIVACY_BUDGET,
                                                     "detail": str(exc)})
                    self._done_rounds.add(task.round_id)  # a re-announced task would be refused again
                    return
                self.outbox.put(binding, frame)
            ack = self.uploader.upload(task, frame, stop)
            if ack is not None:  # the coordinator's final answer: the frame is never needed again
                self.outbox.remove(task.round_id)
                if ack.status in ("accepted", "duplicate"):
                    self._done_rounds.add(task.round_id)
        finally:
            self._current_task = None

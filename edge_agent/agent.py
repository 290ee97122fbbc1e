"""The edge agent process: announce itself, take tasks, train, upload with acknowledgement,
fetch and install models, report what it serves.

Threads: the transport's dispatcher runs the handlers (they only record and signal); one work
thread trains and installs, in order. The last encoded update of each round is kept in
``state_dir/outbox`` so a restarted agent resends the same bytes (same update id: the
coordinator answers ``duplicate`` if it had it).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from coordinator.privacy import BudgetExhausted
from edge_agent.installer import ModelInstaller, build_from_manifest
from edge_agent.private_training import PrivacyStateError, PrivateTrainer
from edge_agent.validation import validation_detail
from learning.datasets import ArrayDataset
from learning.qat import maybe_prepare_qat
from learning.state import get_tensors
from learning.trainer import PauseHook, TrainData, TrainingCancelled, train_local
from protocol.chunks import Reassembler, parse_chunk, split
from protocol.codec import ErrorFeedbackState, Tensors, TensorSpec
from protocol.errors import FrameError, MalformedMessage, ManifestError
from protocol.frame import decode_model, encode_update
from protocol.manifest import Manifest, parse_manifest
from protocol.messages import Ack, AgentEvent, ModelRequest, Shadow, Status, Task, parse_message
from protocol.profile import FirmwareProfile
from protocol.signing import TrustStore
from protocol.topics import Topics
from protocol.transport import Transport

log = logging.getLogger("fedscan.agent")


class Stopped(Exception):
    """The agent was told to stop while waiting."""


def agent_seed(round_seed: int, agent_id: str) -> int:
    """The local training seed of one agent in one round: distinct per agent, reproducible."""
    return (round_seed * 1_000_003 + int(hashlib.sha256(agent_id.encode()).hexdigest()[:8], 16)) % (2**31)


@dataclass
class AgentSettings:
    agent_id: str
    profile: FirmwareProfile
    state_dir: Path
    fleet: str = "default"
    threads: int | None = None
    ack_timeout_s: float = 20.0
    model_timeout_s: float = 30.0
    software: str = "fedscan-0.1"
    trust: TrustStore | None = None  # None: model signatures are not checked (logged at start)


class TrainingObserver(Protocol):
    """What watches the agent's training jobs (``edge_agent.metrics.AgentMetrics``)."""

    def training_started(self, round_id: int, steps_total: int) -> None: ...
    def on_train_progress(self, steps_done: int, steps_planned: int, loss: float) -> None: ...
    def training_finished(self, state: str = "done") -> None: ...


class EdgeAgent:
    def __init__(self, settings: AgentSettings, transport: Transport, dataset: ArrayDataset | None) -> None:
        self.s = settings
        self.transport = transport
        self.dataset = dataset
        self.topics = Topics(settings.fleet)
        self.installer = ModelInstaller(settings.state_dir / "models", trust=settings.trust,
                                        profile=settings.profile.name)
        (settings.state_dir / "outbox").mkdir(parents=True, exist_ok=True)
        self.pause = PauseHook()
        self._work: queue.Queue[tuple[str, object] | None] = queue.Queue()
        self._manifests: dict[str, Manifest] = {}
        self._manifest_cond = threading.Condition()
        self._downloads = Reassembler(max_transfers=4)
        self._download_done: dict[str, bytes] = {}
        self._download_cond = threading.Condition()
        self._acks: dict[str, Ack] = {}
        self._ack_cond = threading.Condition()
        self._done_rounds: set[int] = set()
        self._current_task: int | None = None
        self.rounds_trained = 0
        self._stop = threading.Event()
        self.dataset_provider: Callable[[], TrainData | None] | None = None
        self.engine_report: dict[str, object] = {}
        self.training_observer: TrainingObserver | None = None  # e.g. the agent's /metrics
        self._private: PrivateTrainer | None = None  # DP-SGD runs and budget, when the profile asks for them

    # -- wiring ---------------------------------------------------------------------------------
    def status_payload(self, state: str) -> bytes:
        return Status(state=state, role="agent", profile=self.s.profile.name, software=self.s.software).to_bytes()

    def start(self) -> None:
        t, a = self.topics, self.s.agent_id
        self.transport.subscribe(t.tasks(a), self._on_task)
        self.transport.subscribe(t.acks(a), self._on_ack)
        self.transport.subscribe(t.downloads(a), self._on_download)
        self.transport.subscribe(t.shadow_desired(a), self._on_desired)
        self.transport.subscribe(t.all_model_manifests(), self._on_manifest)
        self.transport.publish(t.status(a), self.status_payload("online"), retain=True)
        if self.installer.active_version is not None:
            self._report(self.installer.active_version)

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        threading.Thread(target=self._wake_on_stop, args=(stop,), daemon=True).start()
        while not stop.is_set():
            try:
                item = self._work.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            kind, obj = item
            if stop.is_set():
                return
            try:
                if kind == "task":
                    assert isinstance(obj, Task)
                    self._handle_task(obj, stop)
                elif kind == "desired":
                    assert isinstance(obj, str)
                    self._handle_desired(obj)
            except (Stopped, TrainingCancelled):
                return
            except Exception as exc:
                log.exception("agent %s: %s failed", self.s.agent_id, kind)
                self._event("error", {"while": kind, "error": str(exc)[:300]})

    def _wake_on_stop(self, stop: threading.Event) -> None:
        """Wake every wait when the agent is told to stop, so SIGTERM is obeyed promptly."""
        stop.wait()
        self.pause.cancel()
        for cond in (self._manifest_cond, self._download_cond, self._ack_cond):
            with cond:
                cond.notify_all()

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise Stopped("agent is stopping")

    def _event(self, kind: str, detail: dict[str, object]) -> None:
        self.transport.publish(self.topics.events(self.s.agent_id), AgentEvent(kind=kind, detail=detail).to_bytes())

    # -- handlers (dispatcher thread): record and signal only --------------------------------------
    def _on_task(self, topic: str, payload: bytes) -> None:
        try:
            task = parse_message(Task, payload)
        except MalformedMessage as exc:
            log.warning("ignoring malformed task: %s", exc)
            return
        if task.round_id == self._current_task:
            return  # re-announcement of the round we are working on
        self._work.put(("task", task))

    def _on_ack(self, topic: str, payload: bytes) -> None:
        try:
            ack = parse_message(Ack, payload)
        except MalformedMessage as exc:
            log.warning("ignoring malformed ack: %s", exc)
            return
        with self._ack_cond:
            self._acks[ack.update_id] = ack
            self._ack_cond.notify_all()

    def _on_manifest(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            m = parse_manifest(payload)
        except ManifestError as exc:
            log.warning("ignoring bad manifest on %s: %s", topic, exc)
            return
        with self._manifest_cond:
            self._manifests[m.version] = m
            self._manifest_cond.notify_all()

    def _on_desired(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            sh = parse_message(Shadow, payload)
        except MalformedMessage as exc:
            log.warning("ignoring malformed desired shadow: %s", exc)
            return
        if sh.version is not None:
            self._work.put(("desired", sh.version))

    def _on_download(self, topic: str, payload: bytes) -> None:
        try:
            r = self._downloads.add(parse_chunk(payload))
        except FrameError as exc:
            log.warning("bad model chunk: %s", exc)
            return
        if r.complete:
            try:
                blob = r.blob()
            except FrameError as exc:
                log.warning("model transfer %s corrupt: %s", r.transfer_id, exc)
                self._downloads.discard(r.transfer_id)
                return
            self._downloads.discard(r.transfer_id)
            with self._download_cond:
                self._download_done[r.transfer_id] = blob
                self._download_cond.notify_all()

    # -- models -------------------------------------------------------------------------------------
    def _wait_manifest(self, version: str, timeout: float) -> Manifest:
        deadline = time.monotonic() + timeout
        with self._manifest_cond:
            while version not in self._manifests:
                self._check_stop()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no manifest for {version} after {timeout:.0f}s")
                self._manifest_cond.wait(left)
            return self._manifests[version]

    def ensure_model(self, version: str) -> Tensors:
        """Local weights of ``version``, downloading (as a delta when possible) if needed."""
        if self.installer.has(version):
            return self.installer.tensors(version)
        manifest = self._wait_manifest(version, self.s.model_timeout_s)
        self.installer.verify(manifest)  # refuse before downloading anything
        have = next((v for v in reversed(self.installer.installed()) if v != version), None)
        base = self.installer.tensors(have) if have else None
        transfer = f"model-{version}-from-{have or 'none'}"
        specs = [TensorSpec(t.name, tuple(t.shape)) for t in manifest.tensors]
        blob = self._download(transfer, lambda missing: ModelRequest(
            version=version, have=have, transfer_id=transfer if missing else None, missing=missing))
        try:
            _, tensors = decode_model(blob, expected=specs, expected_hash=manifest.tensor_hash, base=base)
        except FrameError as exc:
            self._event("model_refused", {"version": version, "reason": exc.reason})
            raise
        self.installer.install(manifest, tensors)
        return tensors

    def _download(self, transfer: str, request: Callable[[list[int] | None], ModelRequest]) -> bytes:
        """Ask for a transfer on our downloads topic until it is complete; resume by naming missing chunks."""
        deadline = time.monotonic() + self.s.model_timeout_s * 3
        attempt = 0
        while time.monotonic() < deadline:
            attempt += 1
            partial = self._downloads.transfers.get(transfer)
            missing = partial.missing if partial is not None and attempt > 1 else None
            self.transport.publish(self.topics.model_request(self.s.agent_id), request(missing).to_bytes())
            with self._download_cond:
                self._download_cond.wait_for(lambda: transfer in self._download_done or self._stop.is_set(),
                                             timeout=self.s.model_timeout_s)
                blob = self._download_done.pop(transfer, None)
            self._check_stop()
            if blob is not None:
                return blob
            log.info("%s: download incomplete, asking again (attempt %d)", transfer, attempt)
        raise TimeoutError(f"{transfer} not received after {attempt} requests")

    def fetch_artifacts(self, version: str) -> list[str]:
        """Download the inference artifacts this box can use (ONNX FP32/INT8, engines for its own
        targets), each checked against the signed manifest's sha256; returns what is present. A
        failure leaves the box on the weights (torch engine), with the reason logged and reported."""
        manifest = self.installer.manifest(version)
        targets = {t.name for t in self.s.profile.export.targets} if self.s.profile.export else set()
        present = []
        for art in manifest.artifacts:
            if art.kind == "tensorrt" and art.target not in targets:
                continue
            if self.installer.has_artifact(version, art):
                present.append(art.uri)
                continue
            transfer = f"artifact-{version}-{art.uri}"

            def request(missing: list[int] | None, uri: str = art.uri, tid: str = transfer) -> ModelRequest:
                return ModelRequest(version=version, artifact=uri, transfer_id=tid if missing else None,
                                    missing=missing)

            try:
                data = self._download(transfer, request)
                self.installer.add_artifact(version, art, data)
                present.append(art.uri)
            except (TimeoutError, ManifestError) as exc:
                log.warning("artifact %s of %s not installed: %s", art.uri, version, exc)
                self._event("artifact_refused", {"version": version, "artifact": art.uri,
                                                 "reason": getattr(exc, "reason", "timeout")})
        return present

    def _report(self, version: str | None, **detail: object) -> None:
        self.transport.publish(self.topics.shadow_reported(self.s.agent_id),
                               Shadow(version=version, engine=str(self.engine_report.get("engine", "torch")),
                                      detail={"agent": self.s.agent_id, **self.engine_report, **detail}
                                      ).to_bytes(), retain=True)

    def _handle_desired(self, version: str) -> None:
        if self.installer.active_version == version:
            self._report(version)
            return
        previous = self.installer.active_version
        try:
            self.ensure_model(version)
            self.fetch_artifacts(version)
            self.installer.activate(version)
        except (ManifestError, FrameError, TimeoutError) as exc:  # InstallError, SignatureError: ManifestError
            reason = getattr(exc, "reason", "timeout")
            log.warning("agent %s: refused model %s: %s", self.s.agent_id, version, exc)
            self._event("install_refused", {"version": version, "reason": reason})
            self._report(self.installer.active_version, refused=version, reason=reason)
            return
        # accuracy of the new model and of the one it replaced, on the manifest's labelled batch (rollout gate)
        self._report(version, **validation_detail(self.installer, version, previous))

    # -- training and upload -----------------------------------------------------------------------
    def _handle_task(self, task: Task, stop: threading.Event) -> None:
        outbox = self.s.state_dir / "outbox" / f"round-{task.round_id}.fsuf"
        if task.round_id in self._done_rounds:
            return
        if time.time() > task.deadline:
            log.info("agent %s: task for round %d expired", self.s.agent_id, task.round_id)
            return
        self._current_task = task.round_id
        try:
            if outbox.exists():
                frame = outbox.read_bytes()
                log.info("agent %s: resending stored update for round %d", self.s.agent_id, task.round_id)
            else:
                data = self.dataset if self.dataset is not None else (
                    self.dataset_provider() if self.dataset_provider is not None else None)
                if data is None or len(data) == 0:
                    log.info("agent %s: no local data, skipping round %d", self.s.agent_id, task.round_id)
                    return
                try:
                    frame = self._train(task, data)
                except (BudgetExhausted, PrivacyStateError) as exc:
                    log.warning("agent %s: round %d refused: %s", self.s.agent_id, task.round_id, exc)
                    self._event("training_refused", {"round_id": task.round_id, "reason": "privacy_budget",
                                                     "detail": str(exc)})
                    self._done_rounds.add(task.round_id)  # a re-announced task would be refused again
                    return
                tmp = outbox.with_suffix(".tmp")
                tmp.write_bytes(frame)
                tmp.replace(outbox)
            if self._upload(task, frame, stop):
                self._done_rounds.add(task.round_id)
        finally:
            self._current_task = None

    def _train(self, task: Task, data: TrainData) -> bytes:
        base = self.ensure_model(task.base_version)
        manifest = self.installer.manifest(task.base_version)
        # QAT per device profile: fake-quant wrappers keep parameter names, so the frame carries the
        # same float tensors; observers are non-persistent buffers and never leave the box
        model = maybe_prepare_qat(build_from_manifest(manifest, base), self.s.profile)
        model.train()
        cfg = task.training.model_copy(update={"seed": agent_seed(task.training.seed, self.s.agent_id)})
        t0 = time.perf_counter()
        watch = self.training_observer
        if watch is not None:
            watch.training_started(task.round_id, 0)  # the trainer reports the planned steps with its first step
        state = "failed"
        progress = watch.on_train_progress if watch is not None else None
        private = self._private_trainer()
        dp_metrics: dict[str, float] = {}
        try:
            if private is not None:  # DP-SGD: refuses (BudgetExhausted) before training when ε would pass the budget
                result, dp = private.train(model, data, cfg, threads=self.s.threads, pause=self.pause,
                                           progress=progress, what=f"round {task.round_id}")
                dp_metrics = dp.as_metrics()
            else:
                result = train_local(model, data, cfg, global_tensors=base, threads=self.s.threads, pause=self.pause,
                                     checkpoint_path=self.s.state_dir / f"train-round-{task.round_id}.ckpt",
                                     progress=progress)
            state = "done"
        except TrainingCancelled:
            state = "idle"  # stopped by the agent shutting down
            raise
        finally:
            if watch is not None:
                watch.training_finished(state)
        (self.s.state_dir / f"train-round-{task.round_id}.ckpt").unlink(missing_ok=True)
        self.rounds_trained += 1
        log.info("agent %s: round %d trained %d steps in %.1fs (loss %.4f)", self.s.agent_id, task.round_id,
                 result.steps, time.perf_counter() - t0, result.loss)
        ef_path = self.s.state_dir / "error_feedback.npz"
        ef = ErrorFeedbackState.load(ef_path) if "ef" in task.codec else None
        frame = encode_update(
            get_tensors(model), agent_id=self.s.agent_id, round_id=task.round_id, base_version=task.base_version,
            sample_count=len(data), codec=task.codec, base=base,
            metrics={"train_loss": result.loss, "steps": float(result.steps), "seconds": result.seconds, **dp_metrics},
            state=ef, seed=cfg.seed,
            update_id=f"{self.s.agent_id}-r{task.round_id}-{hashlib.sha256(str(cfg.seed).encode()).hexdigest()[:8]}",
        )
        if ef is not None:
            ef.save(ef_path)
        return frame

    def _private_trainer(self) -> PrivateTrainer | None:
        """The DP-SGD trainer when the profile's ``privacy.dp_sgd`` is on (its budget file is read on
        first use, so an unreadable one refuses training, not the agent's start)."""
        section = self.s.profile.privacy
        if section is None or not section.dp_sgd:
            return None
        if self._private is None:
            self._private = PrivateTrainer(section, self.s.state_dir)
        return self._private

    def _upload(self, task: Task, frame: bytes, stop: threading.Event) -> bool:
        """Send chunks with a window in flight; resend what the coordinator names until acknowledged."""
        from protocol.frame import read_header

        update_id = read_header(frame)[0].update_id
        chunks = split(frame, update_id, task.chunk_bytes)
        topic = self.topics.updates(self.s.agent_id, task.round_id)
        todo = list(range(len(chunks)))
        attempt = 0
        while not stop.is_set() and time.time() < task.deadline + 5:
            attempt += 1
            with self._ack_cond:
                self._acks.pop(update_id, None)
            for n, i in enumerate(todo):
                self.transport.publish(topic, chunks[i])
                if (n + 1) % task.window == 0:
                    drain = getattr(self.transport, "drain", None)
                    if drain is not None:
                        drain(timeout=10)
            with self._ack_cond:
                self._ack_cond.wait_for(lambda: update_id in self._acks or stop.is_set(), timeout=self.s.ack_timeout_s)
                ack = self._acks.get(update_id)
            if stop.is_set():
                return False
            if ack is None:
                log.info("agent %s: no ack for round %d after %.0fs, resending (attempt %d)", self.s.agent_id,
                         task.round_id, self.s.ack_timeout_s, attempt)
                todo = list(range(len(chunks)))
                continue
            if ack.status in ("accepted", "duplicate"):
                log.info("agent %s: round %d update %s (%d bytes, %d chunks)", self.s.agent_id, task.round_id,
                         ack.status, len(frame), len(chunks))
                return True
            if ack.status == "incomplete":
                todo = [i for i in ack.missing if 0 <= i < len(chunks)] or list(range(len(chunks)))
                continue
            log.warning("agent %s: round %d update rejected: %s %s", self.s.agent_id, task.round_id, ack.reason,
                        ack.detail or "")
            return False
        return False

"""The coordinator's round manager: announce → collect → aggregate → evaluate → publish.

Every step is written to the state store before it is taken, so a coordinator killed at any
point resumes the round it was in: accepted updates live in the blob store + ``updates`` table
and are never lost or counted twice ((round, agent) and update id are unique); a round found
``aggregating`` is aggregated again from the same accepted updates, deterministically (results
sorted by agent id, strategy state restored from the base version).

Handlers run on the transport's dispatcher thread and only validate, persist and acknowledge;
the round loop runs on the caller's thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from coordinator.model_repo import ModelRepository
from coordinator.store import BlobStore, DuplicateError, Store
from coordinator.strategies import ClientResult, Strategy
from protocol.chunks import Reassembler, parse_chunk, split
from protocol.codec import Tensors, TensorSpec
from protocol.errors import FrameError, MalformedMessage, ProtocolError, UnknownTopic
from protocol.frame import decode_update, encode_model, read_header
from protocol.manifest import Architecture, Artifact, Calibration, InputSpec, Manifest, TensorEntry, ValidationBatch
from protocol.messages import Ack, ModelRequest, Shadow, Status, Task, TrainingConfig, parse_message
from protocol.profile import CompressionSection
from protocol.signing import SigningKey
from protocol.tensors import tensor_hash
from protocol.topics import Kind, Topics
from protocol.transport import Transport

log = logging.getLogger("fedscan.coordinator")

Evaluator = Callable[[Tensors], dict[str, float]]
Calibrator = Callable[[Tensors], Calibration | None]
Exporter = Callable[[Tensors, Path], list[Artifact]]  # weights, output folder -> verified artifacts


@dataclass(frozen=True)
class RoundSettings:
    rounds: int = 3
    min_clients: int = 2
    deadline_s: float = 300.0
    reannounce_s: float = 10.0
    training: TrainingConfig = field(default_factory=TrainingConfig)
    codec: str = "raw"
    chunk_bytes: int = 256 * 1024
    window: int = 8
    max_update_norm: float | None = 1e4
    seed: int = 0
    # auto: every new round model is served by every agent (recorded active); manual: round models
    # are candidates that agents train from, served only after approval + a staged rollout.
    rollout: Literal["auto", "manual"] = "auto"
    # sync: a round waits for min_clients updates trained from its base and refuses later ones.
    # async (buffered, as FedBuff): a round closes once min_clients updates are in its buffer; an
    # update trained from an older round's model still counts, scaled by
    # (1 + staleness) ** -staleness_exponent, when it is at most max_staleness rounds old; an agent
    # that is still training is not sent a newer task.
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = 4
    staleness_exponent: float = 0.5


@dataclass(frozen=True)
class ModelSpec:
    """What every global model of this federation is (from the firmware profile)."""

    architecture: str
    kwargs: dict[str, Any]
    classes: list[str]
    input: InputSpec
    preprocessing: list[dict[str, Any]] = field(default_factory=list)


def round_training(base: TrainingConfig, strategy: Strategy, seed: int, round_id: int) -> TrainingConfig:
    """The training config sent with a round's tasks: the strategy's overrides and a per-round seed."""
    update = {"seed": seed * 100_003 + round_id, **strategy.configure_round(round_id)}
    return TrainingConfig.model_validate({**base.model_dump(), **update})


def client_privacy(results: list[ClientResult]) -> dict[str, dict[str, float]]:
    """What each DP-SGD agent reported with its update: ε spent so far (all its updates), δ, its
    budget, noise multiplier (``edge_agent.private_training``); agents without DP are left out."""
    return {r.agent_id: {k.removeprefix("dp_"): float(v) for k, v in r.metrics.items() if k.startswith("dp_")}
            for r in results if "dp_epsilon" in r.metrics}


def version_name(round_id: int) -> str:
    return f"v{round_id}"


class Coordinator:
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
        on_round: Callable[[int, str, dict[str, float]], None] | None = None,
        signer: SigningKey | None = None,
        validation_batch: ValidationBatch | None = None,
    ) -> None:
        self.store, self.blobs, self.repo = store, blobs, repo
        self.transport, self.topics = transport, topics
        self.strategy, self.settings, self.spec = strategy, settings, model_spec
        self.initial_tensors, self.evaluator, self.on_round = initial_tensors, evaluator, on_round
        self.calibrator = calibrator
        self.exporter = exporter
        self._lock = threading.Condition()
        self._current: int | None = None  # round being collected
        self._current_task: tuple[int, str, float] | None = None  # (round, base version, deadline)
        self._base_version: str | None = None
        self._base: Tensors | None = None
        self._specs: list[TensorSpec] = []
        self._reassembler = Reassembler()
        self._accepted: dict[str, Tensors] = {}
        self._task_sent: dict[str, tuple[int, str, float]] = {}  # async: agent -> task it is working on
        self._deferred: list[tuple[str, int, str, bytes]] = []  # async: complete frames that arrived between buffers
        self._older_bases: OrderedDict[str, Tensors] = OrderedDict()
        self._model_frames: OrderedDict[tuple[str, str | None], bytes] = OrderedDict()
        self.counters: dict[str, int] = {}
        self._profile_cache: dict[str, CompressionSection | None] = {}
        self.signer = signer
        self.validation_batch = validation_batch  # shipped in every manifest for the on-box accuracy gate
        self.report_listeners: list[Callable[[str, Shadow], None]] = []

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.repo.remove_partial()
        t = self.topics
        self.transport.subscribe(t.all_agents(Kind.UPDATES), self._on_update)
        self.transport.subscribe(t.all_agents(Kind.MODEL_REQUEST), self._on_model_request)
        self.transport.subscribe(t.all_agents(Kind.STATUS), self._on_status)
        self.transport.subscribe(t.all_agents(Kind.SHADOW_REPORTED), self._on_reported)
        self.transport.subscribe(t.all_agents(Kind.EVENTS), self._on_event)
        self._ensure_initial_model()
        self.transport.publish(t.coordinator_status(), Status(state="online", role="coordinator").to_bytes(), retain=True)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def _reject(self, kind: str, agent: str | None, round_id: int | None, err: ProtocolError) -> None:
        self._count(f"{kind}:{err.reason}")
        log.warning("rejected %s from %s (round %s): %s", kind, agent, round_id, err)
        self.store.record_event(f"{kind}_rejected", agent_id=agent, round_id=round_id, reason=err.reason,
                                detail={"message": str(err)[:500]})

    def _manifest_for(self, version: str, parent: str | None, round_id: int | None, tensors: Tensors,
                      metrics: Mapping[str, float], participants: list[str]) -> Manifest:
        m = Manifest(
            version=version, parent=parent, round_id=round_id,
            architecture=Architecture(name=self.spec.architecture, kwargs=self.spec.kwargs),
            classes=self.spec.classes, input=self.spec.input, preprocessing=self.spec.preprocessing,
            metrics={k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)},
            participants=participants,
            tensors=[TensorEntry(name=k, shape=tuple(v.shape)) for k, v in tensors.items()],
            tensor_hash=tensor_hash(tensors), validation_batch=self.validation_batch,
            calibration=self.calibrator(tensors) if self.calibrator is not None else None,
            artifacts=self._export(version, tensors),
        )
        return self.signer.sign_manifest(m) if self.signer is not None else m

    def _export(self, version: str, tensors: Tensors) -> list[Artifact]:
        """Optimized inference artifacts for the manifest; a failed export ships weights only."""
        if self.exporter is None:
            return []
        try:
            return self.exporter(tensors, self.repo.artifacts_dir(version))
        except Exception as exc:  # the model is still good; the boxes then serve it with torch
            log.warning("export of %s failed, shipping weights only: %s", version, exc)
            self.store.record_event("export_failed", reason=type(exc).__name__, detail={"message": str(exc)[:500]})
            return []

    def _ensure_initial_model(self) -> None:
        if self.store.latest_model() is not None:
            return
        tensors = self.initial_tensors()
        metrics = self.evaluator(tensors) if self.evaluator else {}
        m = self._manifest_for(version_name(0), None, None, tensors, metrics, [])
        self.repo.save(m, tensors, self.strategy.state_dict())
        with contextlib.suppress(DuplicateError):
            self.store.add_model(version=m.version, parent=None, round_id=None, manifest=m.model_dump(mode="json"),
                                 participants=[], state="active")
        self._publish_model(m.version, initial=True)

    def publish_manifest(self, version: str) -> None:
        manifest = self.repo.manifest(version)
        self.transport.publish(self.topics.model_manifest(version), manifest.to_bytes(), retain=True)

    def _publish_model(self, version: str, *, initial: bool = False) -> None:
        self.publish_manifest(version)
        if self.settings.rollout == "manual" and not initial:
            return  # served only through a staged rollout (coordinator/rollout.py)
        desired = Shadow(version=version).to_bytes()
        for agent in self.store.list_agents():
            if initial and self.settings.rollout == "manual" and agent.desired_version is not None:
                continue
            self.store.set_desired_version(agent.agent_id, version)
            self.transport.publish(self.topics.shadow_desired(agent.agent_id), desired, retain=True)

    # -- round loop ----------------------------------------------------------------------------------
    def completed_rounds(self) -> int:
        n = 0
        rid = 1
        latest = self.store.latest_round()
        while latest is not None and rid <= latest.round_id:
            r = self.store.get_round(rid)
            n += 1 if r is not None and r.status == "complete" else 0
            rid += 1
        return n

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        latest = self.store.latest_round()
        if latest is not None and latest.status in ("collecting", "aggregating"):
            log.info("resuming round %d (%s)", latest.round_id, latest.status)
            self._run_round(latest.round_id, stop, resume=True)
        while not stop.is_set() and self.completed_rounds() < self.settings.rounds:
            latest = self.store.latest_round()
            self._run_round((latest.round_id + 1) if latest else 1, stop, resume=False)

    def _run_round(self, round_id: int, stop: threading.Event, *, resume: bool) -> None:
        if resume:
            rec = self.store.get_round(round_id)
            assert rec is not None
            base_version, deadline = rec.base_version, rec.deadline
            if rec.status == "aggregating":
                self._load_base(base_version)
                self._aggregate(round_id)
                return
        else:
            latest_model = self.store.latest_model()
            assert latest_model is not None
            base_version = latest_model.version
            deadline = time.time() + self.settings.deadline_s
            self.store.create_round(round_id, base_version=base_version, config=self._task_training(round_id)
                                    .model_dump(), deadline=deadline, mode=self.settings.mode)
            self.store.set_round_status(round_id, "collecting")
        self._load_base(base_version)
        with self._lock:
            self._current = round_id
            self._current_task = (round_id, base_version, deadline)
            self._accepted = {}
            deferred, self._deferred = self._deferred, []
            for agent, task_round, update_id, frame in deferred:
                self._admit_async(agent, task_round, update_id, frame)
        log.info("round %d: collecting from base %s (min %d clients, deadline in %.0fs)", round_id, base_version,
                 self.settings.min_clients, deadline - time.time())
        last_announce = 0.0
        while not stop.is_set():
            with self._lock:
                have = len(self.store.list_updates(round_id))
                if have >= self.settings.min_clients:
                    break
                if time.time() >= deadline:
                    break
            if time.monotonic() - last_announce >= self.settings.reannounce_s:
                self._announce(round_id, base_version, deadline)
                last_announce = time.monotonic()
            with self._lock:
                self._lock.wait(timeout=0.5)
        with self._lock:
            self._current = None
            self._current_task = None
        if stop.is_set():
            return
        updates = self.store.list_updates(round_id)
        if not updates:
            log.warning("round %d: deadline passed with no updates; round failed", round_id)
            self.store.set_round_status(round_id, "failed", detail={"reason": "no_updates_before_deadline"})
            return
        if len(updates) < self.settings.min_clients:
            log.warning("round %d: deadline passed with %d/%d updates; aggregating what arrived", round_id,
                        len(updates), self.settings.min_clients)
        self._aggregate(round_id)

    def _task_training(self, round_id: int) -> TrainingConfig:
        return round_training(self.settings.training, self.strategy, self.settings.seed, round_id)

    def _announce(self, round_id: int, base_version: str, deadline: float) -> None:
        for agent in self.store.list_agents():
            if not self.store.has_update(round_id, agent.agent_id):
                self._send_task(agent.agent_id, agent.profile, *self._task_for(agent.agent_id, (round_id, base_version,
                                                                                                deadline)))

    def _task_for(self, agent_id: str, current: tuple[int, str, float]) -> tuple[int, str, float]:
        """The task an agent should hold: the current round's, or in async mode the earlier task it
        is still working on while that one can still count (a re-announcement it ignores)."""
        sent = self._task_sent.get(agent_id) if self.settings.mode == "async" else None
        if sent is not None and current[0] - sent[0] <= self.settings.max_staleness and time.time() < sent[2]:
            return sent
        return current

    def _send_task(self, agent_id: str, profile: str, round_id: int, base_version: str, deadline: float) -> None:
        codec, chunk_bytes, window = self._uplink_for(profile)
        task = Task(round_id=round_id, base_version=base_version, deadline=deadline, mode=self.settings.mode,
                    training=self._task_training(round_id), codec=codec, chunk_bytes=chunk_bytes, window=window)
        if self.settings.mode == "async":
            self._task_sent[agent_id] = (round_id, base_version, deadline)
        self.transport.publish(self.topics.tasks(agent_id), task.to_bytes())

    def _uplink_for(self, profile_name: str) -> tuple[str, int, int]:
        """The round's codec, or with ``codec="profile"`` the one the agent's firmware profile asks
        for (its bandwidth class), falling back to ``raw`` when the profile has no compression section."""
        s = self.settings
        if s.codec != "profile":
            return s.codec, s.chunk_bytes, s.window
        if profile_name not in self._profile_cache:
            from protocol.profile import ProfileError, find_profile

            try:
                self._profile_cache[profile_name] = find_profile(profile_name).compression
            except ProfileError as exc:
                log.warning("profile %s unreadable (%s); sending raw updates", profile_name, exc)
                self._profile_cache[profile_name] = None
        c = self._profile_cache[profile_name]
        return (c.uplink, c.chunk_bytes, c.window) if c is not None else ("raw", s.chunk_bytes, s.window)

    def _load_base(self, version: str) -> None:
        self._base_version = version
        self._base = self.repo.tensors(version)
        self._specs = [TensorSpec(k, tuple(v.shape)) for k, v in self._base.items()]
        self.strategy.load_state_dict(self.repo.strategy_state(version))

    def _aggregate(self, round_id: int) -> None:
        self.store.set_round_status(round_id, "aggregating")
        assert self._base is not None and self._base_version is not None
        clock = _PhaseClock()
        updates = sorted(self.store.list_updates(round_id), key=lambda u: u.agent_id)
        results = []
        for u in updates:
            tensors = self._accepted.get(u.agent_id)
            if tensors is None:  # after a restart: decode again from the stored frame
                frame = self.blobs.get(u.blob_sha256)
                trained_from = self._tensors_of(read_header(frame)[0].base_version)
                client = decode_update(frame, expected=self._specs, base=trained_from).tensors
                tensors = self._discounted(client, trained_from, u.staleness)
            results.append(ClientResult(u.agent_id, tensors, u.sample_count, u.metrics, u.staleness))
        new, report = self.strategy.aggregate(round_id, self._base, results)
        clock.mark("aggregate")
        metrics = self.evaluator(new) if self.evaluator else {}
        clock.mark("evaluate")
        version = version_name(round_id)
        participants = [r.agent_id for r in results]
        manifest = self._manifest_for(version, self._base_version, round_id, new, metrics, participants)
        clock.mark("manifest")
        self.repo.save(manifest, new, self.strategy.state_dict())
        try:
            self.store.add_model(version=version, parent=self._base_version, round_id=round_id,
                                 manifest=manifest.model_dump(mode="json"), participants=participants,
                                 state="active" if self.settings.rollout == "auto" else "candidate")
        except DuplicateError:
            log.info("round %d: model %s was already recorded before a restart", round_id, version)
        clock.mark("save")
        traffic = self.transport.traffic
        self.store.set_round_status(round_id, "complete", result_version=version,
                                    detail={"metrics": manifest.metrics, "aggregation": _jsonable(report.details),
                                            "traffic": {"rx_bytes": traffic.rx_bytes, "tx_bytes": traffic.tx_bytes},
                                            "phases_ms": clock.phases_ms,
                                            "client_privacy": client_privacy(results)})
        self._publish_model(version)
        log.info("round %d complete: %s from %s, %s", round_id, version, participants,
                 {k: round(v, 4) for k, v in manifest.metrics.items()})
        log.debug("round %d phases (ms): %s", round_id, clock.phases_ms)
        if self.on_round is not None:
            self.on_round(round_id, version, dict(manifest.metrics))

    # -- handlers (dispatcher thread) ----------------------------------------------------------------
    def _parse(self, topic: str, kind: str) -> tuple[str, int | None] | None:
        try:
            parsed = self.topics.parse(topic)
        except UnknownTopic as exc:
            self._reject(kind, None, None, exc)
            return None
        assert parsed.agent is not None
        return parsed.agent, parsed.round_id

    def _enrolled(self, agent: str, kind: str, round_id: int | None = None) -> bool:
        if self.store.get_agent(agent) is None:
            from protocol.errors import NotEnrolled

            self._reject(kind, agent, round_id, NotEnrolled(f"agent {agent!r} is not enrolled"))
            return False
        return True

    def _ack(self, agent: str, ack: Ack) -> None:
        self.transport.publish(self.topics.acks(agent), ack.to_bytes())

    def _on_update(self, topic: str, payload: bytes) -> None:
        parsed = self._parse(topic, "update")
        if parsed is None:
            return
        agent, round_id = parsed
        assert round_id is not None
        if not self._enrolled(agent, "update", round_id):
            self._ack(agent, Ack(update_id="?", round_id=round_id, status="rejected", reason="not_enrolled"))
            return
        try:
            chunk = parse_chunk(payload)
        except FrameError as exc:
            self._reject("update", agent, round_id, exc)
            return
        update_id = chunk.header.transfer_id
        with self._lock:
            if self.settings.mode == "async":
                self._on_async_chunk(agent, round_id, update_id, chunk)
                return
            if self._current != round_id:
                if self.store.has_update(round_id, agent):
                    self._ack(agent, Ack(update_id=update_id, round_id=round_id, status="duplicate"))
                else:
                    self._reject("update", agent, round_id, FrameError(f"round {round_id} is not open", reason="round_closed"))
                    self._ack(agent, Ack(update_id=update_id, round_id=round_id, status="rejected", reason="round_closed"))
                return
            if self.store.has_update(round_id, agent):
                self._ack(agent, Ack(update_id=update_id, round_id=round_id, status="duplicate"))
                return
            frame = self._reassemble(agent, round_id, update_id, chunk)
            if frame is not None:
                assert self._base is not None and self._base_version is not None
                self._accept_frame(agent, round_id, update_id, frame, base_version=self._base_version, base=self._base,
                                   staleness=0)

    def _reassemble(self, agent: str, round_id: int, update_id: str, chunk: Any) -> bytes | None:
        """Add a chunk; the whole frame once complete, else None (the last chunk of an incomplete
        transfer is answered with the missing indices)."""
        try:
            r = self._reassembler.add(chunk)
        except FrameError as exc:
            self._reassembler.discard(update_id)
            self._refuse_update(agent, round_id, update_id, exc)
            return None
        if not r.complete:
            if chunk.header.index == chunk.header.count - 1:
                self._ack(agent, Ack(update_id=update_id, round_id=round_id, status="incomplete",
                                     missing=r.missing[:1000]))
            return None
        frame = r.blob()
        self._reassembler.discard(update_id)
        return frame

    def _refuse_update(self, agent: str, round_id: int, update_id: str, exc: FrameError) -> None:
        self._reject("update", agent, round_id, exc)
        self._ack(agent, Ack(update_id=update_id, round_id=round_id, status="rejected", reason=exc.reason,
                             detail=str(exc)[:300]))
        sent = self._task_sent.get(agent)
        if sent is not None and sent[0] == round_id:
            del self._task_sent[agent]  # that task is over for it: it gets the current one next

    def _accept_frame(self, agent: str, task_round: int, update_id: str, frame: bytes, *, base_version: str,
                      base: Tensors, staleness: int) -> None:
        """Decode and check a complete update trained from ``base_version`` for ``task_round``, persist it
        in the open round (its buffer) and acknowledge it. Caller holds the lock."""
        round_id = self._current
        assert round_id is not None
        try:
            decoded = decode_update(frame, expected=self._specs, base=base, max_update_norm=self.settings.max_update_norm)
            h = decoded.header
            if h.agent_id != agent or h.round_id != task_round:
                raise FrameError(f"frame says agent {h.agent_id} round {h.round_id}, topic says {agent} {task_round}",
                                 reason="topic_mismatch")
            if h.base_version != base_version:
                raise FrameError(f"update trained from {h.base_version}, round {task_round} base is {base_version}",
                                 reason="stale_base")
        except FrameError as exc:
            self._refuse_update(agent, task_round, update_id, exc)
            return
        sha = self.blobs.put(frame)
        try:
            self.store.add_update(round_id=round_id, agent_id=agent, update_id=h.update_id,
                                  sample_count=h.sample_count, metrics=dict(h.metrics), blob_sha256=sha,
                                  nbytes=len(frame), staleness=staleness)
        except DuplicateError:
            self._ack(agent, Ack(update_id=update_id, round_id=task_round, status="duplicate"))
            return
        self._accepted[agent] = self._discounted(decoded.tensors, base, staleness)
        self._task_sent.pop(agent, None)
        self._count("update:accepted")
        log.info("round %d: accepted update from %s (%d samples, %d bytes%s)", round_id, agent, h.sample_count,
                 len(frame), f", {staleness} rounds stale" if staleness else "")
        self._ack(agent, Ack(update_id=update_id, round_id=task_round, status="accepted"))
        self._lock.notify_all()

    # -- async (buffered) rounds ---------------------------------------------------------------------
    def _on_async_chunk(self, agent: str, task_round: int, update_id: str, chunk: Any) -> None:
        known = self.store.get_update(update_id)
        if known is not None and known.agent_id == agent:  # a resend whose ack was lost
            self._ack(agent, Ack(update_id=update_id, round_id=task_round, status="duplicate"))
            return
        frame = self._reassemble(agent, task_round, update_id, chunk)
        if frame is None:
            return
        if self._current is None:  # between two buffers: admitted when the next one opens
            self._deferred.append((agent, task_round, update_id, frame))
            return
        self._admit_async(agent, task_round, update_id, frame)

    def _admit_async(self, agent: str, task_round: int, update_id: str, frame: bytes) -> None:
        current = self._current
        assert current is not None
        staleness = current - task_round
        task = self.store.get_round(task_round) if staleness >= 0 else None
        if task is None:
            self._refuse_update(agent, task_round, update_id,
                                FrameError(f"round {task_round} was never announced", reason="round_closed"))
        elif staleness > self.settings.max_staleness:
            self._refuse_update(agent, task_round, update_id, FrameError(
                f"trained for round {task_round}, {staleness} rounds behind (max {self.settings.max_staleness})",
                reason="too_stale"))
        elif self.store.has_update(current, agent):
            self._refuse_update(agent, task_round, update_id, FrameError(
                f"round {current} already holds an update from {agent}", reason="already_in_buffer"))
        else:
            self._accept_frame(agent, task_round, update_id, frame, base_version=task.base_version,
                               base=self._tensors_of(task.base_version), staleness=staleness)

    def _tensors_of(self, version: str) -> Tensors:
        if version == self._base_version and self._base is not None:
            return self._base
        if version not in self._older_bases:
            self._older_bases[version] = self.repo.tensors(version)
            while len(self._older_bases) > self.settings.max_staleness + 1:
                self._older_bases.popitem(last=False)
        return self._older_bases[version]

    def _discounted(self, tensors: Tensors, trained_from: Tensors, staleness: int) -> Tensors:
        """A stale update as a client model on the current base: ``base + s * (client - its base)``,
        ``s = (1 + staleness) ** -exponent`` (FedBuff). A fresh update is returned unchanged."""
        if staleness == 0:
            return tensors
        assert self._base is not None
        s = (1.0 + staleness) ** -self.settings.staleness_exponent
        return {k: (self._base[k] + s * (v.astype(np.float64) - trained_from[k])).astype(v.dtype)
                for k, v in tensors.items()}

    def _on_model_request(self, topic: str, payload: bytes) -> None:
        parsed = self._parse(topic, "model_request")
        if parsed is None:
            return
        agent, _ = parsed
        if not self._enrolled(agent, "model_request"):
            return
        try:
            req = parse_message(ModelRequest, payload)
        except MalformedMessage as exc:
            self._reject("model_request", agent, None, exc)
            return
        if not self.repo.has(req.version):
            self._reject("model_request", agent, None, UnknownTopic(f"no model {req.version}", reason="unknown_version"))
            return
        if req.artifact is not None:
            self._send_artifact(agent, req)
            return
        have = req.have if req.have and req.have != req.version and self.repo.has(req.have) else None
        key = (req.version, have)
        frame = self._model_frames.get(key)
        if frame is None:
            base = self.repo.tensors(have) if have else None
            frame = encode_model(self.repo.tensors(req.version), version=req.version, base=base, base_version=have)
            self._model_frames[key] = frame
            while len(self._model_frames) > 16:
                self._model_frames.popitem(last=False)
        self._send_download(agent, req, frame, f"model-{req.version}-from-{have or 'none'}")

    def _send_artifact(self, agent: str, req: ModelRequest) -> None:
        assert req.artifact is not None
        try:
            data = self.repo.artifact_bytes(req.version, req.artifact)
        except (KeyError, OSError, ValueError) as exc:
            self._reject("model_request", agent, None, UnknownTopic(str(exc), reason="unknown_artifact"))
            return
        self._send_download(agent, req, data, f"artifact-{req.version}-{req.artifact}")

    def _send_download(self, agent: str, req: ModelRequest, data: bytes, transfer: str) -> None:
        """Chunks of ``data`` on the agent's download topic: all of them, or only those the request
        names as missing when it is about this very transfer."""
        wanted = set(req.missing) if req.missing is not None and req.transfer_id == transfer else None
        for i, c in enumerate(split(data, transfer, self.settings.chunk_bytes)):
            if wanted is None or i in wanted:
                self.transport.publish(self.topics.downloads(agent), c)

    def _on_status(self, topic: str, payload: bytes) -> None:
        parsed = self._parse(topic, "status")
        if parsed is None or not payload:
            return
        agent, _ = parsed
        try:
            st = parse_message(Status, payload)
        except MalformedMessage as exc:
            self._reject("status", agent, None, exc)
            return
        record = self.store.get_agent(agent)
        if record is not None:
            self.store.mark_seen(agent, online=st.state == "online", at=time.time())
            current = self._current_task
            if st.state == "online" and current is not None and not self.store.has_update(current[0], agent):
                # it may have missed the announcement (or restarted: its outbox resends a finished update)
                self._send_task(record.agent_id, record.profile, *self._task_for(agent, current))

    def _on_reported(self, topic: str, payload: bytes) -> None:
        parsed = self._parse(topic, "shadow")
        if parsed is None or not payload:
            return
        agent, _ = parsed
        if not self._enrolled(agent, "shadow"):
            return
        try:
            sh = parse_message(Shadow, payload)
        except MalformedMessage as exc:
            self._reject("shadow", agent, None, exc)
            return
        claimed = sh.detail.get("agent")
        if claimed is not None and claimed != agent:
            self._reject("shadow", agent, None, UnknownTopic(f"shadow from {claimed!r} on {agent!r}'s topic",
                                                             reason="topic_mismatch"))
            return
        if sh.version is not None and self.store.get_model(sh.version) is None:
            self._reject("shadow", agent, None, UnknownTopic(f"reported unknown model {sh.version!r}",
                                                             reason="unknown_version"))
            return
        self.store.set_reported_version(agent, sh.version)
        self.store.mark_seen(agent, at=time.time())
        if isinstance(sh.detail.get("refused"), str):
            self.store.record_event("install_refused", agent_id=agent, reason=str(sh.detail.get("reason"))[:128],
                                    detail={"version": sh.detail["refused"], "serving": sh.version})
        for listener in self.report_listeners:
            listener(agent, sh)

    def _on_event(self, topic: str, payload: bytes) -> None:
        parsed = self._parse(topic, "event")
        if parsed is None:
            return
        agent, _ = parsed
        if self._enrolled(agent, "event"):
            self.store.record_event("agent_event", agent_id=agent, detail={"raw": payload[:2000].decode("utf-8", "replace")})


class _PhaseClock:
    """Milliseconds spent in each named phase since the previous mark (recorded with each round)."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self.phases_ms: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases_ms[phase] = round(1000 * (now - self._t), 1)
        self._t = now


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj

"""Publishing a model: its signed manifest, its export, saving it, and who is told to serve it.

:class:`ModelPublisher` turns global weights into a version: the manifest (architecture, classes,
input, preprocessing, validation metrics, participants, tensor hash, calibration, validation
batch for the on-box accuracy gate, verified inference artifacts) signed with the coordinator's
key; saves it to the model repository; publishes the manifest (retained) and — with
``rollout="auto"`` — each enrolled agent's desired shadow. With ``settings.select_metric`` set
(``val_auc`` from the CLI by default) a round model is served only when it is the best validated
so far (:class:`learning.selection.BestSoFar`): it is recorded ``active``, the others
``candidate`` (agents still train from them; they are never served), so the fleet and a box
enrolled later (``adopt_new_agents``) serve the best validated model, not the latest. With ``rollout="manual"`` a round
model is only announced: it is served after a person approves it and a staged rollout
(:mod:`coordinator.rollout`) reaches each box. The initial model ``v0`` is made here too.

With a downlink codec (``RoundSettings.downlink_codec``) a round's aggregate is published as a
compressed step from its parent (:meth:`ModelPublisher.step`): the version *is* the parent plus
the decoded step, so a box that holds the parent rebuilds it bit for bit; the step is broadcast
once per version on ``models/{version}/chunks`` before its manifest, for every box at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.model_repo import ModelRepository
from coordinator.rounds.settings import ModelSpec, RoundSettings, version_name
from coordinator.states import ModelState
from coordinator.store import DuplicateError, Store
from coordinator.strategies import Strategy
from learning.selection import BestSoFar
from protocol.chunks import split
from protocol.codec import ErrorFeedbackState, Tensors
from protocol.frame import encode_model_step
from protocol.manifest import Architecture, Artifact, Calibration, Manifest, TensorEntry, ValidationBatch
from protocol.messages import Shadow
from protocol.signing import SigningKey
from protocol.tensors import tensor_hash
from protocol.topics import Topics
from protocol.transfers import model_transfer
from protocol.transport import Transport
from protocol.validation_batch import by_reference, is_inline

log = logging.getLogger("fedscan.coordinator")

Evaluator = Callable[[Tensors], dict[str, float]]
Calibrator = Callable[[Tensors], Calibration | None]
Exporter = Callable[[Tensors, Path], list[Artifact]]  # weights, output folder -> verified artifacts


@dataclass(frozen=True)
class Step:
    """A version published as a compressed step from its parent: its weights, the frame, the residual."""

    tensors: Tensors  # what the step decodes to on the parent: the version's weights
    frame: bytes
    residual: ErrorFeedbackState


class ModelPublisher:
    """Manifest, export, signature, repository, and the retained messages that announce a version."""

    def __init__(self, *, store: Store, repo: ModelRepository, transport: Transport, topics: Topics,
                 spec: ModelSpec, settings: RoundSettings, evaluator: Evaluator | None = None,
                 calibrator: Calibrator | None = None, exporter: Exporter | None = None,
                 signer: SigningKey | None = None, validation_batch: ValidationBatch | None = None) -> None:
        self.store, self.repo, self.transport, self.topics = store, repo, transport, topics
        self.spec, self.settings = spec, settings
        self.evaluator, self.calibrator, self.exporter = evaluator, calibrator, exporter
        self.signer = signer
        if validation_batch is not None and is_inline(validation_batch):
            # named by reference in every manifest; each box downloads it once (not 44 KB per version per box)
            validation_batch, raw = by_reference(validation_batch)
            repo.put_validation_batch(validation_batch.uri, raw)
        self.validation_batch = validation_batch  # named in every manifest for the on-box accuracy gate

    def evaluate(self, tensors: Tensors) -> dict[str, float]:
        """The coordinator's validation metrics of ``tensors`` (none without an evaluator)."""
        return self.evaluator(tensors) if self.evaluator is not None else {}

    def manifest_for(self, version: str, parent: str | None, round_id: int | None, tensors: Tensors,
                     metrics: Mapping[str, float], participants: list[str]) -> Manifest:
        """The manifest of a new version, with its exported artifacts, signed when there is a key."""
        m = Manifest(
            version=version, parent=parent, round_id=round_id,
            architecture=Architecture(name=self.spec.architecture, kwargs=self.spec.kwargs),
            classes=self.spec.classes, input=self.spec.input, preprocessing=self.spec.preprocessing,
            metrics={k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)},
            participants=participants,
            tensors=[TensorEntry(name=k, shape=tuple(v.shape)) for k, v in tensors.items()],
            tensor_hash=tensor_hash(tensors), validation_batch=self.validation_batch,
            calibration=self.calibrator(tensors) if self.calibrator is not None else None,
            artifacts=self._export(version, tensors), job=self.settings.job,
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

    def selected(self, manifest: Manifest) -> bool:
        """Tell whether a new round model beats every served (active) model on ``settings.select_metric``.

        True without a selection metric, and when the manifest has no finite value for it while no
        served model has one either (no validation split: the latest is served, as before). A
        manifest without the metric never displaces a model that has it; a tie keeps the older one.
        """
        metric = self.settings.select_metric
        if metric is None:
            return True
        best = BestSoFar(metric)
        for rec in self.store.list_models():
            if rec.state == ModelState.ACTIVE and rec.version != manifest.version:
                best.offer(rec.version, (rec.manifest or {}).get("metrics", {}))
        if best.score(manifest.metrics) is None:
            if best.best_key is None:
                return True
            log.warning("%s has no %s; %s stays served", manifest.version, metric, best.best_key)
            return False
        if best.offer(manifest.version, manifest.metrics):
            return True
        log.info("%s not served: %s %.4f is not above %s's %.4f", manifest.version, metric,
                 best.score(manifest.metrics), best.best_key, best.best_value)
        return False

    def step(self, version: str, round_id: int, parent: str, base: Tensors, new: Tensors) -> Step | None:
        """``new`` as a compressed step from ``parent`` (``None`` without a downlink codec).

        Deterministic: the residual comes from the parent's folder and the seed from the round, so
        a round aggregated again after a restart gives the same step and the same version.
        """
        codec = self.settings.downlink_codec
        if codec is None:
            return None
        residual = self.repo.downlink_state(parent)
        frame, tensors = encode_model_step(new, version=version, round_id=round_id, base=base, base_version=parent,
                                           codec=codec, state=residual, seed=self.settings.seed * 100_003 + round_id)
        return Step(tensors, frame, residual)

    def save(self, manifest: Manifest, tensors: Tensors, strategy: Strategy, *, round_id: int | None,
             step: Step | None = None) -> None:
        """Save a version in the repository, then record it (the commit point); idempotent after a restart."""
        self.repo.save(manifest, tensors, strategy.state_dict(), step=step.frame if step is not None else None,
                       downlink_state=step.residual if step is not None else None)
        serve = round_id is None or (self.settings.rollout == "auto" and self.selected(manifest))
        state = ModelState.ACTIVE if serve else ModelState.CANDIDATE
        try:
            self.store.add_model(version=manifest.version, parent=manifest.parent, round_id=round_id,
                                 manifest=manifest.model_dump(mode="json"), participants=list(manifest.participants),
                                 state=state)
        except DuplicateError:
            log.info("model %s was already recorded before a restart", manifest.version)

    def ensure_initial_model(self, initial_tensors: Callable[[], Tensors], strategy: Strategy) -> None:
        """Make, record and publish ``v0`` unless the store already has a model."""
        if self.store.latest_model() is not None:
            return
        tensors = initial_tensors()
        m = self.manifest_for(version_name(0), None, None, tensors, self.evaluate(tensors), [])
        with contextlib.suppress(DuplicateError):
            self.save(m, tensors, strategy, round_id=None)
        self.publish(m.version, initial=True)

    def publish_manifest(self, version: str) -> None:
        """Announce ``version``'s manifest (retained): agents may train from it and fetch it.

        A version published as a step has the step broadcast first, once for every box.
        """
        manifest = self.repo.manifest(version)
        step = self.repo.step_frame(version)
        if step is not None and manifest.parent is not None:
            for c in split(step, model_transfer(version, manifest.parent), self.settings.chunk_bytes):
                self.transport.publish(self.topics.model_chunks(version), c)
        self.transport.publish(self.topics.model_manifest(version), manifest.to_bytes(), retain=True)

    def publish(self, version: str, *, initial: bool = False) -> None:
        """Announce a version and, unless rollouts are manual, make every enrolled agent serve it."""
        self.publish_manifest(version)
        if self.settings.rollout == "manual" and not initial:
            return  # served only through a staged rollout (coordinator/rollout)
        record = self.store.get_model(version)
        if not initial and record is not None and record.state != ModelState.ACTIVE:
            self.store.record_event("model_not_selected", detail={"version": version,
                                                                   "metric": self.settings.select_metric})
            return  # not better validated than the model the fleet serves: agents train from it only
        desired = Shadow(version=version).to_bytes()
        for agent in self.store.list_agents():
            if initial and self.settings.rollout == "manual" and agent.desired_version is not None:
                continue
            self.store.set_desired_version(agent.agent_id, version)
            self.transport.publish(self.topics.shadow_desired(agent.agent_id), desired, retain=True)

"""One local training job: train the round's base model on this box's data, encode the update frame.

The model is built from the base version's manifest and weights (downloaded if needed), prepared
for QAT when the device profile asks for it, trained with plain SGD (``learning.trainer``) or,
under the profile's ``privacy.dp_sgd``, with DP-SGD and its budget
(:class:`~edge_agent.private_training.PrivateTrainer`), then encoded with the round's codec
(error-feedback state kept in the state folder). Progress goes to an optional observer (the
agent's ``/metrics``).

That is the ``classify`` job. A task of another job (``Task.job``) runs the trainer the
:class:`~edge_agent.jobs.TrainerRegistry` holds for it, and its update is encoded the same way;
a task whose base model is of another job, or of a job this box cannot train, is refused
(:class:`~edge_agent.jobs.JobError`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from edge_agent.installer import ModelInstaller, build_from_manifest
from edge_agent.jobs import JobTrainer, LocalUpdate, TrainerRegistry, check_job
from edge_agent.private_training import PrivateTrainer
from firmware.profile import FirmwareProfile
from learning.augment import Augment, build_augment
from learning.datasets import DEFAULT_NORMALIZE
from learning.local_update import local_update, site_config
from learning.qat import maybe_prepare_qat
from learning.state import get_tensors
from learning.trainer import PauseHook, TrainData, TrainingCancelled
from protocol.codec import ErrorFeedbackState, Tensors
from protocol.frame import encode_update
from protocol.manifest import Manifest
from protocol.messages import Task

log = logging.getLogger("fedscan.agent.training")



class TrainingObserver(Protocol):
    """What watches the agent's training jobs (``edge_agent.metrics.AgentMetrics``)."""

    def training_started(self, round_id: int, steps_total: int) -> None:
        """Record that a job for ``round_id`` starts (``steps_total`` 0 until the trainer knows it)."""

    def on_train_progress(self, steps_done: int, steps_planned: int, loss: float) -> None:
        """One optimizer step done."""

    def training_finished(self, state: str = "done") -> None:
        """Record that the job ended: ``done``, ``failed`` or ``idle`` (cancelled)."""


class TrainingJob:
    """Trains one round's update on the box (the agent's work thread calls :meth:`run`)."""

    def __init__(
        self,
        agent_id: str,
        profile: FirmwareProfile,
        state_dir: Path,
        installer: ModelInstaller,
        ensure_model: Callable[[str], Tensors],
        *,
        pause: PauseHook,
        observer: TrainingObserver | None = None,
        threads: int | None = None,
        augment: Augment | None = None,
        jobs: TrainerRegistry | None = None,
    ) -> None:
        """Train for ``agent_id`` from models ``ensure_model`` provides; ``pause`` lets diagnosis go first.

        ``augment`` is the device profile's training augmentation (used when a task's training
        config sets ``augment``), as the in-process simulation passes it; by default the one the
        profile's ``augmentation`` section describes (MONAI, ``learning/augment.py``). ``jobs``: the trainers of
        the jobs other than ``classify`` this box can run.
        """
        self.agent_id, self.profile, self.state_dir = agent_id, profile, state_dir
        self.installer, self.ensure_model = installer, ensure_model
        self.pause, self.observer, self.threads = pause, observer, threads
        self.augment = augment if augment is not None else build_augment(profile.augmentation)
        self.jobs = jobs or TrainerRegistry()
        self.rounds_trained = 0
        self._private: PrivateTrainer | None = None  # DP-SGD runs and budget, when the profile asks for them

    def private_trainer(self) -> PrivateTrainer | None:
        """Return the DP-SGD trainer when the profile's ``privacy.dp_sgd`` is on, else ``None``.

        Its budget file is read on first use, so an unreadable one refuses training, not the
        agent's start.
        """
        section = self.profile.privacy
        if section is None or not section.dp_sgd:
            return None
        if self._private is None:
            self._private = PrivateTrainer(section, self.state_dir)
        return self._private

    def run(self, task: Task, data: TrainData, update_id: str) -> bytes:
        """Train on ``data`` from the task's base model; the encoded update frame.

        Raises ``BudgetExhausted`` / ``PrivacyStateError`` (DP refuses the round, nothing trained)
        and ``TrainingCancelled`` (the agent is stopping).
        """
        base = self.ensure_model(task.base_version)
        manifest = self.installer.manifest(task.base_version)
        check_job(task, manifest)
        if not self.jobs.trains_like_classify(task.job):
            trainer = self.jobs.trainer(task.job, self.profile, self.state_dir)
            return self._run_job(trainer, task, manifest, base, data, update_id)
        # QAT per device profile: fake-quant wrappers keep parameter names, so the frame carries the
        # same float tensors; observers are non-persistent buffers and never leave the box
        model = maybe_prepare_qat(build_from_manifest(manifest, base), self.profile)
        model.train()
        cfg = site_config(task.training, self.agent_id)
        t0 = time.perf_counter()
        watch = self.observer
        if watch is not None:
            watch.training_started(task.round_id, 0)  # the trainer reports the planned steps with its first step
        state = "failed"
        progress = watch.on_train_progress if watch is not None else None
        private = self.private_trainer()
        dp_metrics: dict[str, float] = {}
        checkpoint = self.state_dir / f"train-round-{task.round_id}.ckpt"
        try:
            if private is not None:  # DP-SGD: refuses (BudgetExhausted) before training when ε would pass the budget
                result, dp = private.train(model, data, cfg, threads=self.threads, pause=self.pause,
                                           progress=progress, what=f"round {task.round_id}")
                dp_metrics = dp.as_metrics()
            else:  # the same function as the in-process simulation (tests/test_sim_equals_runtime.py)
                # with the profile's own normalization (the serving pipeline's last step)
                norm = self.profile.normalization()
                result = local_update(model, base, data, task.training, self.agent_id, threads=self.threads,
                                      pause=self.pause, checkpoint_path=checkpoint, progress=progress,
                                      augment=self.augment,
                                      normalize=norm if norm is not None else DEFAULT_NORMALIZE).result
            state = "done"
        except TrainingCancelled:
            state = "idle"  # stopped by the agent shutting down
            raise
        finally:
            if watch is not None:
                watch.training_finished(state)
        checkpoint.unlink(missing_ok=True)
        self.rounds_trained += 1
        log.info("agent %s: round %d trained %d steps in %.1fs (loss %.4f)", self.agent_id, task.round_id,
                 result.steps, time.perf_counter() - t0, result.loss)
        return self._encode(task, LocalUpdate(get_tensors(model), _size(data), {
            "train_loss": result.loss, "steps": float(result.steps), "seconds": result.seconds, **dp_metrics}),
            base, cfg.seed, update_id)

    def _run_job(self, trainer: JobTrainer, task: Task, manifest: Manifest, base: Tensors, data: TrainData,
                 update_id: str) -> bytes:
        """A task of a registered job: its trainer trains, the update is encoded as every other."""
        t0 = time.perf_counter()
        watch = self.observer
        if watch is not None:
            watch.training_started(task.round_id, 0)
        state = "failed"
        try:
            update = trainer.train(task, manifest, base, data, pause=self.pause,
                                   progress=watch.on_train_progress if watch is not None else None)
            state = "done"
        except TrainingCancelled:
            state = "idle"
            raise
        finally:
            if watch is not None:
                watch.training_finished(state)
        self.rounds_trained += 1
        seconds = time.perf_counter() - t0
        log.info("agent %s: %s round %d trained in %.1fs (loss %s)", self.agent_id, task.job, task.round_id, seconds,
                 update.metrics.get("train_loss"))
        metrics = {"seconds": seconds, **update.metrics}
        return self._encode(task, LocalUpdate(update.tensors, update.sample_count, metrics), base,
                            site_config(task.training, self.agent_id).seed, update_id)

    def _encode(self, task: Task, update: LocalUpdate, base: Tensors, seed: int, update_id: str) -> bytes:
        """The update frame of ``update`` against ``base`` with the round's codec (error feedback kept here)."""
        ef_path = self.state_dir / "error_feedback.npz"
        ef = ErrorFeedbackState.load(ef_path) if "ef" in task.codec else None
        frame = encode_update(
            update.tensors, agent_id=self.agent_id, round_id=task.round_id, base_version=task.base_version,
            sample_count=update.sample_count, codec=task.codec, base=base, metrics=update.metrics,
            state=ef, seed=seed, update_id=update_id,
        )
        if ef is not None:
            ef.save(ef_path)
        return frame


def _size(data: TrainData) -> int:
    return len(data[0]) if isinstance(data, tuple) else len(data)

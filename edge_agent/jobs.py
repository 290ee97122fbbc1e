"""The agent side of the job seam: which local-training function runs a task of each job.

A task names its :class:`~protocol.jobs.Job`; the agent's :class:`~edge_agent.training_job.TrainingJob`
looks the job up in a :class:`TrainerRegistry` and runs that job's :class:`JobTrainer`, then
encodes what it returns (:class:`LocalUpdate`) into the update frame the same way for every job
(codec, chunking, signing of the round binding and upload are shared). ``classify`` is built
into :class:`TrainingJob` (its trainer predates the seam), and a job whose box step *is* the
classify trainer (one-shot: one round of it) is registered as ``classify_trained``; other jobs
register a trainer factory. The composition root (``fedscan.jobs``) fills the registry, so this
module names no job's implementation.

A job's trainer owns whatever it keeps between rounds under its own folder of the agent's state
directory (e.g. the segmentation job's local normalization layers, adaptive clip bound and
privacy accountant). How to add a job: docs/jobs.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from firmware.profile import FirmwareProfile
from learning.pause import PauseHook
from learning.trainer import Progress
from protocol.codec import Tensors
from protocol.errors import FedscanError, Reason
from protocol.jobs import Job
from protocol.manifest import Manifest
from protocol.messages import Task

__all__ = ["JobError", "JobTrainer", "LocalUpdate", "TrainerFactory", "TrainerRegistry", "check_job"]


class JobError(FedscanError):
    """A task the box cannot train.

    A job it has no trainer for, a base model of another job, or job parameters the job refuses
    (reasons ``unsupported_job``, ``job_mismatch``, ``bad_job_params``). The round is refused and
    put on the record; the agent goes on.
    """

    reason = Reason.UNSUPPORTED_JOB


@dataclass(frozen=True)
class LocalUpdate:
    """What one job's local training returns.

    The tensors to send (exactly the base model's names and shapes), the sample count the
    coordinator weighs them by, and flat metrics (``train_loss``, ``dp_*`` ...) sent with the update.
    """

    tensors: Tensors
    sample_count: int
    metrics: dict[str, float] = field(default_factory=dict)


class JobTrainer(Protocol):
    """One job's local training on the box."""

    def train(self, task: Task, manifest: Manifest, base: Tensors, data: Any, *, pause: PauseHook,
              progress: Progress | None) -> LocalUpdate:
        """Train from ``base`` (the round's global tensors, described by ``manifest``) on ``data``.

        ``data`` is what the job's data loader gave the agent.

        Raise ``JobError`` for a task the job refuses, ``learning.privacy_accounting.BudgetExhausted``
        when the round would pass the box's privacy budget (before anything trains), and
        ``learning.trainer.TrainingCancelled`` when ``pause`` is cancelled.
        """
        ...


TrainerFactory = Callable[[FirmwareProfile, Path], JobTrainer]
"""``(profile, state_dir) -> trainer``: builds a job's trainer for one box (``state_dir`` is a
folder of its own the trainer may keep state in)."""


def check_job(task: Task, manifest: Manifest) -> None:
    """Refuse a task whose base model is of another job than the task (``job_mismatch``)."""
    if manifest.job != task.job:
        raise JobError(f"task of round {task.round_id} is a {task.job} task but its base model "
                       f"{manifest.version} is a {manifest.job} model", reason=Reason.JOB_MISMATCH)


class TrainerRegistry:
    """The jobs a box can train, each with its trainer factory; trainers are built on first use."""

    def __init__(self, factories: Mapping[Job, TrainerFactory] | None = None, *,
                 classify_trained: Iterable[Job] = ()) -> None:
        """Start with ``factories`` (job -> factory) and the jobs whose box step is classify's own."""
        self._factories: dict[Job, TrainerFactory] = dict(factories or {})
        self._built: dict[Job, JobTrainer] = {}
        self._classify_trained = {Job.CLASSIFY, *map(Job, classify_trained)}

    def trains_like_classify(self, job: Job) -> bool:
        """True for jobs whose local step is the classify trainer (e.g. one-shot: one round of it)."""
        return Job(job) in self._classify_trained

    def register(self, job: Job, factory: TrainerFactory) -> None:
        """Add (or replace) the trainer factory of ``job``."""
        self._factories[Job(job)] = factory
        self._built.pop(Job(job), None)

    @property
    def jobs(self) -> list[Job]:
        """The jobs this box can train."""
        return sorted(set(self._factories) | self._classify_trained)

    def trainer(self, job: Job, profile: FirmwareProfile, state_dir: Path) -> JobTrainer:
        """The trainer of ``job`` for this box (``JobError`` ``unsupported_job`` when none is registered)."""
        job = Job(job)
        if job not in self._factories:
            raise JobError(f"this box has no trainer for {job} tasks (it trains: "
                           f"{', '.join(self.jobs) or 'classify only'})", reason=Reason.UNSUPPORTED_JOB)
        if job not in self._built:
            folder = state_dir / f"job-{job}"
            folder.mkdir(parents=True, exist_ok=True)
            self._built[job] = self._factories[job](profile, folder)
        return self._built[job]

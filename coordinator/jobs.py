"""The coordinator side of the job seam: what a job supplies to run its federation's rounds.

The round machinery (announce → collect → aggregate → evaluate → publish, signing, rollout,
downloads) is the same for every :class:`~protocol.jobs.Job`; a job supplies a :class:`JobPlan`:
the model every round trains (:class:`~coordinator.rounds.ModelSpec` + initial weights), the
aggregation step (a :class:`~coordinator.strategies.Strategy`), how the coordinator scores a
model on its own validation data, and the federation-wide knobs sent with every task. A
:class:`JobRegistry` maps each job to a builder ``(JobContext) -> JobPlan``; the composition root
(``fedscan.jobs``) registers the builders, so this module names no job's implementation.
How to add a job: docs/jobs.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.rounds.publishing import Calibrator, Evaluator, Exporter
from coordinator.rounds.settings import ModelSpec
from coordinator.strategies import Strategy
from firmware.profile import FirmwareProfile
from protocol.codec import Tensors
from protocol.errors import FedscanError, Reason
from protocol.jobs import Job, JobParams
from protocol.manifest import ValidationBatch

__all__ = ["JobBuilder", "JobContext", "JobPlan", "JobRegistry", "UnknownJob"]


class UnknownJob(FedscanError, ValueError):
    """``--job`` names a job no builder is registered for, or options the job refuses (exit 2)."""

    reason = Reason.UNSUPPORTED_JOB


@dataclass(frozen=True)
class JobContext:
    """What the coordinator was started with, as a job's builder sees it."""

    profile: FirmwareProfile
    val_data: Path | None
    seed: int = 0
    rounds: int = 5
    strategy: str = "fedavg"
    strategy_args: Mapping[str, Any] = field(default_factory=dict)
    export: bool = True
    options: Mapping[str, str] = field(default_factory=dict)  # --job-option KEY=VALUE, the job parses them
    val_source: Any = None  # classify: a learning.data_source.DataSource for --val-data (npz or labelled folder)
    val_indices: Path | None = None  # the coordinator's share of val_source (.npy positions or .txt ids)


@dataclass
class JobPlan:
    """Everything job-specific the coordinator needs (see the module doc)."""

    job: Job
    model_spec: ModelSpec
    initial_tensors: Callable[[], Tensors]
    strategy: Strategy
    evaluator: Evaluator | None = None
    calibrator: Calibrator | None = None
    exporter: Exporter | None = None
    validation_batch: ValidationBatch | None = None
    params: JobParams = field(default_factory=dict)  # sent with every task (Task.job_params)


JobBuilder = Callable[[JobContext], JobPlan]


class JobRegistry:
    """Job -> builder of its plan."""

    def __init__(self, builders: Mapping[Job, JobBuilder] | None = None) -> None:
        """Start with ``builders``."""
        self._builders: dict[Job, JobBuilder] = dict(builders or {})

    def register(self, job: Job, builder: JobBuilder) -> None:
        """Add (or replace) the builder of ``job``."""
        self._builders[Job(job)] = builder

    @property
    def jobs(self) -> list[Job]:
        """The registered jobs."""
        return sorted(self._builders)

    def plan(self, job: Job | str, ctx: JobContext) -> JobPlan:
        """Build ``job``'s plan (``UnknownJob`` when the job is unknown or has no builder)."""
        try:
            key = Job(job)
            builder = self._builders[key]
        except (ValueError, KeyError):
            raise UnknownJob(f"no coordinator for job {job!r}; available: {', '.join(self.jobs)}") from None
        plan = builder(ctx)
        if plan.job != key:
            raise UnknownJob(f"the builder registered for {key} made a plan for {plan.job}")
        return plan

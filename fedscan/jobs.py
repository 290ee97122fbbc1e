"""The job registries of both roles, filled in one place (composition root; docs/jobs.md).

- coordinator side: :func:`coordinator_jobs` — a :class:`coordinator.jobs.JobRegistry` of job ->
  plan builder (model, initial weights, aggregation step, validation);
- agent side: :func:`agent_trainers` — an :class:`edge_agent.jobs.TrainerRegistry` of job ->
  local-training factory, and :func:`load_job_data` — the box's local data for the job its
  firmware profile names (``profile.job``);
- serving side: ``protocol.jobs.SERVING_ENDPOINT`` names the route; the agent API refuses a
  request for another job's route with ``job_mismatch`` (409).

``classify`` is the default job (``fedscan.classify_job``).

The segmentation job's modules are imported when a process first uses that job, not with this
module: they pull MONAI and opacus (2-4 s of CPU to import), and every coordinator and agent
process imports this module, most of them for another job.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.jobs import JobContext, JobPlan, JobRegistry
from edge_agent.anomaly_training import AnomalyTrainer
from edge_agent.jobs import JobTrainer, TrainerRegistry
from edge_agent.serving.anomaly import AnomalyServer, note_for_modality
from edge_agent.serving.segment import SegmentServer, modality_of_profile
from fedscan.anomaly_job import anomaly_plan
from fedscan.classify_job import classify_plan, load_agent_data
from fedscan.oneshot_job import oneshot_plan
from firmware.profile import FirmwareProfile
from learning.anomaly.data import Site, load_box_site
from learning.segmentation.data import load_site
from protocol.jobs import Job

__all__ = ["agent_trainers", "anomaly_server_for", "coordinator_jobs", "load_job_data", "segment_server_for"]


def segment_server_for(profile: FirmwareProfile, agent_state_dir: Path) -> SegmentServer | None:
    """The box's ``/v1/segment`` model holder when its profile's job is ``segment`` (else None).

    It serves each activated segmentation model with this site's local tensors, read from the
    segmentation trainer's folder (``TrainerRegistry`` gives it ``job-segment/``).
    """
    if profile.job != Job.SEGMENT:
        return None
    from edge_agent.segment_training import SegmentTrainer

    local = SegmentTrainer(profile, agent_state_dir / f"job-{Job.SEGMENT}")
    return SegmentServer(local.serving_model, modality=modality_of_profile(profile.modality))


def anomaly_server_for(profile: FirmwareProfile, agent_state_dir: Path,
                       dataset: Callable[[], Any] | None = None) -> AnomalyServer | None:
    """The box's ``/v1/anomaly`` model holder when its profile's job is ``anomaly`` (else None).

    It serves each activated anomaly model with this site's appearance branch and thresholds, read
    from the anomaly trainer's folder (``job-anomaly/``), and recalibrates the thresholds on the
    activated model when ``dataset()`` is the box's :class:`~learning.anomaly.data.Site` (its
    held-out normal images).
    """
    if profile.job != Job.ANOMALY:
        return None

    def calibration() -> np.ndarray | None:
        site = dataset() if dataset is not None else None
        return site.calib if isinstance(site, Site) else None

    local = AnomalyTrainer(profile, agent_state_dir / f"job-{Job.ANOMALY}")
    return AnomalyServer(local, note=note_for_modality(profile.modality), calibration=calibration)


def _segment_plan(ctx: JobContext) -> JobPlan:
    from fedscan.segment_job import segment_plan

    return segment_plan(ctx)


def _segment_trainer(profile: FirmwareProfile, folder: Path) -> JobTrainer:
    from edge_agent.segment_training import SegmentTrainer

    return SegmentTrainer(profile, folder)


def coordinator_jobs() -> JobRegistry:
    """Every job this build of fedscan can coordinate."""
    return JobRegistry({Job.CLASSIFY: classify_plan, Job.SEGMENT: _segment_plan, Job.ONESHOT: oneshot_plan,
                        Job.ANOMALY: anomaly_plan})


def agent_trainers() -> TrainerRegistry:
    """Every job besides ``classify`` (built into the agent's training job) a box can train."""
    # one-shot: the box's step is one round of the classify trainer (fedscan.oneshot_job)
    return TrainerRegistry({Job.SEGMENT: _segment_trainer, Job.ANOMALY: AnomalyTrainer}, classify_trained=(Job.ONESHOT,))


def load_job_data(profile: FirmwareProfile, data: Path | None, indices: Path | None, *, site: str = "site",
                  source: Any = None) -> Any:
    """The box's local training data for its profile's job (None: none given).

    ``segment``: a PH2 or brain-FLAIR folder, ``indices`` picking this site's cases (images /
    subjects) from its sorted list; ``site`` names the site (seeds its batches). ``anomaly``: a
    MedMNIST npz (``indices``: positions into its train split; the normal images among them) or a
    brain-FLAIR folder (``indices``: subjects), as a :class:`~learning.anomaly.data.Site` with its
    held-out normals. Otherwise a MedMNIST npz (``classify``).
    """
    if data is None:
        return None
    if profile.job == Job.ANOMALY:
        picks = np.load(indices) if indices is not None else None
        return load_box_site(data, picks, name=site, size=profile.input.height)
    if profile.job == Job.SEGMENT:
        picks = np.load(indices) if indices is not None else None
        return load_site(data, picks, name=site, size=profile.input.height, channels=profile.input.channels)
    return load_agent_data(source or data, indices, profile)  # npz, labelled folder or DICOM (learning/data_source.py)

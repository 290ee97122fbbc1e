"""The classify job's wiring: its coordinator plan and a box's local MedMNIST data.

The default job (``protocol.jobs.Job.CLASSIFY``): :func:`classify_plan` is its coordinator plan
(model spec and initial weights from the firmware profile, ``coordinator.model_spec``; a
FedAvg-family strategy; the coordinator's MedMNIST validation split for metrics and temperature
calibration, ``coordinator.validation_pass``; verified ONNX/INT8 export, ``coordinator.export_step``;
the rollout's labelled batch); :func:`load_agent_data` is a box's local MedMNIST data.
"""

from __future__ import annotations

import logging
from pathlib import Path

from coordinator.export_step import exporter_for
from coordinator.jobs import JobContext, JobPlan
from coordinator.model_spec import initial_weights, model_spec_for, spec_normalize
from coordinator.strategies import build_strategy
from coordinator.validation_pass import ValidationPass, validation_batch_for
from firmware.profile import FirmwareProfile
from learning import data_source
from learning.data_source import DataFormat, DataSource
from learning.datasets import ArrayDataset, DatasetError, load_medmnist
from protocol.jobs import Job

log = logging.getLogger("fedscan")

__all__ = ["classify_plan", "load_agent_data"]


def classify_plan(ctx: JobContext) -> JobPlan:
    """The classification federation's coordinator plan (see the module doc)."""
    spec = model_spec_for(ctx.profile)
    plan = JobPlan(Job.CLASSIFY, spec, initial_weights(spec, ctx.seed),
                   build_strategy(ctx.strategy, **dict(ctx.strategy_args)))
    if ctx.val_data is not None:
        val = load_agent_data(ctx.val_source or DataSource(ctx.val_data), ctx.val_indices, ctx.profile, split="val")
        assert val is not None
        validation = ValidationPass(spec, val)
        plan.evaluator, plan.calibrator = validation.metrics, validation.calibration
        plan.exporter = exporter_for(spec, val, ctx.profile) if ctx.export else None
        plan.validation_batch = validation_batch_for(val, ctx.seed, normalize=spec_normalize(spec))
    return plan


def load_agent_data(data: DataSource | Path | None, indices: Path | None, profile: FirmwareProfile | None = None,
                    *, split: str = "train") -> ArrayDataset | None:
    """Load a site's (or the coordinator's) images, or None without ``data``.

    ``data`` (learning/data_source.py) is an npz's ``split`` or a labelled folder read through
    ``profile``'s preprocessing, narrowed to ``indices``.
    """
    if data is None:
        return None
    src = data if isinstance(data, DataSource) else DataSource(Path(data))
    if profile is None:
        if src.resolved_format() != DataFormat.NPZ:
            raise DatasetError(f"{src.path}: a folder is read through a firmware profile")
        ds = load_medmnist(src.path, split)
    else:
        ds = data_source.load(src, profile, split=split)
    if indices is not None:
        ds = data_source.select(ds, indices)
    if len(ds) == 0:
        raise DatasetError(f"{src.describe()}: no images selected")
    log.info("data: %s, %d images, per class %s", src.describe(), len(ds), ds.class_counts().tolist())
    return ds

"""The anomaly job's coordinator plan (issue 17, FedDis): the disentangled autoencoder and its aggregation step.

``fedscan coordinator --job anomaly --profile xray-anomaly-28 [--job-option KEY=VALUE ...]``:

- model: the profile's ``feddis_ae`` (``learning.anomaly.model.DisentangledAE``, built on the box by
  ``learning.models.build_model``), initial weights from ``--seed``. The global model is the **whole**
  autoencoder, so the seam's install path, hashes, signatures and smoke test see an ordinary model;
- aggregation step (:class:`SharedOnlyAggregation`): the ``--strategy`` (FedAvg by default) over the
  **shape** tensors only (``learning.anomaly.model.shared_names(model, ShareRule.FEDDIS)``); the
  appearance branch and the merger keep the base's values. Boxes send the base's values for them
  anyway (``edge_agent.anomaly_training``) and keep their own on disk, so the global appearance
  branch stays the initial one and never carries a site's scanner. Under ``share=all`` (the plain
  FedAvg autoencoder baseline) every tensor is averaged;
- options (``--job-option``, sent to every agent with each task, checked here by the agents' own
  :func:`~edge_agent.anomaly_training.parse_params`): ``share`` (feddis), ``steps`` (10),
  ``batch_size`` (32), ``lr`` (0.002), ``lambda_s`` / ``lambda_l`` (0.1), ``paint`` (0), and the
  scoring settings ``sign`` (abs; ``positive`` for FLAIR hyperintensities), ``smooth`` (3),
  ``foreground`` (-1: every pixel), ``top_fraction`` (0.05), ``percentile`` (95),
  ``pixel_percentile`` (99);
- validation and export: none. The coordinator holds no site's appearance branch, so no global
  model alone is what any site serves; each site's threshold comes from its own normal images.
  Boxes serve the model with torch (``/v1/anomaly``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch

from coordinator.jobs import JobContext, JobPlan, UnknownJob
from coordinator.rounds import ModelSpec
from coordinator.strategies import AggregateReport, ClientResult, Strategy, build_strategy
from coordinator.strategies.base import WrappingStrategy
from edge_agent.anomaly_training import AnomalyParams, parse_params
from edge_agent.jobs import JobError
from learning.anomaly.model import shared_names
from learning.models import build_model, model_kwargs_for
from learning.state import get_tensors
from protocol.codec import Tensors
from protocol.jobs import Job
from protocol.manifest import InputSpec

__all__ = ["SharedOnlyAggregation", "anomaly_plan", "options_to_params"]


class SharedOnlyAggregation(WrappingStrategy):
    """Aggregate the ``shared`` tensors with ``inner``; every other tensor keeps the base's value."""

    name = "anomaly"

    def __init__(self, inner: Strategy, shared: list[str]) -> None:
        """Aggregate the ``shared`` tensor names with the rule ``inner``."""
        if not shared:
            raise ValueError("nothing to aggregate: no shared tensors")
        super().__init__(inner)
        self.shared = list(shared)

    def aggregate(self, round_id: int, base: Tensors, results: list[ClientResult]) -> tuple[Tensors, AggregateReport]:
        """Next global tensors: the shared ones from the inner rule, the others unchanged."""
        cut = [replace(r, tensors={k: r.tensors[k] for k in self.shared}) for r in results]
        new, report = self.inner.aggregate(round_id, {k: base[k] for k in self.shared}, cut)
        report.details.setdefault("aggregated_tensors", len(self.shared))
        report.details.setdefault("kept_tensors", len(base) - len(self.shared))
        return {k: (new[k] if k in new else base[k]) for k in base}, report

    def state_dict(self) -> dict[str, np.ndarray]:
        """As the inner rule."""
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """As the inner rule."""
        self.inner.load_state_dict(state)


def options_to_params(options: Mapping[str, str]) -> AnomalyParams:
    """The ``--job-option`` values as the agents' job parameters (``UnknownJob`` for bad ones)."""
    try:
        return parse_params(options)
    except JobError as exc:
        raise UnknownJob(f"--job anomaly: {exc.message}", reason=exc.reason) from exc


def anomaly_plan(ctx: JobContext) -> JobPlan:
    """The anomaly federation's coordinator plan (see the module doc)."""
    profile = ctx.profile
    if profile.job != Job.ANOMALY:
        raise UnknownJob(f"--job anomaly needs an anomaly firmware profile (job: anomaly), not {profile.name} "
                         f"(job: {profile.job})")
    params = options_to_params(ctx.options)
    kwargs = model_kwargs_for("feddis_ae", in_channels=1, num_classes=len(profile.model.classes),
                              height=profile.input.height, norm=profile.model.norm, width=profile.model.width)
    spec = ModelSpec(architecture="feddis_ae", kwargs=kwargs, classes=list(profile.model.classes),
                     input=InputSpec(channels=1, height=profile.input.height, width=profile.input.width),
                     preprocessing=list(profile.preprocessing))

    def initial() -> Tensors:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            return get_tensors(build_model("feddis_ae", **kwargs))

    shared = shared_names(build_model("feddis_ae", **kwargs), params.share)
    strategy = SharedOnlyAggregation(build_strategy(ctx.strategy, **dict(ctx.strategy_args)), shared)
    return JobPlan(Job.ANOMALY, spec, initial, strategy, params=params.as_params())

"""The segmentation job's coordinator plan (issue 18): the U-Net, its aggregation step, its options.

``fedscan coordinator --job segment --profile seg-dermoscopy-64 [--job-option KEY=VALUE ...]``:

- model: the profile's ``seg_unet`` (MONAI U-Net, ``learning.segmentation.model``), two outputs
  (background, lesion), initial weights from ``--seed``;
- aggregation step (:class:`SegmentAggregation`): the job's own server step
  (``learning.segmentation.server.server_step``: every update checked, bad ones refused with a
  reason, the round goes on) over the **shared** tensors only, with the ``--strategy`` as its rule
  and one vote per site (``weighting=equal``, the bench's validated setting: weighting by images
  lets the MRI sites' many slices swamp dermoscopy) or by image count (``weighting=samples``);
  tensors that stay on the sites (``share=fedbn``: normalization layers; ``local_head``: the
  output block) keep the base values, so the coordinator never holds a site's own layers;
- options (``--job-option``): ``share`` (fedbn), ``clipping`` (adaptive), ``weighting`` (equal),
  ``steps`` (10), ``batch_size`` (8), ``lr`` (0.002), ``dp_optimizer`` (sgd) and ``dp_lr`` (0.01) for
  the rounds of boxes whose profile asks for DP-SGD — sent to every agent with each task, with
  ``planned_rounds = --rounds`` (each site calibrates its DP noise to its own ε over them);
- validation: with ``--val-data DIR`` (holding ``ph2/`` and/or ``brain-mri-flair/``) the coordinator
  scores every model on its own validation split (``learning.segmentation.data.load_validation``,
  the bench's split) and writes ``val_dice_<modality>`` into the manifest. Under FedBN the global
  model alone is not what any site serves (each serves it with its own normalization layers), so
  that figure is a lower bound and the ones that matter are per site: ``bench/segment.py``;
- export: none; boxes serve the segmentation model with torch (their local layers differ from the
  global model's, so a coordinator-built ONNX file would not be the model they serve).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from coordinator.jobs import JobContext, JobPlan, UnknownJob
from coordinator.rounds import Evaluator, ModelSpec
from coordinator.strategies import AggregateReport, ClientResult, Strategy, build_strategy
from coordinator.strategies.base import WrappingStrategy
from edge_agent.jobs import JobError
from edge_agent.segment_training import SegmentParams, parse_params
from fedscan.segment_arms import coordinator_aggregate
from learning.models import build_model, model_kwargs_for
from learning.segmentation.client import SiteState, SiteUpdate
from learning.segmentation.data import SegSet, load_validation
from learning.segmentation.model import evaluate_dice
from learning.segmentation.server import Weighting, server_step
from learning.segmentation.sharing import shared_names
from learning.state import get_tensors, set_tensors
from protocol.codec import Tensors
from protocol.jobs import Job
from protocol.manifest import InputSpec

__all__ = ["SegmentAggregation", "segment_plan"]

CLASSES = ["background", "lesion"]


class SegmentAggregation(WrappingStrategy):
    """The segmentation job's aggregation step: ``server_step`` on the shared tensors.

    ``inner`` is the rule; local tensors keep the base's values (see the module doc).
    """

    name = "segment"

    def __init__(self, inner: Strategy, shared: list[str], weighting: Weighting = "equal") -> None:
        """Aggregate the ``shared`` tensor names with ``inner``, weighted per ``weighting``."""
        super().__init__(inner)
        self.shared, self.weighting = list(shared), weighting

    def aggregate(self, round_id: int, base: Tensors, results: list[ClientResult]) -> tuple[Tensors, AggregateReport]:
        """Next global tensors: shared ones from the server step, local ones unchanged."""
        shared_base = {k: base[k] for k in self.shared}
        updates = [(r.agent_id, SiteUpdate({k: r.tensors[k] for k in self.shared if k in r.tensors}, r.sample_count,
                                           dict(r.metrics), SiteState())) for r in results]
        new, report = server_step(shared_base, updates, round_id=round_id, aggregate=coordinator_aggregate(self.inner),
                                  weighting=self.weighting)
        return {k: (new[k] if k in new else base[k]) for k in base}, AggregateReport(report)

    def state_dict(self) -> dict[str, np.ndarray]:
        """As the inner rule."""
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """As the inner rule."""
        self.inner.load_state_dict(state)


def _options(ctx: JobContext) -> tuple[SegmentParams, Weighting]:
    """Split ``--job-option`` values into the agents' job parameters and the coordinator's weighting.

    The job parameters are checked by the agents' own :func:`~edge_agent.segment_training.parse_params`,
    here, before anything starts.
    """
    opts = dict(ctx.options)
    weighting = opts.pop("weighting", "equal")
    if weighting not in ("equal", "samples"):
        raise UnknownJob(f"--job segment: weighting must be equal or samples, not {weighting!r}")
    if "planned_rounds" in opts:
        raise UnknownJob("--job segment: planned_rounds is --rounds")
    try:
        return parse_params({**opts, "planned_rounds": ctx.rounds}), weighting  # type: ignore[return-value]
    except JobError as exc:
        raise UnknownJob(f"--job segment: {exc.message}") from exc


def segment_plan(ctx: JobContext) -> JobPlan:
    """The segmentation federation's coordinator plan (see the module doc)."""
    profile = ctx.profile
    if profile.job != Job.SEGMENT:
        raise UnknownJob(f"--job segment needs a segment firmware profile (job: segment), not {profile.name} "
                         f"(job: {profile.job})")
    params, weighting = _options(ctx)
    kwargs = model_kwargs_for("seg_unet", in_channels=profile.input.channels, num_classes=2,
                              height=profile.input.height, norm=profile.model.norm, width=profile.model.width)
    spec = ModelSpec(architecture="seg_unet", kwargs=kwargs, classes=list(CLASSES),
                     input=InputSpec(channels=profile.input.channels, height=profile.input.height,
                                     width=profile.input.width), preprocessing=list(profile.preprocessing))

    def initial() -> Tensors:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            return get_tensors(build_model("seg_unet", **kwargs))

    shared = shared_names(build_model("seg_unet", **kwargs), params.share)
    strategy = SegmentAggregation(build_strategy(ctx.strategy, **dict(ctx.strategy_args)), shared, weighting)
    plan = JobPlan(Job.SEGMENT, spec, initial, strategy, params=params.as_params())
    if ctx.val_data is not None:
        plan.evaluator = dice_evaluator(kwargs, load_validation(ctx.val_data, size=profile.input.height,
                                                                channels=profile.input.channels))
    return plan


def dice_evaluator(kwargs: Mapping[str, Any], val: Mapping[str, SegSet]) -> Evaluator:
    """``val_dice_<modality>`` of the global model on the coordinator's validation split (per case, MONAI Dice).

    Under FedBN / a local head this is the global model with the *initial* local layers — a lower
    bound: each site serves it with its own (``bench/segment.py`` reports per-site Dice).
    """

    def evaluate(tensors: Tensors) -> dict[str, float]:
        model = build_model("seg_unet", **kwargs)
        set_tensors(model, tensors)
        return {f"val_dice_{m}": float(evaluate_dice(model, data)["dice"]) for m, data in val.items()}

    return evaluate

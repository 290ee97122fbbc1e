"""The server step of the segmentation job: one round's site updates → the next shared tensors.

A pure function of (base tensors, the round's updates, round id) with no I/O and no randomness
of its own. Every update is checked against the base (:func:`update_problem`: exactly the shared
names and shapes, finite values, at least one image); a bad update is refused with a reason,
logged, and the round goes on with the rest. The accepted ones go to the aggregation rule passed
in — the coordinator's strategy (``fedscan.segment_arms.coordinator_aggregate`` wraps
``coordinator.strategies``; ``learning`` does not import the coordinator) — on the *shared*
tensors only: under FedBN or a local head the coordinator never holds the local ones.

``weighting`` sets each contribution's weight: ``samples`` (the site's image count, McMahan et
al.) or ``equal`` (one vote per site, so a modality with few large images is not outweighed by
one with many small slices). The report collects what each site released about its privacy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from learning.segmentation.client import SiteUpdate
from learning.segmentation.errors import SegmentationError
from protocol.codec import Tensors
from protocol.errors import Reason

log = logging.getLogger(__name__)
Weighting = Literal["samples", "equal"]


@dataclass(frozen=True)
class Contribution:
    """One accepted update as the aggregation rule sees it (the fields of a coordinator ``ClientResult``)."""

    agent_id: str
    tensors: Tensors
    sample_count: int
    metrics: Mapping[str, float] = field(default_factory=dict)


Aggregate = Callable[[int, Tensors, list[Contribution]], Tensors]
"""``(round_id, base, contributions) -> next shared tensors``: the coordinator's strategy."""


def update_problem(base: Mapping[str, np.ndarray], update: SiteUpdate) -> tuple[Reason, str] | None:
    """Why ``update`` cannot be aggregated against ``base`` (a reason and a message), or None."""
    if list(update.tensors) != list(base):
        return Reason.SHAPE_MISMATCH, (f"tensor names differ from the shared set (missing "
                                       f"{sorted(set(base) - set(update.tensors))[:3]}, extra "
                                       f"{sorted(set(update.tensors) - set(base))[:3]})")
    for name, arr in update.tensors.items():
        if np.shape(arr) != np.shape(base[name]):
            return Reason.SHAPE_MISMATCH, f"{name} has shape {np.shape(arr)}, expected {np.shape(base[name])}"
        if not np.all(np.isfinite(arr)):
            return Reason.NON_FINITE, f"{name} has non-finite values"
    if update.sample_count < 1:
        return Reason.BAD_COUNT, f"sample count {update.sample_count} < 1"
    return None


def server_step(base: Mapping[str, np.ndarray], updates: Sequence[tuple[str, SiteUpdate]], *, round_id: int,
                aggregate: Aggregate, weighting: Weighting = "samples") -> tuple[Tensors, dict[str, Any]]:
    """Aggregate one round; return the next shared tensors and the round report.

    Raises :class:`SegmentationError` (``too_few_updates``) when no update is left to aggregate.
    """
    accepted: list[Contribution] = []
    refused: dict[str, dict[str, str]] = {}
    for site, u in updates:
        problem = update_problem(base, u)
        if problem is not None:
            refused[site] = {"reason": problem[0].value, "message": problem[1]}
            log.warning("round %d: update of %s refused [%s] %s", round_id, site, problem[0].value, problem[1])
            continue
        accepted.append(Contribution(site, dict(u.tensors), u.sample_count if weighting == "samples" else 1,
                                     dict(u.metrics)))
    if not accepted:
        raise SegmentationError(f"round {round_id}: no update to aggregate ({len(refused)} refused)",
                                reason=Reason.TOO_FEW_UPDATES, detail={"refused": refused})
    new = aggregate(round_id, dict(base), accepted)
    report: dict[str, Any] = {
        "round": round_id, "weighting": weighting, "sites": [c.agent_id for c in accepted], "refused": refused,
        "sample_counts": {s: u.sample_count for s, u in updates},
        "train_loss": {c.agent_id: c.metrics.get("train_loss") for c in accepted},
    }
    privacy = {c.agent_id: {k: v for k, v in c.metrics.items() if k.startswith("dp_")} for c in accepted}
    if any(privacy.values()):
        report["privacy"] = privacy
    return new, report

"""Job types: what kind of federation a coordinator runs and what kind of model a box serves.

One runtime, several jobs (docs/architecture: "Jobs"). A :class:`Job` travels in every
:class:`~protocol.messages.Task` (what the agent must train) and in every model
:class:`~protocol.manifest.Manifest` (what the box will serve); :data:`SERVING_ENDPOINT` names the
agent API route that serves each job's models. ``classify`` is the default everywhere and is left
off the wire when it is the value, so a box or a coordinator that predates jobs understands a
classify task or manifest unchanged (and a classify manifest's signature covers the same bytes).

``JobParams``: a job's own knobs that must be the same at every site of a federation (e.g. the
segmentation job's sharing rule), flat scalars sent with each task; each job validates its own.
How to add a job: docs/jobs.md.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["SERVING_ENDPOINT", "Job", "JobParams", "serving_endpoint"]


class Job(StrEnum):
    """The job types (``fedscan coordinator --job``)."""

    CLASSIFY = "classify"  # rounds of local training and aggregation of a classifier (the default)
    SEGMENT = "segment"  # lesion segmentation across modalities with per-site adaptive DP (issue 18)
    ONESHOT = "oneshot"  # one upload per site, synthesis + distillation on the coordinator (issue 17)
    ANOMALY = "anomaly"  # autoencoder on normal images, FedDis shape/appearance split (issue 17)


JobParams = dict[str, str | int | float | bool]

#: the agent API route that serves a model of each job
SERVING_ENDPOINT: dict[Job, str] = {
    Job.CLASSIFY: "/v1/diagnose",
    Job.ONESHOT: "/v1/diagnose",  # the one-shot global model is a classifier
    Job.SEGMENT: "/v1/segment",
    Job.ANOMALY: "/v1/anomaly",
}


def serving_endpoint(job: Job | str) -> str:
    """The route that serves a model of ``job``."""
    return SERVING_ENDPOINT[Job(job)]

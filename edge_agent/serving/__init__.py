"""Serving: the served model, the micro-batcher, the diagnosis path, the studies kept for later.

:mod:`.model` (the served model), :mod:`.batcher` (micro-batching), :mod:`.diagnosis` (the path
shared by the HTTP API and the DICOM listener), :mod:`.pending` (studies that arrived before a model).
"""

from __future__ import annotations

from edge_agent.serving.batcher import InferenceResult, MicroBatcher
from edge_agent.serving.diagnosis import Diagnosis, DiagnosisService, InferenceHook, ResultHook, StageTimings
from edge_agent.serving.model import FAILURES, LoadedModel, ServedModel, ServingError

__all__ = [
    "FAILURES",
    "Diagnosis",
    "DiagnosisService",
    "InferenceHook",
    "InferenceResult",
    "LoadedModel",
    "MicroBatcher",
    "ResultHook",
    "ServedModel",
    "ServingError",
    "StageTimings",
]

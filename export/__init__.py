"""Export: torch → ONNX (verified) → INT8 QDQ → TensorRT per target, and inference engines with a fallback chain.

Must not depend on the coordinator.
"""

from export.engines import EngineArtifacts, EngineAttempt, InferenceEngine, NoEngine, select_engine
from export.errors import BadArtifact, EngineUnavailable, ExportError, VerificationError
from export.pipeline import export_model

__all__ = [
    "BadArtifact",
    "EngineArtifacts",
    "EngineAttempt",
    "EngineUnavailable",
    "ExportError",
    "InferenceEngine",
    "NoEngine",
    "VerificationError",
    "export_model",
    "select_engine",
]

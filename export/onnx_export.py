"""torch → ONNX (opset ≥ 17, dynamic batch axis), verified against torch before it is accepted.

``torch.onnx.export(..., dynamo=False)`` (the TorchScript exporter) is the path used: it is the
one that exports our GroupNorm models reliably to opset 17. A QAT-prepared model is exported
as its float twin (fake-quant removed); INT8 comes from ``export.int8``.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from export.errors import BadArtifact, ExportError
from export.verify import FP32_TOLERANCE, Tolerance, Verification, batched, compare_logits, torch_logits
from learning.qat import is_qat, to_float
from protocol.errors import Reason
from protocol.manifest import InputSpec

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 17
#: ``torch.onnx.export`` keeps its state in module globals ("GLOBALS.in_onnx_export must be False" when
#: two threads export at once: a coordinator and in-process agents rebuilding artifacts); one at a time.
_EXPORT_LOCK = threading.Lock()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def float_copy(model: nn.Module) -> nn.Module:
    """A CPU float32 eval-mode copy of ``model`` (QAT fake-quant removed); the original is untouched."""
    m = to_float(model) if is_qat(model) else copy.deepcopy(model)
    return m.float().cpu().eval()


def export_onnx(model: nn.Module, path: str | Path, *, input_spec: InputSpec, opset: int = MIN_OPSET) -> Path:
    """Write ``model`` as ONNX with a dynamic batch axis; input ``input`` (N,C,H,W), output ``logits``."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} < {MIN_OPSET}", reason=Reason.BAD_OPSET)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = float_copy(model)
    example = torch.zeros(2, input_spec.channels, input_spec.height, input_spec.width)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with _EXPORT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                m,
                (example,),
                str(tmp),
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many types; all mean "no artifact"
        tmp.unlink(missing_ok=True)
        raise ExportError(f"torch.onnx.export failed: {exc}", reason=Reason.EXPORT_FAILED) from exc
    try:
        check_onnx(tmp)
    except BadArtifact:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path


def check_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and check an ONNX file; ``BadArtifact`` if it is missing, corrupt or invalid."""
    p = Path(path)
    try:
        model = onnx.load(str(p))
        onnx.checker.check_model(model, full_check=True)
    except FileNotFoundError as exc:
        raise BadArtifact(f"{p}: no such file") from exc
    except Exception as exc:  # onnx raises DecodeError, ValidationError, InferenceError...
        raise BadArtifact(f"{p}: not a valid ONNX model: {type(exc).__name__}: {exc}") from exc
    return model


def cpu_session(path: str | Path, *, threads: int | None = None,
                optimized_model_path: str | Path | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session tuned for latency: all graph optimizations, sequential execution, ``threads`` intra-op threads (one inter-op).

    ``BadArtifact`` if it will not load.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads is not None:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BadArtifact(f"{path}: onnxruntime cannot load it: {exc}") from exc


def verify_onnx(
    path: str | Path,
    reference: nn.Module | np.ndarray,
    images: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    tolerance: Tolerance = FP32_TOLERANCE,
    threads: int | None = None,
    what: str | None = None,
) -> Verification:
    """Run ``path`` in onnxruntime (CPU) on ``images`` and compare with torch (a model, or its logits)."""
    ref = torch_logits(float_copy(reference), images) if isinstance(reference, nn.Module) else reference
    sess = cpu_session(path, threads=threads)
    name = sess.get_inputs()[0].name
    got = batched(lambda x: np.asarray(sess.run(None, {name: x})[0], dtype=np.float32), images)
    return compare_logits(ref, got, tolerance=tolerance, what=what or Path(path).name, labels=labels)


def export_verified_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_spec: InputSpec,
    verify_images: np.ndarray,
    verify_labels: np.ndarray | None = None,
    opset: int = MIN_OPSET,
    tolerance: Tolerance = FP32_TOLERANCE,
    threads: int | None = None,
) -> Verification:
    """Export, then verify; on failure the file is removed and ``VerificationError`` raised."""
    p = export_onnx(model, path, input_spec=input_spec, opset=opset)
    try:
        return verify_onnx(p, model, verify_images, labels=verify_labels, tolerance=tolerance, threads=threads,
                           what=f"onnx-fp32 {p.name}")
    except ExportError:
        p.unlink(missing_ok=True)
        raise

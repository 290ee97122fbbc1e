"""One call from a trained torch model to verified inference artifacts for the manifest.

``export_model`` writes ONNX FP32 and ONNX INT8 (each verified against torch on real images,
INT8 also checked to hold INT8 initializers and QDQ nodes) and, for every CUDA target whose
builder exists on this machine, a TensorRT engine (verified the same way). Targets whose builder
is missing are skipped with the reason logged and written to ``export_report.json`` beside the
artifacts; no artifact is listed that was not built and verified.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from export.engines import TensorRTEngine
from export.errors import ExportError, describe
from export.int8 import quantize_int8
from export.onnx_export import MIN_OPSET, export_verified_onnx, float_copy, sha256_file, verify_onnx
from export.tensorrt_build import build_engine
from export.verify import (
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    INT8_TOLERANCE,
    Tolerance,
    batched,
    compare_logits,
    torch_logits,
)
from firmware.profile import ExportTarget
from protocol.manifest import Artifact, InputSpec

log = logging.getLogger(__name__)

FP32_NAME = "model.fp32.onnx"
INT8_NAME = "model.int8.onnx"
INT8_TRT_NAME = "model.int8-sym.onnx"


def _artifact(kind: str, path: Path, out_dir: Path, verification: dict[str, float | int | str],
              target: str | None = None) -> Artifact:
    return Artifact(kind=kind, uri=str(path.relative_to(out_dir)), sha256=sha256_file(path),
                    bytes=path.stat().st_size, target=target, verification=verification)


def export_model(
    model: nn.Module,
    *,
    input_spec: InputSpec,
    calib_images: np.ndarray,
    verify_images: np.ndarray,
    out_dir: str | Path,
    targets: Sequence[ExportTarget] = (),
    verify_labels: np.ndarray | None = None,
    opset: int = MIN_OPSET,
    threads: int | None = None,
    fp32_tolerance: Tolerance = FP32_TOLERANCE,
    int8_tolerance: Tolerance = INT8_TOLERANCE,
) -> list[Artifact]:
    """Export ``model`` to ONNX FP32, ONNX INT8 and TensorRT engines per CUDA target; each verified.

    ``calib_images`` (the coordinator's validation split) calibrate INT8; ``verify_images`` /
    ``verify_labels`` (real held-out images) verify every artifact against torch. FP32 failing
    verification raises ``VerificationError``; INT8 or an engine failing is left out and reported.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reference_model = float_copy(model)
    ref = torch_logits(reference_model, verify_images)
    report: dict[str, Any] = {"skipped": [], "artifacts": []}
    artifacts: list[Artifact] = []

    fp32 = out / FP32_NAME
    v = export_verified_onnx(reference_model, fp32, input_spec=input_spec, verify_images=verify_images,
                             verify_labels=verify_labels, opset=opset, tolerance=fp32_tolerance, threads=threads)
    artifacts.append(_artifact("onnx-fp32", fp32, out, {**v.as_dict(), "opset": opset}))

    int8 = out / INT8_NAME
    try:
        check = quantize_int8(fp32, int8, calib_images=calib_images)
        v8 = verify_onnx(int8, ref, verify_images, labels=verify_labels, tolerance=int8_tolerance,
                         threads=threads, what="onnx-int8")
        artifacts.append(_artifact("onnx-int8", int8, out, {**v8.as_dict(), **check.as_dict(),
                                                             "calibration_images": len(calib_images)}))
    except ExportError as exc:
        int8.unlink(missing_ok=True)
        log.warning("INT8 export left out: %s", exc)
        report["skipped"].append({"kind": "onnx-int8", "reason": describe(exc)})

    for target in targets:
        if target.device != "cuda":
            continue
        try:
            onnx_path, precision = fp32, target.precision
            tolerance = FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE
            if precision == "int8":
                onnx_path = out / INT8_TRT_NAME
                quantize_int8(fp32, onnx_path, calib_images=calib_images, for_tensorrt=True)
                tolerance = int8_tolerance
            built = build_engine(onnx_path, cache_dir=out / "trt-cache", precision=precision)
            engine = TensorRTEngine(built.engine_path, name=f"tensorrt-{precision}")
            vt = compare_logits(ref, batched(engine.predict, verify_images, batch_size=min(32, built.batch_range[2])),
                                tolerance=tolerance, what=f"tensorrt {target.name}", labels=verify_labels)
            dest = out / f"model.{target.name}.{precision}.engine"
            dest.write_bytes(built.engine_path.read_bytes())
            artifacts.append(_artifact("tensorrt", dest, out, {
                **vt.as_dict(), "precision": precision, "gpu": built.gpu_name,
                "tensorrt_version": built.tensorrt_version, "onnx_sha256": built.onnx_sha256,
                "min_batch": built.batch_range[0], "opt_batch": built.batch_range[1],
                "max_batch": built.batch_range[2]}, target=target.name))
        except ExportError as exc:
            log.warning("TensorRT engine for target %s left out: %s", target.name, exc)
            report["skipped"].append({"kind": "tensorrt", "target": target.name,
                                      "reason": describe(exc)})

    report["artifacts"] = [a.model_dump(mode="json") for a in artifacts]
    (out / "export_report.json").write_text(json.dumps(report, indent=2))
    return artifacts

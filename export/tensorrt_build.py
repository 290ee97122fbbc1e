"""TensorRT engine builder (``tensorrt`` Python API, imported lazily) with an engine cache.

Engines are cached under ``cache_dir`` by ONNX sha256 + GPU name + TensorRT version + precision
+ batch range: an engine only runs on the GPU model and TensorRT version that built it. One
timing cache per (GPU, TensorRT version) speeds later builds. FP16 builds set
``BuilderFlag.FP16``; INT8 builds take an INT8 QDQ ONNX (explicit quantization, symmetric
activations: ``export.int8.quantize_int8(..., for_tensorrt=True)``) and set INT8 + FP16 (the
implicit-calibration API is deprecated since TensorRT 10.1).

Where ``tensorrt`` or a CUDA GPU is absent, ``build_engine`` raises ``EngineUnavailable`` whose
reason is ``unavailable`` and the message says why; no file is written, nothing pretends an
engine exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from export.errors import BadArtifact, EngineUnavailable, ExportError, describe
from export.onnx_export import INPUT_NAME, check_onnx, sha256_file
from protocol.errors import Reason

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or ``EngineUnavailable`` (reason ``unavailable``)."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found, unused-ignore]
    except Exception as exc:  # ImportError, or a broken install raising OSError on its libraries
        raise EngineUnavailable(f"tensorrt does not import ({type(exc).__name__}: {exc})") from exc
    return trt


def cuda_gpu_name() -> str:
    """Name of CUDA device 0, or ``EngineUnavailable`` when there is none."""
    import torch

    if not torch.cuda.is_available():
        raise EngineUnavailable("no CUDA GPU visible to torch")
    return str(torch.cuda.get_device_name(0))


def tensorrt_status() -> tuple[bool, str]:
    """(available, reason): whether an engine can be built/run here, and why not."""
    try:
        trt = import_tensorrt()
        gpu = cuda_gpu_name()
    except EngineUnavailable as exc:
        return False, describe(exc)
    return True, f"tensorrt {trt.__version__} on {gpu}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def engine_cache_key(onnx_sha256: str, gpu_name: str, trt_version: str, precision: Precision,
                     batch_range: tuple[int, int, int]) -> str:
    """File stem of a cached engine: readable prefix + a hash of everything that makes it differ."""
    ident = json.dumps([onnx_sha256, gpu_name, trt_version, precision, list(batch_range)])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return f"{onnx_sha256[:12]}-{_slug(gpu_name)}-trt{_slug(trt_version)}-{precision}-{digest}"


@dataclass(frozen=True)
class EngineBuild:
    """A built (or cache-loaded) serialized engine and what it was built for."""

    engine_path: Path
    key: str
    precision: Precision
    gpu_name: str
    tensorrt_version: str
    onnx_sha256: str
    batch_range: tuple[int, int, int]
    cache_hit: bool


def build_engine(
    onnx_path: str | Path,
    *,
    cache_dir: str | Path,
    precision: Precision = "fp16",
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    workspace_bytes: int = 1 << 30,
) -> EngineBuild:
    """Build (or load from cache) a TensorRT engine for ``onnx_path`` on this machine's GPU."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    trt = import_tensorrt()
    gpu = cuda_gpu_name()
    onnx_path = Path(onnx_path)
    model = check_onnx(onnx_path)
    sha = sha256_file(onnx_path)
    batch_range = (min_batch, opt_batch, max_batch)
    key = engine_cache_key(sha, gpu, trt.__version__, precision, batch_range)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    engine_path = cache / f"{key}.engine"
    result = EngineBuild(engine_path, key, precision, gpu, trt.__version__, sha, batch_range, cache_hit=True)
    if engine_path.exists() and engine_path.stat().st_size > 0:
        log.info("tensorrt engine cache hit %s", engine_path.name)
        return result

    input_dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    input_name = model.graph.input[0].name or INPUT_NAME
    if len(input_dims) != 4 or any(d <= 0 for d in input_dims[1:]):
        raise BadArtifact(f"{onnx_path}: expected input (batch, C, H, W) with fixed C, H, W; got {input_dims}")
    c, h, w = input_dims[1:]

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(str(trt.__version__).split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"tensorrt cannot parse {onnx_path.name}: {errors}", reason=Reason.TENSORRT_PARSE_FAILED)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision in ("fp16", "int8"):
        if not builder.platform_has_fast_fp16:
            log.warning("GPU %s has no fast FP16; building anyway", gpu)
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        ops = {n.op_type for n in model.graph.node}
        if "QuantizeLinear" not in ops:
            raise ExportError("an INT8 TensorRT engine needs an INT8 QDQ ONNX (explicit quantization)",
                              reason=Reason.NOT_INT8)
        config.set_flag(trt.BuilderFlag.INT8)

    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (min_batch, c, h, w), (opt_batch, c, h, w), (max_batch, c, h, w))
    config.add_optimization_profile(profile)

    timing_path = cache / f"timing-{_slug(gpu)}-trt{_slug(trt.__version__)}.cache"
    timing_cache = config.create_timing_cache(timing_path.read_bytes() if timing_path.exists() else b"")
    config.set_timing_cache(timing_cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"tensorrt build of {onnx_path.name} ({precision}) failed; see the TensorRT log",
                          reason=Reason.TENSORRT_BUILD_FAILED)
    tmp = engine_path.with_suffix(".engine.tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(engine_path)
    timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    log.info("built tensorrt engine %s (%s, batch %s)", engine_path.name, precision, batch_range)
    return EngineBuild(engine_path, key, precision, gpu, trt.__version__, sha, batch_range, cache_hit=False)

"""Inference engines behind one interface, and the fallback chain that picks one.

``select_engine`` walks the profile's ``export.engine_order`` (e.g. tensorrt → ort-tensorrt →
ort-cuda → ort-cpu → torch), tries to build each engine with the artifacts at hand, runs a smoke
inference, and returns the first that works together with an ``EngineAttempt`` per name tried:
which ran, and why each other was skipped. Heavy or optional dependencies (CUDA, TensorRT,
onnxruntime GPU providers) are probed where used; absence is a reason, never a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from export.errors import BadArtifact, EngineUnavailable, ExportError, describe
from export.onnx_export import cpu_session, float_copy
from export.tensorrt_build import build_engine, cuda_gpu_name, import_tensorrt
from protocol.errors import Reason

log = logging.getLogger(__name__)

ENGINE_NAMES = ("tensorrt", "ort-tensorrt", "ort-cuda", "ort-cpu", "torch-cuda", "torch")


@runtime_checkable
class InferenceEngine(Protocol):
    """float32 NCHW batch in → float32 logits (N, classes) out."""

    name: str

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a float32 NCHW batch."""


@dataclass(frozen=True)
class EngineAttempt:
    """One engine tried when a model is activated: its name, whether it built and passed, and why not."""
    name: str
    ok: bool
    reason: str


@dataclass
class EngineArtifacts:
    """What a box has to run a model with. Any field may be missing; engines that need it are skipped.

    ``precision`` is the target's wish: ``int8`` makes ort-cpu run ``onnx_int8``, ``fp16`` makes the
    CUDA engines run in half precision. ``input_shape`` (C, H, W) enables the smoke inference.
    """

    onnx_fp32: Path | None = None
    onnx_int8: Path | None = None
    onnx_int8_tensorrt: Path | None = None  # symmetric-activation QDQ for TensorRT INT8 builds
    tensorrt_engine: Path | None = None
    torch_model: nn.Module | None = None
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    input_shape: tuple[int, int, int] | None = None
    cache_dir: Path | None = None
    cuda_graphs: bool = False


# -- onnxruntime ----------------------------------------------------------------------------------
class OrtEngine:
    """An onnxruntime session; CPU sessions are tuned for latency (see ``cpu_session``)."""

    def __init__(self, name: str, session: ort.InferenceSession) -> None:
        self.name = name
        self.session = session
        self._input = session.get_inputs()[0].name

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a float32 NCHW batch (ONNX Runtime session)."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return np.asarray(self.session.run(None, {self._input: x})[0], dtype=np.float32)


def _ort_gpu_session(path: Path, provider: str, options: dict[str, Any], threads: int | None) -> ort.InferenceSession:
    available = ort.get_available_providers()
    if provider not in available:
        raise EngineUnavailable(
            f"this onnxruntime build has no {provider} (providers: {', '.join(available)})"
        )
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = threads
    providers: list[Any] = [(provider, options)]
    if provider == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available:
        providers.append(("CUDAExecutionProvider", {"device_id": 0}))
    providers.append("CPUExecutionProvider")
    try:
        sess = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as exc:
        raise EngineUnavailable(f"{provider} session failed: {exc}") from exc
    active = sess.get_providers()
    if not active or active[0] != provider:  # onnxruntime falls back to CPU silently when a provider fails
        raise EngineUnavailable(f"{provider} did not initialise (session runs on {active})")
    return sess


def _ort_cpu(a: EngineArtifacts, threads: int | None) -> InferenceEngine:
    if a.precision == "int8" and a.onnx_int8 is not None:
        return OrtEngine("ort-cpu-int8", cpu_session(a.onnx_int8, threads=threads))
    if a.onnx_fp32 is not None:
        return OrtEngine("ort-cpu-fp32", cpu_session(a.onnx_fp32, threads=threads))
    if a.onnx_int8 is not None:
        return OrtEngine("ort-cpu-int8", cpu_session(a.onnx_int8, threads=threads))
    raise EngineUnavailable("no ONNX artifact")


def _ort_cuda(a: EngineArtifacts, threads: int | None) -> InferenceEngine:
    if a.onnx_fp32 is None:
        raise EngineUnavailable("no ONNX FP32 artifact")
    sess = _ort_gpu_session(a.onnx_fp32, "CUDAExecutionProvider", {"device_id": 0}, threads)
    return OrtEngine("ort-cuda-fp32", sess)


def _ort_tensorrt(a: EngineArtifacts, threads: int | None) -> InferenceEngine:
    path = a.onnx_int8_tensorrt if a.precision == "int8" and a.onnx_int8_tensorrt is not None else a.onnx_fp32
    if path is None:
        raise EngineUnavailable("no ONNX artifact")
    cache = str((a.cache_dir or path.parent) / "ort-trt-cache")
    options = {
        "device_id": 0,
        "trt_fp16_enable": a.precision in ("fp16", "int8"),
        "trt_int8_enable": path == a.onnx_int8_tensorrt,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
    }
    sess = _ort_gpu_session(path, "TensorrtExecutionProvider", options, threads)
    precision = "int8" if options["trt_int8_enable"] else "fp16" if options["trt_fp16_enable"] else "fp32"
    return OrtEngine(f"ort-tensorrt-{precision}", sess)


# -- torch ------------------------------------------------------------------------------------------
class TorchEngine:
    """Eager torch on CPU, or on CUDA (FP16 optional, CUDA graphs per batch size optional)."""

    def __init__(self, model: nn.Module, *, device: str = "cpu", fp16: bool = False, cuda_graphs: bool = False,
                 threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)  # process-wide: the same count as the other engines
        self.device = torch.device(device)
        if self.device.type == "cuda":
            cuda_gpu_name()
        elif fp16 or cuda_graphs:
            raise ValueError("fp16 / CUDA graphs are for CUDA only")
        m = float_copy(model).to(self.device)
        self.dtype = torch.float16 if fp16 else torch.float32
        self.model = m.to(self.dtype).eval()
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[int, ...], tuple[Any, torch.Tensor, torch.Tensor]] = {}
        suffix = "-fp16" if fp16 else ""
        suffix += "-graphs" if cuda_graphs else ""
        self.name = ("torch-cuda" if self.device.type == "cuda" else "torch") + suffix

    def _graph_for(self, shape: tuple[int, ...]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        if shape not in self._graphs:
            static_in = torch.zeros(shape, device=self.device, dtype=self.dtype)
            side = torch.cuda.Stream()  # type: ignore[no-untyped-call, unused-ignore]
            side.wait_stream(torch.cuda.current_stream())
            with torch.no_grad(), torch.cuda.stream(side):
                for _ in range(3):  # warm-up on a side stream, as torch.cuda.graphs advises
                    self.model(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph):
                static_out = self.model(static_in)
            self._graphs[shape] = (graph, static_in, static_out)
        return self._graphs[shape]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a float32 NCHW batch (torch; CUDA graphs replayed per batch shape when on)."""
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self.device.type == "cpu":
            with torch.inference_mode():
                cpu: np.ndarray = self.model(x).numpy()
                return cpu
        x = x.to(self.device, non_blocking=True).to(self.dtype)
        if self.cuda_graphs:
            graph, static_in, static_out = self._graph_for(tuple(x.shape))
            static_in.copy_(x)
            graph.replay()
            replayed: np.ndarray = static_out.float().cpu().numpy()
            return replayed
        with torch.inference_mode():
            out: np.ndarray = self.model(x).float().cpu().numpy()
            return out


def _torch(a: EngineArtifacts, threads: int | None) -> InferenceEngine:
    if a.torch_model is None:
        raise EngineUnavailable("no torch model")
    return TorchEngine(a.torch_model, threads=threads)


def _torch_cuda(a: EngineArtifacts, threads: int | None) -> InferenceEngine:
    if a.torch_model is None:
        raise EngineUnavailable("no torch model")
    if not torch.cuda.is_available():
        raise EngineUnavailable("no CUDA GPU visible to torch")
    return TorchEngine(a.torch_model, device="cuda", fp16=a.precision in ("fp16", "int8"),
                       cuda_graphs=a.cuda_graphs, threads=threads)


# -- TensorRT ---------------------------------------------------------------------------------------
class TensorRTEngine:
    """A deserialized TensorRT engine; device buffers are torch CUDA tensors (no pycuda needed)."""

    def __init__(self, engine_path: str | Path, *, name: str = "tensorrt") -> None:
        trt = import_tensorrt()
        cuda_gpu_name()
        self.name = name
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BadArtifact(f"{engine_path}: TensorRT cannot deserialize it (other GPU / TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BadArtifact(f"{engine_path}: expected one input and one output, got {inputs} / {outputs}")
        self._in, self._out = inputs[0], outputs[0]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a float32 NCHW batch (TensorRT execution context)."""
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).cuda()
        if not self.context.set_input_shape(self._in, tuple(x.shape)):
            raise ExportError(f"batch shape {tuple(x.shape)} outside the engine's optimization profile",
                              reason=Reason.BAD_INPUT)
        y = torch.empty(tuple(self.context.get_tensor_shape(self._out)), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self._in, x.data_ptr())
        self.context.set_tensor_address(self._out, y.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("tensorrt execution failed", reason=Reason.INFERENCE_FAILED)
        stream.synchronize()
        return y.cpu().numpy()


def _tensorrt(a: EngineArtifacts, threads: int | None) -> InferenceEngine:
    import_tensorrt()
    cuda_gpu_name()
    if a.tensorrt_engine is not None:
        return TensorRTEngine(a.tensorrt_engine, name=f"tensorrt-{a.precision}")
    # none shipped: build (or load from the local cache) on this box at install time
    if a.precision == "int8" and a.onnx_int8_tensorrt is not None:
        onnx_path, precision = a.onnx_int8_tensorrt, "int8"
    elif a.onnx_fp32 is not None:
        onnx_path, precision = a.onnx_fp32, "fp16" if a.precision in ("fp16", "int8") else "fp32"
    else:
        raise EngineUnavailable("no engine shipped and no ONNX to build one from")
    built = build_engine(onnx_path, cache_dir=a.cache_dir or onnx_path.parent / "trt-cache",
                         precision=precision)  # type: ignore[arg-type]
    return TensorRTEngine(built.engine_path, name=f"tensorrt-{precision}")


_FACTORIES: dict[str, Callable[[EngineArtifacts, int | None], InferenceEngine]] = {
    "tensorrt": _tensorrt,
    "ort-tensorrt": _ort_tensorrt,
    "ort-cuda": _ort_cuda,
    "ort-cpu": _ort_cpu,
    "torch-cuda": _torch_cuda,
    "torch": _torch,
}


def make_engine(name: str, artifacts: EngineArtifacts, *, threads: int | None = None) -> InferenceEngine:
    """Build one engine by chain name; ``EngineUnavailable`` / ``BadArtifact`` say why not."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise EngineUnavailable(f"unknown engine {name!r}; known: {', '.join(ENGINE_NAMES)}") from None
    return factory(artifacts, threads)


def smoke_test(engine: InferenceEngine, input_shape: tuple[int, int, int]) -> None:
    """One inference on a zero image: output must be (1, classes) and finite."""
    out = engine.predict(np.zeros((1, *input_shape), dtype=np.float32))
    if out.ndim != 2 or out.shape[0] != 1 or not np.all(np.isfinite(out)):
        raise ExportError(f"smoke inference gave shape {out.shape} / non-finite values", reason=Reason.SMOKE_FAILED)


class NoEngine(ExportError):
    """No engine of the chain could run; ``attempts`` says why each was skipped."""

    reason = Reason.NO_ENGINE

    def __init__(self, attempts: list[EngineAttempt]) -> None:
        super().__init__("no inference engine available: " + "; ".join(f"{a.name}: {a.reason}" for a in attempts))
        self.attempts = attempts


def select_engine(
    artifacts: EngineArtifacts, order: Sequence[str], *, threads: int | None
) -> tuple[InferenceEngine, list[EngineAttempt]]:
    """First engine of ``order`` that builds and passes a smoke inference, with the record of attempts."""
    attempts: list[EngineAttempt] = []
    for name in order:
        try:
            engine = make_engine(name, artifacts, threads=threads)
            if artifacts.input_shape is not None:
                smoke_test(engine, artifacts.input_shape)
        except Exception as exc:  # any failure of one engine is a reason to fall back, never a crash
            reason = describe(exc)
            attempts.append(EngineAttempt(name, False, reason))
            continue
        attempts.append(EngineAttempt(name, True, f"selected {engine.name}"))
        skipped = "; ".join(f"{a.name}: {a.reason}" for a in attempts if not a.ok)
        log.info("engine %s selected (%s)%s", name, engine.name, f"; skipped {skipped}" if skipped else "")
        return engine, attempts
    raise NoEngine(attempts)

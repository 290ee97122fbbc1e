"""Engine fallback chain: with no GPU and no TensorRT the CPU engine runs and the record says why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.engines import (
    EngineArtifacts,
    EngineAttempt,
    InferenceEngine,
    NoEngine,
    TorchEngine,
    make_engine,
    select_engine,
)
from export.int8 import quantize_int8
from export.onnx_export import export_onnx
from export.tensorrt_build import tensorrt_status
from firmware.profile import ExportSection
from learning.models import build_model
from protocol.manifest import InputSpec

SPEC = InputSpec(channels=1, height=28, width=28)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("small_cnn", width=8).eval()


@pytest.fixture(scope="module")
def onnx_paths(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("engines")
    fp32 = export_onnx(model, d / "m.onnx", input_spec=SPEC)
    int8 = d / "m.int8.onnx"
    quantize_int8(fp32, int8, calib_images=np.random.default_rng(0).normal(size=(16, 1, 28, 28)).astype(np.float32))
    return fp32, int8


def _no_gpu_stack() -> None:
    if tensorrt_status()[0] or torch.cuda.is_available():
        pytest.skip("this machine has a GPU / TensorRT: the CPU-only fallback is not what happens here")


def test_chain_falls_back_to_ort_cpu_and_records_why(model: torch.nn.Module, onnx_paths: tuple[Path, Path]) -> None:
    _no_gpu_stack()
    arts = EngineArtifacts(onnx_fp32=onnx_paths[0], torch_model=model, input_shape=(1, 28, 28))
    engine, attempts = select_engine(arts, ["tensorrt", "ort-cuda", "ort-cpu"], threads=1)
    assert engine.name == "ort-cpu-fp32" and isinstance(engine, InferenceEngine)
    assert [a.name for a in attempts] == ["tensorrt", "ort-cuda", "ort-cpu"]
    assert [a.ok for a in attempts] == [False, False, True]
    assert attempts[0].reason.startswith("unavailable:") and "tensorrt" in attempts[0].reason
    assert attempts[1].reason.startswith("unavailable:") and "CUDAExecutionProvider" in attempts[1].reason
    x = np.random.default_rng(1).normal(size=(3, 1, 28, 28)).astype(np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    out = engine.predict(x)
    assert out.dtype == np.float32 and out.shape == (3, 2)
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_default_profile_order_selects_cpu(model: torch.nn.Module, onnx_paths: tuple[Path, Path]) -> None:
    _no_gpu_stack()
    order = ExportSection().engine_order
    engine, attempts = select_engine(EngineArtifacts(onnx_fp32=onnx_paths[0], torch_model=model), order, threads=1)
    assert engine.name == "ort-cpu-fp32"
    assert all(not a.ok and a.reason for a in attempts[:-1]) and attempts[-1].ok


def test_int8_precision_runs_the_int8_model(onnx_paths: tuple[Path, Path]) -> None:
    arts = EngineArtifacts(onnx_fp32=onnx_paths[0], onnx_int8=onnx_paths[1], precision="int8", input_shape=(1, 28, 28))
    engine, _ = select_engine(arts, ["ort-cpu"], threads=1)
    assert engine.name == "ort-cpu-int8"


def test_corrupt_onnx_falls_back_to_torch_with_a_typed_reason(model: torch.nn.Module, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    arts = EngineArtifacts(onnx_fp32=bad, torch_model=model, input_shape=(1, 28, 28))
    engine, attempts = select_engine(arts, ["ort-cpu", "torch"], threads=1)
    assert isinstance(engine, TorchEngine) and engine.name == "torch"
    assert attempts[0] == EngineAttempt("ort-cpu", False, attempts[0].reason)
    assert attempts[0].reason.startswith("bad_artifact:")


def test_smoke_inference_refuses_an_engine_that_cannot_run(onnx_paths: tuple[Path, Path]) -> None:
    arts = EngineArtifacts(onnx_fp32=onnx_paths[0], input_shape=(3, 28, 28))  # wrong channel count
    with pytest.raises(NoEngine) as err:
        select_engine(arts, ["ort-cpu"], threads=1)
    assert err.value.reason == "no_engine" and not err.value.attempts[0].ok


def test_nothing_available_raises_no_engine_with_all_reasons() -> None:
    with pytest.raises(NoEngine) as err:
        select_engine(EngineArtifacts(), ["tensorrt", "ort-cpu", "torch", "warp-drive"], threads=1)
    reasons = {a.name: a.reason for a in err.value.attempts}
    assert set(reasons) == {"tensorrt", "ort-cpu", "torch", "warp-drive"}
    assert "no ONNX artifact" in reasons["ort-cpu"] and "no torch model" in reasons["torch"]
    assert "unknown engine" in reasons["warp-drive"]


def test_torch_cuda_and_ort_gpu_say_why_without_a_gpu(model: torch.nn.Module, onnx_paths: tuple[Path, Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    from export.errors import EngineUnavailable

    with pytest.raises(EngineUnavailable, match="no CUDA GPU"):
        make_engine("torch-cuda", EngineArtifacts(torch_model=model))
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(EngineUnavailable, match="TensorrtExecutionProvider"):
            make_engine("ort-tensorrt", EngineArtifacts(onnx_fp32=onnx_paths[0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: torch-cuda FP16 / CUDA graphs not testable")
def test_torch_cuda_fp16_and_graphs_agree_with_cpu(model: torch.nn.Module) -> None:
    x = np.random.default_rng(2).normal(size=(4, 1, 28, 28)).astype(np.float32)
    ref = TorchEngine(model).predict(x)
    for graphs in (False, True):
        eng = make_engine("torch-cuda", EngineArtifacts(torch_model=model, precision="fp16", cuda_graphs=graphs))
        out = eng.predict(x)
        assert (out.argmax(1) == ref.argmax(1)).all() and np.abs(out - ref).max() < 5e-2
        assert np.allclose(eng.predict(x), out)  # graph replay is repeatable

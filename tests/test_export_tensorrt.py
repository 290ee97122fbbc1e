"""TensorRT builder: real builds where ``tensorrt`` imports; elsewhere it says why and builds nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from export.errors import EngineUnavailable
from export.onnx_export import export_onnx
from export.tensorrt_build import Precision, build_engine, engine_cache_key, tensorrt_status
from learning.models import build_model
from protocol.manifest import InputSpec

SPEC = InputSpec(channels=1, height=28, width=28)
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    m = build_model("small_cnn", width=8).eval()
    return m, export_onnx(m, tmp_path_factory.mktemp("trt") / "m.onnx", input_spec=SPEC)


def test_cache_key_separates_gpu_version_precision_and_batch_range() -> None:
    sha = "a" * 64
    base = engine_cache_key(sha, "NVIDIA H100 80GB HBM3", "10.9.0", "fp16", (1, 8, 32))
    assert base.startswith("aaaaaaaaaaaa-nvidia-h100-80gb-hbm3-trt10.9.0-fp16-")
    others = {
        engine_cache_key("b" * 64, "NVIDIA H100 80GB HBM3", "10.9.0", "fp16", (1, 8, 32)),
        engine_cache_key(sha, "NVIDIA A10", "10.9.0", "fp16", (1, 8, 32)),
        engine_cache_key(sha, "NVIDIA H100 80GB HBM3", "10.8.0", "fp16", (1, 8, 32)),
        engine_cache_key(sha, "NVIDIA H100 80GB HBM3", "10.9.0", "int8", (1, 8, 32)),
        engine_cache_key(sha, "NVIDIA H100 80GB HBM3", "10.9.0", "fp16", (1, 8, 64)),
    }
    assert base not in others and len(others) == 5


@pytest.mark.skipif(HAS_TRT and torch.cuda.is_available(), reason="tensorrt and a GPU are present")
def test_builder_says_unavailable_and_writes_nothing(onnx_path: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    ok, reason = tensorrt_status()
    assert not ok and reason.startswith("unavailable:")
    with pytest.raises(EngineUnavailable) as err:
        build_engine(onnx_path[1], cache_dir=tmp_path / "cache", precision="fp16")
    assert err.value.reason == "unavailable" and str(err.value).startswith("[unavailable] ")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU for TensorRT")
@pytest.mark.skipif(not HAS_TRT, reason="tensorrt does not import here (not installable on this machine)")
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_build_run_and_cache(onnx_path: tuple[torch.nn.Module, Path], tmp_path: Path, precision: Precision) -> None:
    from export.engines import TensorRTEngine

    model, path = onnx_path
    first = build_engine(path, cache_dir=tmp_path, precision=precision, max_batch=8)
    assert not first.cache_hit and first.engine_path.stat().st_size > 0
    assert list(tmp_path.glob("timing-*.cache"))
    second = build_engine(path, cache_dir=tmp_path, precision=precision, max_batch=8)
    assert second.cache_hit and second.engine_path == first.engine_path
    x = np.random.default_rng(0).normal(size=(4, 1, 28, 28)).astype(np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    out = TensorRTEngine(first.engine_path).predict(x)
    assert out.shape == (4, 2) and np.abs(out - ref).max() < 5e-2

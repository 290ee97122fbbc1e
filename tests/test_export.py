"""ONNX FP32 / INT8 export: verification accepts a faithful export and catches a wrong one."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export.errors import BadArtifact, VerificationError
from export.int8 import check_int8, quantize_int8
from export.onnx_export import MIN_OPSET, check_onnx, cpu_session, export_onnx, export_verified_onnx, verify_onnx
from export.pipeline import export_model
from export.verify import INT8_TOLERANCE, Tolerance
from firmware.profile import ExportTarget
from learning.data_path import find_data_file
from learning.datasets import load_medmnist, make_synthetic
from learning.models import build_model
from protocol.manifest import Artifact, InputSpec

SPEC = InputSpec(channels=1, height=28, width=28)
ROOT = Path(__file__).resolve().parent.parent


def _images(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    p = find_data_file("pneumoniamnist.npz")
    ds = load_medmnist(p, split) if p is not None else make_synthetic(n, seed={"val": 1, "test": 2}[split])
    x, y = ds.subset(np.arange(min(n, len(ds)))).batch()
    return x.numpy(), y.numpy()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A SmallCNN trained a few steps so that its predictions are not all one class."""
    torch.manual_seed(0)
    m = build_model("small_cnn", width=8)
    x, y = _images("val", 256)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(xt), yt).backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    return _images("test", 128)


@pytest.fixture(scope="module")
def fp32(
    model: torch.nn.Module, held_out: tuple[np.ndarray, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    p = tmp_path_factory.mktemp("fp32") / "m.onnx"
    export_verified_onnx(model, p, input_spec=SPEC, verify_images=held_out[0], verify_labels=held_out[1])
    return p


def test_fp32_export_verifies_with_opset_and_dynamic_batch(
    model: torch.nn.Module, held_out: tuple[np.ndarray, np.ndarray], fp32: Path
) -> None:
    x, y = held_out
    v = verify_onnx(fp32, model, x, labels=y)
    assert v.samples == len(x) and v.max_abs_diff < 1e-4 and v.top1_agreement == 1.0
    assert v.accuracy == v.reference_accuracy
    with torch.inference_mode():
        preds = model(torch.from_numpy(x)).argmax(1).numpy()
    assert 0 < preds.mean() < 1, "the verification model must not predict one class only"
    proto = onnx.load(str(fp32))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= MIN_OPSET
    sess = cpu_session(fp32, threads=1)
    for n in (1, 5):
        assert sess.run(None, {"input": x[:n]})[0].shape == (n, 2)


def test_tampered_export_fails_verification(
    model: torch.nn.Module, held_out: tuple[np.ndarray, np.ndarray], fp32: Path, tmp_path: Path
) -> None:
    proto = onnx.load(str(fp32))
    init = next(t for t in proto.graph.initializer if t.name == "classifier.weight")
    w = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(-w, init.name))  # flips the classifier's decision
    bad = tmp_path / "tampered.onnx"
    onnx.save(proto, str(bad))
    check_onnx(bad)  # still a valid model: only verification can tell
    with pytest.raises(VerificationError) as err:
        verify_onnx(bad, model, held_out[0])
    assert err.value.reason == "verification_failed" and "max abs diff" in str(err.value)


def test_small_weight_change_is_caught_by_the_abs_tolerance(
    model: torch.nn.Module, held_out: tuple[np.ndarray, np.ndarray], fp32: Path, tmp_path: Path
) -> None:
    proto = onnx.load(str(fp32))
    init = next(t for t in proto.graph.initializer if t.name == "classifier.bias")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.01, init.name))
    bad = tmp_path / "nudged.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(VerificationError, match="max abs diff"):
        verify_onnx(bad, model, held_out[0])


def test_verification_against_another_model_fails(
    model: torch.nn.Module, held_out: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    other = build_model("small_cnn", width=8)  # a different model as reference: must be refused
    p = tmp_path / "m.onnx"
    export_onnx(model, p, input_spec=SPEC)
    with pytest.raises(VerificationError):
        verify_onnx(p, other, held_out[0])


def test_failed_verification_leaves_no_file(
    model: torch.nn.Module, held_out: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    p = tmp_path / "m.onnx"
    impossible = Tolerance(max_abs_diff=-1.0, min_top1_agreement=1.0)
    with pytest.raises(VerificationError):
        export_verified_onnx(model, p, input_spec=SPEC, verify_images=held_out[0], tolerance=impossible)
    assert not p.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all", None])
def test_corrupt_onnx_is_a_typed_error(fp32: Path, tmp_path: Path, content: bytes | None) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(fp32.read_bytes()[: len(fp32.read_bytes()) // 2] if content is None else content)
    with pytest.raises(BadArtifact) as err:
        check_onnx(bad)
    assert err.value.reason == "bad_artifact"
    with pytest.raises(BadArtifact):
        cpu_session(bad)
    with pytest.raises(BadArtifact):
        check_onnx(tmp_path / "missing.onnx")


def test_int8_has_int8_initializers_qdq_nodes_and_agrees(
    model: torch.nn.Module, held_out: tuple[np.ndarray, np.ndarray], fp32: Path, tmp_path: Path
) -> None:
    calib, _ = _images("val", 64)
    out = tmp_path / "m.int8.onnx"
    check = quantize_int8(fp32, out, calib_images=calib)
    proto = onnx.load(str(out))
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == 2  # conv 2 and 3, per-channel int8; the first conv stays float
    assert check.int8_initializers >= 2 and check.quantize_nodes > 0 and check.dequantize_nodes > 0
    v = verify_onnx(out, model, held_out[0], tolerance=INT8_TOLERANCE)
    assert v.top1_agreement >= INT8_TOLERANCE.min_top1_agreement and v.max_abs_diff > 0
    with pytest.raises(BadArtifact) as err:
        check_int8(fp32)  # the FP32 model is not INT8
    assert err.value.reason == "not_int8"


def test_export_model_lists_verified_artifacts_and_no_fake_engine(
    model: torch.nn.Module, held_out: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    calib, _ = _images("val", 32)
    arts = export_model(
        model,
        input_spec=SPEC,
        calib_images=calib,
        verify_images=held_out[0],
        verify_labels=held_out[1],
        out_dir=tmp_path,
        targets=[ExportTarget(name="jetson", device="cuda", precision="fp16")],
    )
    kinds = [a.kind for a in arts]
    assert kinds[:2] == ["onnx-fp32", "onnx-int8"]
    for a in arts:
        Artifact.model_validate(a.model_dump())
        data = (tmp_path / a.uri).read_bytes()
        assert a.sha256 == hashlib.sha256(data).hexdigest() and a.bytes == len(data)
        assert {"max_abs_diff", "top1_agreement", "accuracy", "samples"} <= set(a.verification)
    try:
        import tensorrt  # type: ignore[import-not-found]  # noqa: F401

        import_ok = torch.cuda.is_available()
    except ImportError:
        import_ok = False
    if not import_ok:
        assert "tensorrt" not in kinds
        assert not list(tmp_path.rglob("*.engine"))
        report = json.loads((tmp_path / "export_report.json").read_text())
        assert report["skipped"][0]["target"] == "jetson"
        assert report["skipped"][0]["reason"].startswith("unavailable:")


def test_export_package_does_not_import_coordinator() -> None:
    code = (
        "import sys, export, export.pipeline, export.engines, export.tensorrt_build;"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'coordinator'];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)

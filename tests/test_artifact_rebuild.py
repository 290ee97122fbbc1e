"""A box rebuilds the ONNX FP32 serving artifact from its bit-exact weights instead of downloading it.

The artifact here is the coordinator's real export (``export.pipeline.export_model`` on the model
built the coordinator's way); the box's rebuild must be byte-identical to it, or the box downloads.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from agent_helpers import FLEET_KEY, TINY_CNN, tiny_manifest, tiny_trust

from edge_agent.artifact_rebuild import ArtifactRebuilder, rebuild_onnx_fp32
from edge_agent.fetcher import ModelFetcher
from edge_agent.installer import ModelInstaller
from export.pipeline import export_model
from firmware.profile import find_profile
from learning.models import build_model
from learning.state import get_tensors, set_tensors
from protocol.manifest import Artifact, Manifest
from protocol.memory_transport import MemoryBroker, MemoryTransport
from protocol.topics import Topics

PROFILE = find_profile("xray-cxr-28")  # ort-cpu engine order: ONNX FP32 is the artifact it uses


def _coordinator_export(weights: dict[str, np.ndarray], out: Path) -> list[Artifact]:
    """What the coordinator ships: FP32 + INT8 of the model built from the aggregated tensors."""
    model = build_model("small_cnn", **TINY_CNN)
    set_tensors(model, weights)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(16, 1, 28, 28)).astype(np.float32)
    manifest = tiny_manifest("v1", weights)
    return export_model(model.eval(), input_spec=manifest.input, calib_images=images, verify_images=images,
                        out_dir=out, threads=1)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, dict[str, np.ndarray], Path]:
    torch.manual_seed(3)
    weights = get_tensors(build_model("small_cnn", **TINY_CNN))
    out = tmp_path_factory.mktemp("export")
    arts = _coordinator_export(weights, out)
    manifest = FLEET_KEY.sign_manifest(tiny_manifest("v1", weights).model_copy(update={"artifacts": arts}))
    return manifest, weights, out


def _fp32(manifest: Manifest) -> Artifact:
    return next(a for a in manifest.artifacts if a.kind == "onnx-fp32")


def test_rebuild_is_byte_identical_to_the_coordinators_export(shipped: tuple[Manifest, dict, Path]) -> None:
    manifest, weights, out = shipped
    art = _fp32(manifest)
    assert rebuild_onnx_fp32(manifest, weights, art) == (out / art.uri).read_bytes()
    rebuilder = ArtifactRebuilder()
    assert rebuilder.try_rebuild(manifest, weights, art) == (out / art.uri).read_bytes()
    assert rebuilder.rebuilt == 1 and rebuilder.enabled


def test_int8_is_never_rebuilt(shipped: tuple[Manifest, dict, Path]) -> None:
    manifest, weights, _ = shipped
    int8 = next(a for a in manifest.artifacts if a.kind == "onnx-int8")
    rebuilder = ArtifactRebuilder()
    assert rebuilder.try_rebuild(manifest, weights, int8) is None
    assert rebuilder.enabled  # not a mismatch: INT8 needs the coordinator's calibration images


def test_a_mismatch_turns_rebuilds_off_and_nothing_unsigned_is_returned(shipped: tuple[Manifest, dict, Path]) -> None:
    manifest, weights, _ = shipped
    art = _fp32(manifest)
    other = {k: v + np.float32(1e-3) for k, v in weights.items()}  # as if another exporter's bytes
    rebuilder = ArtifactRebuilder()
    assert rebuilder.try_rebuild(manifest, other, art) is None
    assert not rebuilder.enabled
    assert rebuilder.try_rebuild(manifest, weights, art) is None  # off for the process: download instead
    assert rebuilder.rebuilt == 0


def _fetcher(tmp_path: Path, manifest: Manifest, weights: dict[str, np.ndarray],
             rebuilder: ArtifactRebuilder) -> tuple[ModelFetcher, ModelInstaller, list[str]]:
    """A fetcher over an in-memory broker with no coordinator: every download request is recorded."""
    broker, topics = MemoryBroker(), Topics()
    requests: list[str] = []
    watcher = MemoryTransport(broker, "watcher")
    watcher.connect()
    watcher.subscribe(topics.model_request("box-a"), lambda t, p: requests.append(t))
    transport = MemoryTransport(broker, "box-a")
    transport.connect()
    installer = ModelInstaller(tmp_path / "models", trust=tiny_trust())
    installer.install(manifest, weights)
    fetcher = ModelFetcher("box-a", transport, topics, installer, PROFILE, stop=threading.Event(),
                           events=lambda kind, detail: None, timeout_s=0.5, rebuilder=rebuilder)
    fetcher.attach()
    return fetcher, installer, requests


def test_the_fetcher_installs_the_rebuilt_artifact_without_asking(tmp_path: Path,
                                                                   shipped: tuple[Manifest, dict, Path]) -> None:
    manifest, weights, _ = shipped
    fetcher, installer, requests = _fetcher(tmp_path, manifest, weights, ArtifactRebuilder())
    assert fetcher.fetch_artifacts("v1") == ["model.fp32.onnx"]
    assert installer.has_artifact("v1", _fp32(manifest))
    assert requests == []  # nothing asked of the coordinator


def test_with_rebuilds_off_the_fetcher_asks_the_coordinator(tmp_path: Path,
                                                            shipped: tuple[Manifest, dict, Path]) -> None:
    manifest, weights, _ = shipped
    fetcher, installer, requests = _fetcher(tmp_path, manifest, weights, ArtifactRebuilder(enabled=False))
    assert fetcher.fetch_artifacts("v1") == []  # no coordinator here: the download times out, reported
    assert requests and not installer.has_artifact("v1", _fp32(manifest))


def test_boxes_in_one_process_rebuild_at_once(shipped: tuple[Manifest, dict, Path]) -> None:
    """torch.onnx.export keeps global state: concurrent exports (in-process agents, the coordinator) take turns."""
    manifest, weights, out = shipped
    art = _fp32(manifest)
    results: list[bytes | None] = []
    rebuilders = [ArtifactRebuilder() for _ in range(4)]
    threads = [threading.Thread(target=lambda r=r: results.append(r.try_rebuild(manifest, weights, art)))
               for r in rebuilders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [(out / art.uri).read_bytes()] * 4
    assert all(r.enabled for r in rebuilders)

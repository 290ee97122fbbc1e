"""Serving artifacts rebuilt on the box from the bit-exact weights it already holds.

The weights a box installs are bit for bit the coordinator's (their tensor hash is in the signed
manifest), and exporting them to ONNX FP32 is deterministic for one torch/onnx release. So a box
can export the artifact itself and compare it with the manifest's signed sha256: when the bytes
match, the artifact the coordinator verified against torch is the one the box now holds, and
nothing crossed the network for it. When they differ (another torch release on the box, another
exporter), the box says so once and falls back to downloading the artifact for the rest of the
process: a rebuild is never installed unless it is byte-identical to the signed artifact.

INT8 and TensorRT artifacts are not rebuilt: INT8 is calibrated on the coordinator's validation
images, which never leave it, and an engine is built for one GPU.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
from pathlib import Path

from edge_agent.installer import build_from_manifest
from export.errors import ExportError
from export.onnx_export import MIN_OPSET, export_onnx
from protocol.codec import Tensors
from protocol.manifest import Artifact, Manifest

log = logging.getLogger("fedscan.agent.rebuild")

#: The artifact kinds a box can rebuild from weights alone.
REBUILDABLE = frozenset({"onnx-fp32"})


def rebuild_onnx_fp32(manifest: Manifest, tensors: Tensors, artifact: Artifact) -> bytes:
    """Export ``manifest``'s architecture with ``tensors`` as the coordinator does (same opset).

    The caller compares the result with ``artifact.sha256``; ``ExportError`` when export fails.
    """
    opset = int(artifact.verification.get("opset", MIN_OPSET))
    model = build_from_manifest(manifest, tensors)
    with tempfile.TemporaryDirectory(prefix="fedscan-rebuild-") as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", input_spec=manifest.input, opset=opset)
        return path.read_bytes()


class ArtifactRebuilder:
    """Rebuilds artifacts while rebuilds match; after the first mismatch, stops trying (logged once)."""

    def __init__(self, *, enabled: bool = True) -> None:
        """``enabled=False`` always downloads (the behaviour before rebuilds existed)."""
        self._enabled = enabled
        self._lock = threading.Lock()
        self.rebuilt = 0  # artifacts taken from a rebuild rather than the network (this process)

    @property
    def enabled(self) -> bool:
        """Whether the next eligible artifact is rebuilt before anything is downloaded."""
        return self._enabled

    def try_rebuild(self, manifest: Manifest, tensors: Tensors, artifact: Artifact) -> bytes | None:
        """The artifact's bytes when a rebuild matches its signed sha256, else ``None`` (download it)."""
        if not self._enabled or artifact.kind not in REBUILDABLE:
            return None
        try:
            data = rebuild_onnx_fp32(manifest, tensors, artifact)
        except ExportError as exc:
            self._disable(f"{artifact.uri} of {manifest.version}: export failed: {exc}")
            return None
        if hashlib.sha256(data).hexdigest() != artifact.sha256:
            self._disable(f"{artifact.uri} of {manifest.version}: the rebuild does not match the signed sha256 "
                          "(another torch/onnx release than the coordinator's?)")
            return None
        with self._lock:
            self.rebuilt += 1
        log.debug("artifact %s of %s rebuilt from the installed weights", artifact.uri, manifest.version)
        return data

    def _disable(self, why: str) -> None:
        with self._lock:
            if not self._enabled:
                return
            self._enabled = False
        log.warning("artifact rebuilds off for this process, downloading instead: %s", why)

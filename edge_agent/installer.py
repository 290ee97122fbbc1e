"""The one place where models are installed on the box: verify → store → activate, keep previous.

``install`` checks the manifest's Ed25519 signature against the box's trust store (when one is
configured; without one, unsigned models are accepted and a log line says so) and that the
tensors hash to the manifest's tensor hash, then stores them; ``activate`` builds the model, runs a smoke
inference (finite logits of the right shape), then switches the ``ACTIVE`` pointer atomically
and keeps the previous version for rollback. Listeners (the inference service) are told after
the switch. A model that fails any step is refused with a reason and the box keeps serving
what it had.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from learning.models import build_model
from learning.state import set_tensors
from protocol.codec import Tensors, TensorSpec
from protocol.errors import ManifestError
from protocol.frame import decode_model, encode_model
from protocol.manifest import Artifact, Manifest, parse_manifest
from protocol.signing import TrustStore
from protocol.tensors import tensor_hash

log = logging.getLogger("fedscan.agent.installer")

ActivationListener = Callable[[Manifest, Tensors], None]


class InstallError(ManifestError):
    reason = "install_failed"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def build_from_manifest(manifest: Manifest, tensors: Tensors) -> torch.nn.Module:
    model = build_model(manifest.architecture.name, **manifest.architecture.kwargs)
    set_tensors(model, tensors)
    model.eval()
    return model


class ModelInstaller:
    def __init__(self, root: str | Path, *, trust: TrustStore | None = None, profile: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._listeners: list[ActivationListener] = []
        self.trust, self.profile = trust, profile
        if trust is None:
            log.warning("no trust store configured: model signatures are NOT checked, unsigned models are accepted")

    def verify(self, manifest: Manifest) -> None:
        """Raise ``SignatureError`` (reason unsigned/unknown_key/bad_signature/retired_key/wrong_target)
        unless the manifest is signed by a trusted key and targets this box; no-op without a trust store."""
        if self.trust is not None:
            self.trust.verify_manifest(manifest, profile=self.profile)

    # -- queries ------------------------------------------------------------------------------------
    def has(self, version: str) -> bool:
        return (self.root / version / "manifest.json").exists()

    def manifest(self, version: str) -> Manifest:
        return parse_manifest((self.root / version / "manifest.json").read_bytes())

    def tensors(self, version: str) -> Tensors:
        m = self.manifest(version)
        specs = [TensorSpec(t.name, tuple(t.shape)) for t in m.tensors]
        _, tensors = decode_model((self.root / version / "weights.fsuf").read_bytes(), expected=specs,
                                  expected_hash=m.tensor_hash)
        return tensors

    def artifact_path(self, version: str, artifact: Artifact) -> Path:
        name = Path(artifact.uri).name  # never a path outside the version folder
        return self.root / version / "artifacts" / name

    def has_artifact(self, version: str, artifact: Artifact) -> bool:
        p = self.artifact_path(version, artifact)
        return p.exists() and hashlib.sha256(p.read_bytes()).hexdigest() == artifact.sha256

    def add_artifact(self, version: str, artifact: Artifact, data: bytes) -> Path:
        """Store an inference artifact of an installed model after checking it against the manifest."""
        if hashlib.sha256(data).hexdigest() != artifact.sha256:
            raise InstallError(f"artifact {artifact.uri} of {version} does not match its manifest hash",
                               reason="hash_mismatch")
        p = self.artifact_path(version, artifact)
        p.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(p, data)
        return p

    def _pointer(self) -> dict[str, str | None]:
        p = self.root / "ACTIVE"
        if not p.exists():
            return {"active": None, "previous": None}
        data = json.loads(p.read_text())
        return {"active": data.get("active"), "previous": data.get("previous")}

    @property
    def active_version(self) -> str | None:
        return self._pointer()["active"]

    @property
    def previous_version(self) -> str | None:
        return self._pointer()["previous"]

    def installed(self) -> list[str]:
        ms = [self.manifest(p.name) for p in self.root.iterdir() if (p / "manifest.json").exists()]
        return [m.version for m in sorted(ms, key=lambda m: (m.round_id if m.round_id is not None else -1))]

    # -- changes ------------------------------------------------------------------------------------
    def add_listener(self, listener: ActivationListener) -> None:
        self._listeners.append(listener)

    def install(self, manifest: Manifest, tensors: Tensors) -> None:
        """Verify and store a model (not yet serving)."""
        self.verify(manifest)
        got = tensor_hash(tensors)
        if got != manifest.tensor_hash:
            raise InstallError(f"model {manifest.version}: tensor hash {got[:12]} != manifest {manifest.tensor_hash[:12]}",
                               reason="hash_mismatch")
        if [(k, tuple(v.shape)) for k, v in tensors.items()] != [(t.name, tuple(t.shape)) for t in manifest.tensors]:
            raise InstallError(f"model {manifest.version}: tensors do not match manifest", reason="shape_mismatch")
        folder = self.root / manifest.version
        if self.has(manifest.version):
            return
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / "weights.fsuf", encode_model(tensors, version=manifest.version,
                                                           round_id=manifest.round_id or 0))
        _atomic_write(folder / "manifest.json", manifest.to_bytes())  # written last: marks the install complete

    def smoke_test(self, manifest: Manifest, tensors: Tensors) -> None:
        try:
            model = build_from_manifest(manifest, tensors)
            spec = manifest.input
            with torch.no_grad():
                out = model(torch.zeros(1, spec.channels, spec.height, spec.width))
        except Exception as exc:  # any failure to build/run is a refusal, never a crash of the box
            raise InstallError(f"model {manifest.version} failed its smoke inference: {exc}", reason="smoke_failed") from exc
        if out.shape[0] != 1 or not bool(torch.isfinite(out).all()):
            raise InstallError(f"model {manifest.version}: smoke inference gave {tuple(out.shape)} / non-finite",
                               reason="smoke_failed")
        if out.ndim == 2 and out.shape[1] != len(manifest.classes):
            raise InstallError(f"model {manifest.version}: {out.shape[1]} outputs for {len(manifest.classes)} classes",
                               reason="smoke_failed")

    def activate(self, version: str) -> Manifest:
        """Smoke-test an installed version, then make it the one served (previous kept)."""
        with self._lock:
            manifest = self.manifest(version)
            tensors = self.tensors(version)
            self.smoke_test(manifest, tensors)
            ptr = self._pointer()
            if ptr["active"] != version:
                _atomic_write(self.root / "ACTIVE", json.dumps({"active": version, "previous": ptr["active"]}).encode())
            for listener in self._listeners:
                listener(manifest, tensors)
            log.info("serving model %s (previous %s)", version, ptr["active"])
            return manifest

    def rollback(self) -> str:
        prev = self.previous_version
        if prev is None or not self.has(prev):
            raise InstallError("no previous model to roll back to", reason="no_previous")
        self.activate(prev)
        return prev

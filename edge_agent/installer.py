"""The one place where models are installed on the box: verify → store → activate, keep previous.

``install`` checks the manifest's Ed25519 signature against the box's trust store and that the
tensors hash to the manifest's tensor hash, then stores them (fsynced: a power loss never leaves
a half-written model that looks installed). ``activate`` verifies the signature again against the
trust store as it is *now* (a retired key stops a model at its next activation, start-up
included), refuses a move backwards unless a signed rollback order allows it
(:mod:`edge_agent.versions`), builds the model and runs a smoke inference (finite logits of the
right shape), then switches the ``ACTIVE`` pointer atomically and durably, keeping the previous
version. Listeners (the inference service) are told after the switch. A model that fails any
step is refused with a reason and the box keeps serving what it had.

Without a trust store every model is refused, unless the installer was built with
``allow_unsigned`` (the development-only ``--insecure-unsigned-models``; logged loudly).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edge_agent.durable import atomic_write, durable_mkdir
from edge_agent.trust import TrustSource
from edge_agent.versions import DirectionError, check_rollback, is_forward
from learning.models import build_model
from learning.state import set_tensors
from protocol.codec import Tensors, TensorSpec
from protocol.errors import FedscanError, Reason
from protocol.frame import decode_model, encode_model
from protocol.manifest import Artifact, Manifest, parse_manifest
from protocol.messages import RollbackOrder
from protocol.signing import SignatureError, TrustStore
from protocol.tensors import tensor_hash

log = logging.getLogger("fedscan.agent.installer")

ActivationListener = Callable[[Manifest, Tensors], None]


class InstallError(FedscanError):
    """A model or artifact the box refuses to install or serve; it keeps serving what it had."""

    reason = Reason.INSTALL_FAILED


def build_from_manifest(manifest: Manifest, tensors: Tensors) -> torch.nn.Module:
    """Build the manifest's architecture with ``tensors`` loaded, in eval mode."""
    model = build_model(manifest.architecture.name, **manifest.architecture.kwargs)
    set_tensors(model, tensors)
    model.eval()
    return model


class ModelInstaller:
    """Installed models under ``root`` (one folder per version) and the ``ACTIVE`` pointer."""

    def __init__(
        self,
        root: str | Path,
        *,
        trust: TrustStore | TrustSource | None = None,
        allow_unsigned: bool = False,
        profile: str | None = None,
        agent_id: str = "",
        fleet: str = "default",
    ) -> None:
        """Keep models under ``root``; verify against ``trust`` (refuse everything without, unless ``allow_unsigned``)."""
        self.root = Path(root)
        durable_mkdir(self.root)
        self._lock = threading.Lock()
        self._listeners: list[ActivationListener] = []
        self.trust, self.allow_unsigned, self.profile = trust, allow_unsigned, profile
        self.agent_id, self.fleet = agent_id, fleet
        if trust is None and allow_unsigned:
            log.warning("INSECURE: no trust store, model signatures are NOT checked (development only)")

    def trust_store(self) -> TrustStore | None:
        """Return the trust store as it is now; ``None`` only in the insecure development mode."""
        if isinstance(self.trust, TrustSource):
            return self.trust.current()
        if self.trust is None and not self.allow_unsigned:
            raise SignatureError("this box has no trust store: every model is refused", reason=Reason.NO_TRUST_STORE)
        return self.trust

    def verify(self, manifest: Manifest) -> None:
        """Raise ``SignatureError`` unless the manifest is signed by a trusted key and targets this box.

        Reasons: unsigned, unknown_key, bad_signature, retired_key, wrong_target, no_trust_store,
        bad_trust_store.
        """
        store = self.trust_store()
        if store is not None:
            store.verify_manifest(manifest, profile=self.profile)

    # -- queries ------------------------------------------------------------------------------------
    def has(self, version: str) -> bool:
        """Whether ``version`` is completely installed."""
        return (self.root / version / "manifest.json").exists()

    def manifest(self, version: str) -> Manifest:
        """Return the stored manifest of an installed version."""
        return parse_manifest((self.root / version / "manifest.json").read_bytes())

    def tensors(self, version: str) -> Tensors:
        """Return the weights of an installed version (checked against its manifest's hash)."""
        m = self.manifest(version)
        specs = [TensorSpec(t.name, tuple(t.shape)) for t in m.tensors]
        _, tensors = decode_model((self.root / version / "weights.fsuf").read_bytes(), expected=specs,
                                  expected_hash=m.tensor_hash)
        return tensors

    def artifact_path(self, version: str, artifact: Artifact) -> Path:
        """Return where an artifact of an installed version lives (never outside its folder)."""
        name = Path(artifact.uri).name
        return self.root / version / "artifacts" / name

    def has_artifact(self, version: str, artifact: Artifact) -> bool:
        """Whether the artifact is present with the manifest's hash."""
        p = self.artifact_path(version, artifact)
        return p.exists() and hashlib.sha256(p.read_bytes()).hexdigest() == artifact.sha256

    def add_artifact(self, version: str, artifact: Artifact, data: bytes) -> Path:
        """Store an inference artifact of an installed model after checking it against the manifest."""
        if hashlib.sha256(data).hexdigest() != artifact.sha256:
            raise InstallError(f"artifact {artifact.uri} of {version} does not match its manifest hash",
                               reason=Reason.HASH_MISMATCH)
        p = self.artifact_path(version, artifact)
        durable_mkdir(p.parent)
        atomic_write(p, data)
        return p

    def _pointer(self) -> dict[str, Any]:
        p = self.root / "ACTIVE"
        if not p.exists():
            return {"active": None, "previous": None}
        data = json.loads(p.read_text())
        return data if isinstance(data, dict) else {"active": None, "previous": None}

    @property
    def active_version(self) -> str | None:
        """The version the pointer names as served."""
        active = self._pointer().get("active")
        return active if isinstance(active, str) else None

    @property
    def previous_version(self) -> str | None:
        """The version served before the active one."""
        previous = self._pointer().get("previous")
        return previous if isinstance(previous, str) else None

    def active_manifest(self) -> Manifest | None:
        """Return the manifest of the active version, when it is installed."""
        active = self.active_version
        return self.manifest(active) if active is not None and self.has(active) else None

    def installed(self) -> list[str]:
        """Installed versions, oldest round first."""
        ms = [self.manifest(p.name) for p in self.root.iterdir() if (p / "manifest.json").exists()]
        return [m.version for m in sorted(ms, key=lambda m: (m.round_id if m.round_id is not None else -1))]

    # -- changes ------------------------------------------------------------------------------------
    def add_listener(self, listener: ActivationListener) -> None:
        """Call ``listener(manifest, tensors)`` after every activation."""
        self._listeners.append(listener)

    def install(self, manifest: Manifest, tensors: Tensors) -> None:
        """Verify and store a model (not yet serving)."""
        self.verify(manifest)
        got = tensor_hash(tensors)
        if got != manifest.tensor_hash:
            raise InstallError(f"model {manifest.version}: tensor hash {got[:12]} != manifest {manifest.tensor_hash[:12]}",
                               reason=Reason.HASH_MISMATCH)
        if [(k, tuple(v.shape)) for k, v in tensors.items()] != [(t.name, tuple(t.shape)) for t in manifest.tensors]:
            raise InstallError(f"model {manifest.version}: tensors do not match manifest", reason=Reason.SHAPE_MISMATCH)
        folder = self.root / manifest.version
        if self.has(manifest.version):
            return
        durable_mkdir(folder)
        atomic_write(folder / "weights.fsuf", encode_model(tensors, version=manifest.version,
                                                          round_id=manifest.round_id or 0))
        atomic_write(folder / "manifest.json", manifest.to_bytes())  # written last: marks the install complete

    def smoke_test(self, manifest: Manifest, tensors: Tensors) -> None:
        """Raise ``InstallError`` unless the model builds and gives finite logits of the right shape.

        A model whose forward returns a tuple (the anomaly autoencoder's reconstruction and codes)
        is checked on its first output.
        """
        try:
            model = build_from_manifest(manifest, tensors)
            spec = manifest.input
            with torch.no_grad():
                out = model(torch.zeros(1, spec.channels, spec.height, spec.width))
            if isinstance(out, tuple):  # e.g. the anomaly autoencoder: (reconstruction, codes...); check the first
                out = out[0]
        except Exception as exc:  # any failure to build/run is a refusal, never a crash of the box
            raise InstallError(f"model {manifest.version} failed its smoke inference: {exc}", reason=Reason.SMOKE_FAILED) from exc
        if out.shape[0] != 1 or not bool(torch.isfinite(out).all()):
            raise InstallError(f"model {manifest.version}: smoke inference gave {tuple(out.shape)} / non-finite",
                               reason=Reason.SMOKE_FAILED)
        if out.ndim == 2 and out.shape[1] != len(manifest.classes):
            raise InstallError(f"model {manifest.version}: {out.shape[1]} outputs for {len(manifest.classes)} classes",
                               reason=Reason.SMOKE_FAILED)

    def check_move(self, manifest: Manifest, rollback: RollbackOrder | None = None) -> bool:
        """Raise unless serving ``manifest`` moves forward or ``rollback`` validly orders the way back.

        Returns whether the move goes back (by the order).
        """
        active = self.active_manifest()
        if is_forward(manifest, active):
            return False
        if rollback is None:
            raise DirectionError(f"model {manifest.version} is older than the active {active.version if active else None}:"
                                 " a box only moves back by a signed rollback order", reason=Reason.DOWNGRADE)
        check_rollback(rollback, trust=self.trust_store(), fleet=self.fleet, agent_id=self.agent_id,
                       active=self.active_version, target=manifest.version,
                       last_rollback_at=self._pointer().get("last_rollback_at"))
        return True

    def activate(self, version: str, *, rollback: RollbackOrder | None = None) -> Manifest:
        """Verify, direction-check and smoke-test an installed version, then serve it (previous kept)."""
        with self._lock:
            manifest = self.manifest(version)
            self.verify(manifest)
            back = self.check_move(manifest, rollback)
            tensors = self.tensors(version)
            self.smoke_test(manifest, tensors)
            ptr = self._pointer()
            new = dict(ptr)
            if ptr.get("active") != version:
                new.update(active=version, previous=ptr.get("active"))
            if back and rollback is not None:
                new["last_rollback_at"] = rollback.issued_at
            if new != ptr:
                atomic_write(self.root / "ACTIVE", json.dumps(new).encode())
            for listener in self._listeners:
                listener(manifest, tensors)
            log.info("serving model %s (previous %s)%s", version, ptr.get("active"),
                     f", rolled back by order signed by {rollback.key_id}" if back and rollback else "")
            return manifest

"""Model fetching: signed manifests as they are announced, model and artifact downloads on request.

Manifests arrive retained on ``models/+/manifest`` and are kept by version. Each version's
compressed step from its parent is broadcast once on ``models/{version}/chunks``; a box that holds
the parent takes it from there and asks for nothing. Otherwise a download asks the coordinator on
this agent's ``requests`` topic (from the newest installed version when there is one) and
reassembles the chunks that come back on its ``downloads`` topic; a partial transfer is resumed
by naming the missing chunks. Weights that do not rebuild to the manifest's tensor hash from the
version held are fetched whole. Inference artifacts come as patches against the same artifact of
the version the box serves, and only those its engine order can use; an ONNX FP32 artifact is first
rebuilt from the installed weights and taken without a download when it matches the signed
sha256 (:mod:`edge_agent.artifact_rebuild`). Nothing is installed here
except through :class:`~edge_agent.installer.ModelInstaller`, which verifies before it stores.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from edge_agent.artifact_rebuild import ArtifactRebuilder
from edge_agent.installer import InstallError, ModelInstaller
from edge_agent.work import EventSink, check_stop
from firmware.profile import FirmwareProfile
from protocol.chunks import parse_chunk
from protocol.codec import CodecError, Tensors, TensorSpec
from protocol.codec.patch import patch_decode
from protocol.errors import FrameError, ManifestError, Reason
from protocol.frame import decode_model
from protocol.manifest import Artifact, Manifest, parse_manifest
from protocol.messages import ModelRequest
from protocol.reassembly import Reassembler, ReassemblyLimits
from protocol.topics import Topics
from protocol.transfers import artifact_transfer, model_transfer
from protocol.transport import Transport
from protocol.validation_batch import is_inline

log = logging.getLogger("fedscan.agent.fetcher")

COORDINATOR = "coordinator"  # the one sender of download chunks (the agent's own downloads topic)
BROADCAST = "broadcast"  # the sender of the steps broadcast on models/{version}/chunks
#: Broadcast steps kept until a task or desired shadow asks for their version.
BROADCAST_KEEP: Final = 4
#: How long to wait for a broadcast step whose chunks are arriving before asking for it.
BROADCAST_WAIT_S: Final = 5.0

RequestFor = Callable[[list[int] | None], ModelRequest]


class ModelFetcher:
    """Manifests by version, and the downloads of model weights and inference artifacts."""

    def __init__(
        self,
        agent_id: str,
        transport: Transport,
        topics: Topics,
        installer: ModelInstaller,
        profile: FirmwareProfile,
        *,
        stop: threading.Event,
        events: EventSink,
        timeout_s: float = 30.0,
        rebuilder: ArtifactRebuilder | None = None,
    ) -> None:
        """Fetch for ``agent_id`` over ``transport``; waits end when ``stop`` is set."""
        self.agent_id, self.transport, self.topics = agent_id, transport, topics
        self.rebuilder = rebuilder if rebuilder is not None else ArtifactRebuilder()
        self.installer, self.profile = installer, profile
        self.stop, self.events, self.timeout_s = stop, events, timeout_s
        self._manifests: dict[str, Manifest] = {}
        self._manifest_cond = threading.Condition()
        self._downloads = Reassembler(ReassemblyLimits(max_transfers_per_sender=4))
        self._done: dict[str, bytes] = {}
        self._done_cond = threading.Condition()
        self._steps = Reassembler(ReassemblyLimits(max_transfers_per_sender=BROADCAST_KEEP))
        self._broadcast: OrderedDict[str, bytes] = OrderedDict()  # complete broadcast steps by transfer id
        self._batches: OrderedDict[str, bytes] = OrderedDict()  # referenced validation batches by sha256

    def attach(self) -> None:
        """Subscribe to manifests and to this agent's downloads."""
        self.transport.subscribe(self.topics.downloads(self.agent_id), self.on_download)
        self.transport.subscribe(self.topics.all_model_chunks(), self.on_broadcast)
        self.transport.subscribe(self.topics.all_model_manifests(), self.on_manifest)

    def wake(self) -> None:
        """Wake every wait (the agent is stopping)."""
        for cond in (self._manifest_cond, self._done_cond):
            with cond:
                cond.notify_all()

    # -- handlers (dispatcher thread): record and signal only ------------------------------------
    def on_manifest(self, topic: str, payload: bytes) -> None:
        """Keep an announced manifest (parsed, not yet verified: that happens before any install)."""
        if not payload:
            return
        try:
            m = parse_manifest(payload)
        except ManifestError as exc:
            log.warning("ignoring bad manifest on %s: %s", topic, exc)
            return
        with self._manifest_cond:
            self._manifests[m.version] = m
            self._manifest_cond.notify_all()

    def on_download(self, topic: str, payload: bytes) -> None:
        """Add one chunk of a download; a complete, hash-checked transfer wakes its waiter."""
        done = _complete(self._downloads, COORDINATOR, payload, f"model chunk on {topic}")
        if done is None:
            return
        transfer_id, blob = done
        with self._done_cond:
            self._done[transfer_id] = blob
            self._done_cond.notify_all()

    def on_broadcast(self, topic: str, payload: bytes) -> None:
        """Add one chunk of a broadcast step; a complete, hash-checked one is kept for its version."""
        done = _complete(self._steps, BROADCAST, payload, f"broadcast chunk on {topic}")
        if done is None:
            return
        transfer_id, blob = done
        with self._done_cond:
            self._broadcast[transfer_id] = blob
            while len(self._broadcast) > BROADCAST_KEEP:
                self._broadcast.popitem(last=False)
            self._done_cond.notify_all()

    # -- work thread -----------------------------------------------------------------------------
    def wait_manifest(self, version: str, timeout: float | None = None) -> Manifest:
        """Return the announced manifest of ``version``; ``TimeoutError`` when none comes in time."""
        timeout = self.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._manifest_cond:
            while version not in self._manifests:
                check_stop(self.stop)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no manifest for {version} after {timeout:.0f}s")
                self._manifest_cond.wait(left)
            return self._manifests[version]

    def base_manifest(self, version: str) -> Manifest:
        """Return the manifest of ``version`` as announced now, else as installed, else wait for it."""
        with self._manifest_cond:
            announced = self._manifests.get(version)
        if announced is not None:
            return announced
        return self.installer.manifest(version) if self.installer.has(version) else self.wait_manifest(version)

    def ensure_model(self, version: str) -> Tensors:
        """Local weights of ``version``: installed, else rebuilt from the version held, else downloaded whole.

        From the version held: the broadcast step when that is the parent, else asked for (the
        step, or an XOR delta from an older version). Weights that do not rebuild bit for bit to
        the manifest's tensor hash are refused (reported) and fetched whole.
        """
        if self.installer.has(version):
            return self.installer.tensors(version)
        manifest = self.wait_manifest(version)
        self.installer.verify(manifest)  # refuse before downloading anything
        have = next((v for v in reversed(self.installer.installed()) if v != version), None)
        specs = [TensorSpec(t.name, tuple(t.shape)) for t in manifest.tensors]
        tensors: Tensors | None = None
        if have is not None:
            transfer = model_transfer(version, have)
            blob = self.broadcast_step(transfer) if have == manifest.parent else None
            if blob is None:
                blob = self.download(transfer, lambda missing: ModelRequest(
                    version=version, have=have, transfer_id=transfer if missing else None, missing=missing))
            try:
                _, tensors = decode_model(blob, expected=specs, expected_hash=manifest.tensor_hash,
                                          base=self.installer.tensors(have))
            except FrameError as exc:
                log.warning("%s from %s does not rebuild (%s): fetching it whole", version, have, exc)
                self.events("model_refused", {"version": version, "reason": exc.reason,
                                              "detail": f"step from {have}; fetching the whole model"})
        if tensors is None:
            whole = model_transfer(version, None)
            blob = self.download(whole, lambda missing: ModelRequest(
                version=version, transfer_id=whole if missing else None, missing=missing))
            try:
                _, tensors = decode_model(blob, expected=specs, expected_hash=manifest.tensor_hash)
            except FrameError as exc:
                self.events("model_refused", {"version": version, "reason": exc.reason})
                raise
        self.installer.install(manifest, tensors)
        return tensors

    def broadcast_step(self, transfer: str) -> bytes | None:
        """The broadcast step ``transfer``: kept, or arriving (waited for briefly); ``None`` otherwise."""
        deadline = time.monotonic() + min(BROADCAST_WAIT_S, self.timeout_s)
        with self._done_cond:
            while transfer not in self._broadcast:
                check_stop(self.stop)
                left = deadline - time.monotonic()
                if left <= 0 or self._steps.get(BROADCAST, transfer) is None:
                    return None  # not broadcast to us (missed, or subscribed late): ask for it
                self._done_cond.wait(min(left, 0.5))
            return self._broadcast.pop(transfer)

    def download(self, transfer: str, request: RequestFor) -> bytes:
        """Ask for a transfer until it is complete; resume by naming the missing chunks."""
        deadline = time.monotonic() + self.timeout_s * 3
        attempt = 0
        while time.monotonic() < deadline:
            attempt += 1
            partial = self._downloads.get(COORDINATOR, transfer)
            missing = partial.missing if partial is not None and attempt > 1 else None
            self.transport.publish(self.topics.model_request(self.agent_id), request(missing).to_bytes())
            with self._done_cond:
                self._done_cond.wait_for(lambda: transfer in self._done or self.stop.is_set(), timeout=self.timeout_s)
                blob = self._done.pop(transfer, None)
            check_stop(self.stop)
            if blob is not None:
                return blob
            log.info("%s: download incomplete, asking again (attempt %d)", transfer, attempt)
        raise TimeoutError(f"{transfer} not received after {attempt} requests")

    def validation_batch(self, version: str) -> bytes | None:
        """The ``.npz`` of the validation batch ``version``'s manifest names by reference, fetched once per hash.

        ``None`` when the manifest names none, holds it inline, or the download failed (logged; the
        shadow then reports the batch as unusable).
        """
        vb = self.installer.manifest(version).validation_batch
        if vb is None or is_inline(vb):
            return None
        if vb.sha256 in self._batches:
            return self._batches[vb.sha256]
        tid = artifact_transfer(version, vb.uri, None)
        try:
            data = self.download(tid, lambda missing: ModelRequest(
                version=version, artifact=vb.uri, transfer_id=tid if missing else None, missing=missing))
        except TimeoutError as exc:
            log.warning("validation batch of %s not fetched: %s", version, exc)
            return None
        if hashlib.sha256(data).hexdigest() != vb.sha256:
            log.warning("validation batch of %s does not match its manifest hash", version)
            return None
        self._batches[vb.sha256] = data
        while len(self._batches) > 2:
            self._batches.popitem(last=False)
        return data

    def usable(self, artifact: Artifact) -> bool:
        """Whether an engine of this box's engine order can run ``artifact`` (others are not fetched).

        A TensorRT engine of one of its own targets; ONNX FP32 for any ONNX engine (ort-cpu, ort-cuda,
        ort-tensorrt, or a TensorRT build on the box); ONNX INT8 only when one of its targets is INT8.
        """
        export = self.profile.export
        order = set(export.engine_order) if export else {"ort-cpu", "torch"}
        targets = export.targets if export else []
        onnx_engines = bool(order & {"tensorrt", "ort-tensorrt", "ort-cuda", "ort-cpu"})
        if artifact.kind == "tensorrt":
            return "tensorrt" in order and artifact.target in {t.name for t in targets}
        if artifact.kind == "onnx-int8":
            return onnx_engines and any(t.precision == "int8" for t in targets)
        return onnx_engines

    def fetch_artifacts(self, version: str) -> list[str]:
        """Download the inference artifacts this box can use; return the URIs present.

        Each comes as a patch against the same artifact of the version this box serves (whole when
        it holds none) and is checked against the signed manifest's sha256. A failure leaves the
        box on the weights (torch engine), with the reason logged and reported.
        """
        manifest = self.installer.manifest(version)
        present = []
        for art in manifest.artifacts:
            if not self.usable(art):
                continue
            if self.installer.has_artifact(version, art):
                present.append(art.uri)
                continue
            try:
                data = self._fetch_artifact(version, art)
                self.installer.add_artifact(version, art, data)
                present.append(art.uri)
            except (TimeoutError, ManifestError, InstallError, CodecError) as exc:
                log.warning("artifact %s of %s not installed: %s", art.uri, version, exc)
                self.events("artifact_refused", {"version": version, "artifact": art.uri,
                                                 "reason": getattr(exc, "reason", Reason.TIMEOUT)})
        return present

    def _fetch_artifact(self, version: str, art: Artifact) -> bytes:
        """One artifact's bytes: rebuilt here when that matches, else a patch against the served version's, else whole."""
        rebuilt = self.rebuilder.try_rebuild(self.installer.manifest(version), self.installer.tensors(version), art)
        if rebuilt is not None:
            return rebuilt
        served = self.installer.active_version
        base_art = None
        if served is not None and served != version and self.installer.has(served):
            base_art = next((a for a in self.installer.manifest(served).artifacts
                             if a.uri == art.uri and a.kind == art.kind and self.installer.has_artifact(served, a)),
                            None)
        if base_art is None or served is None:
            whole = artifact_transfer(version, art.uri, None)
            return self.download(whole, lambda missing: ModelRequest(
                version=version, artifact=art.uri, transfer_id=whole if missing else None, missing=missing))
        tid = artifact_transfer(version, art.uri, served)
        patch = self.download(tid, lambda missing: ModelRequest(
            version=version, artifact=art.uri, have=served, transfer_id=tid if missing else None, missing=missing))
        base = self.installer.artifact_path(served, base_art).read_bytes()
        try:
            data = patch_decode(patch, base, max_output=art.bytes)
            if hashlib.sha256(data).hexdigest() == art.sha256:
                return data
            reason, why = Reason.HASH_MISMATCH, "does not match the manifest's sha256"
        except CodecError as exc:
            reason, why = exc.reason, exc.message
        log.warning("artifact %s of %s: patch from %s %s; fetching it whole", art.uri, version, served, why)
        self.events("artifact_refused", {"version": version, "artifact": art.uri, "reason": reason,
                                         "detail": f"patch from {served}; fetching it whole"})
        whole = artifact_transfer(version, art.uri, None)
        return self.download(whole, lambda missing: ModelRequest(
            version=version, artifact=art.uri, transfer_id=whole if missing else None, missing=missing))


def _complete(reassembler: Reassembler, sender: str, payload: bytes, what: str) -> tuple[str, bytes] | None:
    """Add one chunk; return (transfer id, blob) once the transfer is complete and checks, else None (logged)."""
    try:
        r = reassembler.add(sender, parse_chunk(payload))
    except FrameError as exc:
        log.warning("bad %s: %s", what, exc)
        return None
    if not r.complete:
        return None
    try:
        return r.transfer_id, r.blob()
    except FrameError as exc:
        log.warning("transfer %s corrupt: %s", r.transfer_id, exc)
        return None
    finally:
        reassembler.discard(sender, r.transfer_id)

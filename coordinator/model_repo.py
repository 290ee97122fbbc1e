"""Global model versions on disk: weights frame, manifest and strategy state per version.

Layout: ``{root}/{version}/weights.fsuf`` (a ``raw|zstd`` model frame), ``manifest.json``,
``strategy.npz`` and, for a version published as a compressed step from its parent, ``step.fsuf``
(that step, the frame every box holding the parent receives) and ``downlink-ef.npz`` (what the
step left out, carried into the next one). A version folder is written under a temporary name and renamed into place,
so a crash never leaves a half-written version; the state store's model row (written after)
is the commit point.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from protocol.codec import ErrorFeedbackState, Tensors, TensorSpec
from protocol.frame import decode_model, encode_model
from protocol.manifest import Manifest, parse_manifest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class ModelRepository:
    """Model versions on disk: signed manifest, weights frame and strategy state per version."""

    def __init__(self, root: str | Path, *, cache_size: int = 4) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._cache: OrderedDict[str, Tensors] = OrderedDict()
        self._cache_size = cache_size

    def path(self, version: str) -> Path:
        """The folder of ``version``."""
        return self.root / version

    def has(self, version: str) -> bool:
        """Whether ``version`` is completely saved."""
        return (self.path(version) / "manifest.json").exists()

    def save(self, manifest: Manifest, tensors: Mapping[str, np.ndarray], strategy_state: Mapping[str, np.ndarray],
             *, step: bytes | None = None, downlink_state: ErrorFeedbackState | None = None) -> None:
        """Save a version atomically: written to a temporary folder, then renamed into place.

        ``step`` is the compressed step from the parent that decodes to ``tensors`` (see
        :func:`protocol.frame.encode_model_step`), ``downlink_state`` the residual it left.
        """
        final = self.path(manifest.version)
        if final.exists():
            if self.manifest(manifest.version).tensor_hash != manifest.tensor_hash:
                raise FileExistsError(f"model {manifest.version} exists with different weights")
            return
        tmp = self.root / f".tmp-{manifest.version}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write(tmp / "weights.fsuf", encode_model(tensors, version=manifest.version, round_id=manifest.round_id or 0))
        buf = io.BytesIO()
        np.savez(buf, **dict(strategy_state))  # type: ignore[arg-type]
        _write(tmp / "strategy.npz", buf.getvalue())
        if step is not None:
            _write(tmp / "step.fsuf", step)
        if downlink_state is not None:
            downlink_state.save(tmp / "downlink-ef.npz")
        _write(tmp / "manifest.json", manifest.to_bytes())
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(self.root)

    def manifest(self, version: str) -> Manifest:
        """The manifest of ``version``."""
        return parse_manifest((self.path(version) / "manifest.json").read_bytes())

    def weights_frame(self, version: str) -> bytes:
        """The encoded weights of ``version``."""
        return (self.path(version) / "weights.fsuf").read_bytes()

    def step_frame(self, version: str) -> bytes | None:
        """The compressed step from the parent that ``version`` was published as (``None``: none)."""
        p = self.path(version) / "step.fsuf"
        return p.read_bytes() if p.exists() else None

    def downlink_state(self, version: str) -> ErrorFeedbackState:
        """The downlink residual left after publishing ``version`` (empty when there is none)."""
        return ErrorFeedbackState.load(self.path(version) / "downlink-ef.npz")

    def tensors(self, version: str) -> Tensors:
        """The weights of ``version``, decoded and checked against the manifest's tensor hash."""
        if version in self._cache:
            self._cache.move_to_end(version)
            return self._cache[version]
        m = self.manifest(version)
        specs = [TensorSpec(t.name, tuple(t.shape)) for t in m.tensors]
        _, tensors = decode_model(self.weights_frame(version), expected=specs, expected_hash=m.tensor_hash)
        self._cache[version] = tensors
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return tensors

    def strategy_state(self, version: str) -> dict[str, np.ndarray]:
        """The strategy state saved with ``version`` (empty when the strategy has none)."""
        p = self.path(version) / "strategy.npz"
        if not p.exists():
            return {}
        with np.load(p) as z:
            return {k: z[k] for k in z.files}

    def artifacts_dir(self, version: str) -> Path:
        """Inference artifacts of a version (ONNX, INT8, engines), named by their manifest ``uri``."""
        return self.root / "artifacts" / version

    def artifact_bytes(self, version: str, uri: str) -> bytes:
        """An artifact the version's manifest lists, checked against its sha256."""
        entry = next((a for a in self.manifest(version).artifacts if a.uri == uri), None)
        if entry is None:
            raise KeyError(f"model {version} lists no artifact {uri!r}")
        data = (self.artifacts_dir(version) / uri).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise ValueError(f"artifact {version}/{uri} on disk does not match its manifest hash")
        return data

    def put_validation_batch(self, uri: str, data: bytes) -> None:
        """Keep the ``.npz`` of a referenced validation batch (``validation/{sha256}.npz``) for download."""
        p = self.root / uri
        if p.exists():
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".tmp-{p.name}")
        _write(tmp, data)
        os.replace(tmp, p)

    def validation_batch_bytes(self, version: str) -> bytes:
        """The ``.npz`` of the validation batch ``version``'s manifest names by reference, checked against its sha256."""
        vb = self.manifest(version).validation_batch
        if vb is None:
            raise KeyError(f"model {version} names no validation batch")
        data = (self.root / vb.uri).read_bytes()
        if hashlib.sha256(data).hexdigest() != vb.sha256:
            raise ValueError(f"validation batch of {version} on disk does not match its manifest hash")
        return data

    def remove_partial(self) -> None:
        """Clear temp folders left by a crash during ``save``."""
        for p in self.root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

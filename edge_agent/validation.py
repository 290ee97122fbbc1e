"""On-box accuracy of a newly served model and of the one before it, for the rollout's gate.

Both are measured on the labelled validation batch the manifest names (inline, or fetched once): the figures the rollout's accuracy
gate reads from the reported shadow (``val_accuracy``, ``val_accuracy_active``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from edge_agent.installer import ModelInstaller, build_from_manifest
from protocol.errors import ProtocolError
from protocol.manifest import Manifest
from protocol.validation_batch import decode_batch

log = logging.getLogger("fedscan.agent.validation")


def batch_accuracy(installer: ModelInstaller, version: str, x: np.ndarray, y: np.ndarray) -> float:
    """Return the accuracy of installed ``version`` on a labelled batch."""
    manifest = installer.manifest(version)
    model = build_from_manifest(manifest, installer.tensors(version))
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())


def validation_detail(installer: ModelInstaller, version: str, previous: str | None,
                      data: bytes | None = None) -> dict[str, object]:
    """Return the on-box accuracy figures of ``version`` for the reported shadow.

    ``data``: the downloaded ``.npz`` of a batch the manifest names by reference.

    ``{"val_accuracy", "val_accuracy_active"}`` when the manifest ships a batch (the second only
    when a previous model is installed); ``{"val_error": reason}`` when the batch is unusable.
    """
    manifest: Manifest = installer.manifest(version)
    vb = manifest.validation_batch
    if vb is None:
        return {}
    try:
        spec = manifest.input
        x, y = decode_batch(vb, channels=spec.channels, height=spec.height, width=spec.width,
                            classes=len(manifest.classes), data=data)
        out: dict[str, object] = {"val_accuracy": batch_accuracy(installer, version, x, y), "val_count": len(y)}
        if previous is not None and previous != version and installer.has(previous):
            out["val_accuracy_active"] = batch_accuracy(installer, previous, x, y)
        return out
    except ProtocolError as exc:
        log.warning("model %s: %s", version, exc)
        return {"val_error": exc.reason}
    except Exception as exc:  # a broken batch must not take the box down
        log.warning("model %s: validation batch failed: %s", version, exc)
        return {"val_error": "validation_failed"}

"""Helpers for in-process agent tests: a tiny seeded small-CNN v0, its signed manifest, the trust store."""

from __future__ import annotations

import numpy as np
import torch

from learning.models import build_model
from learning.state import get_tensors
from protocol.manifest import Architecture, InputSpec, Manifest, TensorEntry
from protocol.signing import SigningKey, TrustStore
from protocol.tensors import tensor_hash

TINY_CNN = {"in_channels": 1, "num_classes": 2, "width": 8, "norm": "group"}
FLEET_KEY = SigningKey.generate()  # the test fleet's model-signing key


def tiny_trust() -> TrustStore:
    """A trust store that trusts the test fleet's key (agents verify every model against it)."""
    trust = TrustStore()
    trust.trust(FLEET_KEY.public_raw)
    return trust


def tiny_manifest(version: str, weights: dict[str, np.ndarray], *, created_at: float | None = None,
                  key: SigningKey | None = FLEET_KEY) -> Manifest:
    """A manifest of the tiny CNN for ``weights``, signed by ``key`` (unsigned when ``None``)."""
    extra = {"created_at": created_at} if created_at is not None else {}
    manifest = Manifest(version=version, architecture=Architecture(name="small_cnn", kwargs=TINY_CNN),
                        classes=["normal", "pneumonia"], input=InputSpec(channels=1, height=28, width=28),
                        tensors=[TensorEntry(name=k, shape=v.shape) for k, v in weights.items()],
                        tensor_hash=tensor_hash(weights), **extra)
    return key.sign_manifest(manifest) if key is not None else manifest


def tiny_v0() -> tuple[Manifest, dict[str, np.ndarray]]:
    """Seeded width-8 small CNN weights and a v0 manifest describing them, signed by the fleet key."""
    torch.manual_seed(0)
    weights = get_tensors(build_model("small_cnn", **TINY_CNN))
    return tiny_manifest("v0", weights), weights

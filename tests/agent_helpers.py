"""Helpers for in-process agent tests: a tiny seeded small-CNN v0 and its manifest."""

from __future__ import annotations

import numpy as np
import torch

from learning.models import build_model
from learning.state import get_tensors
from protocol.manifest import Architecture, InputSpec, Manifest, TensorEntry
from protocol.tensors import tensor_hash

TINY_CNN = {"in_channels": 1, "num_classes": 2, "width": 8, "norm": "group"}


def tiny_v0() -> tuple[Manifest, dict[str, np.ndarray]]:
    """Seeded width-8 small CNN weights and an unsigned v0 manifest describing them."""
    torch.manual_seed(0)
    weights = get_tensors(build_model("small_cnn", **TINY_CNN))
    manifest = Manifest(version="v0", architecture=Architecture(name="small_cnn", kwargs=TINY_CNN),
                        classes=["normal", "pneumonia"], input=InputSpec(channels=1, height=28, width=28),
                        tensors=[TensorEntry(name=k, shape=v.shape) for k, v in weights.items()],
                        tensor_hash=tensor_hash(weights))
    return manifest, weights

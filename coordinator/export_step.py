"""The coordinator's export step: each accepted global model once to verified deployment artifacts.

ONNX FP32 and INT8 (calibrated on 128 validation images), and a TensorRT engine per CUDA target
of the device profile where ``tensorrt`` imports; each verified against torch on 256 other
validation images (``export.pipeline``) before it is listed in the manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from coordinator.model_spec import spec_normalize
from coordinator.rounds.settings import ModelSpec
from export.pipeline import export_model
from firmware.profile import FirmwareProfile
from learning.datasets import ArrayDataset
from learning.models import build_model
from learning.state import set_tensors
from protocol.codec import Tensors
from protocol.manifest import Artifact

Exporter = Callable[[Tensors, Path], list[Artifact]]


def exporter_for(spec: ModelSpec, data: ArrayDataset, profile: FirmwareProfile) -> Exporter:
    """The exporter of models of ``spec`` to ``profile``'s targets, calibrated and verified on ``data``."""
    order = np.random.default_rng(0).permutation(len(data))
    calib, _ = data.batch(order[:128], spec_normalize(spec))
    verify, verify_y = data.batch(order[128:384], spec_normalize(spec))
    targets = list(profile.export.targets) if profile.export else []

    def run(tensors: Tensors, out: Path) -> list[Artifact]:
        model = build_model(spec.architecture, **spec.kwargs)
        set_tensors(model, tensors)
        return export_model(model.eval(), input_spec=spec.input, calib_images=calib.numpy(),
                            verify_images=verify.numpy(), verify_labels=verify_y.numpy(), out_dir=out,
                            targets=targets, threads=1)

    return run

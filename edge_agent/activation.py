"""Engine activation: when the installer activates a verified model, choose the engine that serves it.

:class:`EngineActivator` is an installer activation listener. It collects the model's shipped
artifacts this box holds (a TensorRT engine only when built for this box's CUDA target), takes the
precision of the profile's GPU target (else its CPU target), builds the first engine of the
profile's ``engine_order`` that passes a smoke inference (``export.engines.select_engine``), swaps
it into the served model, and reports the choice (metrics and the reported shadow).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edge_agent.engine_report import EngineReport
from edge_agent.installer import ModelInstaller, build_from_manifest
from edge_agent.serving import ServedModel
from export.engines import EngineArtifacts, select_engine
from firmware.profile import FirmwareProfile
from protocol.codec import Tensors
from protocol.manifest import Manifest

DEFAULT_ENGINE_ORDER = ("ort-cpu", "torch")


class EngineActivator:
    """Serves each activated model with the best engine this box can run."""

    def __init__(self, profile: FirmwareProfile, installer: ModelInstaller, served: ServedModel, *,
                 report: EngineReport, cache_dir: Path, on_version: Callable[[str], None] | None = None) -> None:
        """Activate into ``served``; ``cache_dir`` keeps built engines; ``on_version`` hears each new version."""
        self.profile, self.installer, self.served = profile, installer, served
        self.report, self.cache_dir, self.on_version = report, cache_dir, on_version
        targets = list(profile.export.targets) if profile.export else []
        self.order = list(profile.export.engine_order) if profile.export else list(DEFAULT_ENGINE_ORDER)
        self.threads = (profile.serving.threads if profile.serving else None) or 1
        self.cpu_target = next((t for t in targets if t.device == "cpu"), None)
        self.gpu_target = next((t for t in targets if t.device == "cuda"), None)

    def artifacts(self, manifest: Manifest, tensors: Tensors) -> EngineArtifacts:
        """What this box holds to run ``manifest``'s model with."""
        gpu = self.gpu_target
        local = {a.kind: self.installer.artifact_path(manifest.version, a) for a in manifest.artifacts
                 if self.installer.has_artifact(manifest.version, a)
                 and (a.kind != "tensorrt" or (gpu is not None and a.target == gpu.name))}
        chosen = gpu or self.cpu_target
        return EngineArtifacts(onnx_fp32=local.get("onnx-fp32"), onnx_int8=local.get("onnx-int8"),
                               tensorrt_engine=local.get("tensorrt"),
                               precision=chosen.precision if chosen is not None else "fp32",
                               torch_model=build_from_manifest(manifest, tensors),
                               input_shape=(manifest.input.channels, manifest.input.height, manifest.input.width),
                               cache_dir=self.cache_dir)

    def __call__(self, manifest: Manifest, tensors: Tensors) -> None:
        """Build the engine for an activated model and serve it."""
        engine, attempts = select_engine(self.artifacts(manifest, tensors), self.order, threads=self.threads)
        self.served.swap_manifest(manifest, engine, default_preprocessing=self.profile.preprocessing)
        if self.on_version is not None:
            self.on_version(manifest.version)
        self.report.set(engine.name, {a.name: a.reason for a in attempts if not a.ok})

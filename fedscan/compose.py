"""Build a coordinator or an agent process from settings: the composition root."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.keys import ensure_signing_key
from coordinator.model_repo import ModelRepository
from coordinator.rollout import RolloutController, RolloutDriver
from coordinator.rounds import Coordinator, ModelSpec, RoundSettings
from coordinator.store import BlobStore, open_store
from coordinator.strategies import build_strategy
from edge_agent.agent import AgentSettings, EdgeAgent
from learning.calibration import expected_calibration_error, fit_temperature, softmax
from learning.datasets import ArrayDataset, load_medmnist
from learning.metrics import metrics_from_logits, predict_logits
from learning.models import build_model, model_kwargs_for
from learning.state import get_tensors, set_tensors
from protocol.codec import Tensors
from protocol.manifest import Artifact, Calibration, InputSpec, ValidationBatch
from protocol.messages import Status, TrainingConfig
from protocol.profile import FirmwareProfile
from protocol.tensors import tensor_hash
from protocol.topics import Topics
from protocol.transport import MqttTransport, TlsConfig
from protocol.validation_batch import encode_batch

log = logging.getLogger("fedscan")


def model_spec_for(profile: FirmwareProfile) -> ModelSpec:
    kwargs = model_kwargs_for(
        profile.model.architecture, in_channels=profile.input.channels, num_classes=len(profile.model.classes),
        height=profile.input.height, norm=profile.model.norm, width=profile.model.width,
    )
    return ModelSpec(
        architecture=profile.model.architecture, kwargs=kwargs, classes=list(profile.model.classes),
        input=InputSpec(channels=profile.input.channels, height=profile.input.height, width=profile.input.width),
        preprocessing=[s.model_dump() for s in profile.preprocessing],
    )


def initial_weights(spec: ModelSpec, seed: int) -> Callable[[], Tensors]:
    def make() -> Tensors:
        torch.manual_seed(seed)
        return get_tensors(build_model(spec.architecture, **spec.kwargs))

    return make


class ValidationPass:
    """The coordinator's look at a model on its validation split: one forward pass per model feeds
    both the round's metrics and the temperature the manifest ships (they used to be two passes,
    the larger part of the per-round time the agents spend waiting). The logits of the last model
    seen are kept, keyed by its tensor hash."""

    def __init__(self, spec: ModelSpec, data: ArrayDataset, prefix: str = "val_") -> None:
        if len(data) == 0:
            raise ValueError("the validation split is empty")
        self.spec, self.data, self.prefix = spec, data, prefix
        self._last: tuple[str, np.ndarray] | None = None

    def logits(self, tensors: Tensors) -> np.ndarray:
        key = tensor_hash(tensors)
        if self._last is None or self._last[0] != key:
            model = build_model(self.spec.architecture, **self.spec.kwargs)
            set_tensors(model, tensors)
            self._last = (key, predict_logits(model, self.data)[1])
        return self._last[1]

    def metrics(self, tensors: Tensors) -> dict[str, float]:
        r = metrics_from_logits(self.data.labels, self.logits(tensors))
        out = {f"{self.prefix}{k}": r[k] for k in ("accuracy", "balanced_accuracy", "auc", "loss")}
        return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}

    def calibration(self, tensors: Tensors) -> Calibration:
        """Temperature scaling fitted on the validation split, with ECE before and after."""
        logits, labels = self.logits(tensors), self.data.labels
        t = fit_temperature(logits, labels)
        return Calibration(temperature=t, fitted_on="validation",
                           ece_before=expected_calibration_error(softmax(logits), labels),
                           ece_after=expected_calibration_error(softmax(logits, t), labels))


def validation_batch_for(data: ArrayDataset, seed: int, per_class: int = 16) -> ValidationBatch:
    """A class-balanced labelled batch of model inputs from the coordinator's validation split, shipped
    in each manifest for the rollout's on-box accuracy gate."""
    rng = np.random.default_rng(seed)
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(data.labels == c))[:per_class]
                                  for c in np.unique(data.labels)]))
    x, y = data.subset(idx).to_tensor_dataset().tensors
    return encode_batch(x.numpy(), y.numpy())


def tls_config(ca: Path | None, cert: Path | None, key: Path | None) -> TlsConfig | None:
    """mTLS settings from CLI paths: all three, or none (plain TCP, for a loopback broker only)."""
    given = [p is not None for p in (ca, cert, key)]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("--tls-ca, --tls-cert and --tls-key go together")
    for p in (ca, cert, key):
        assert p is not None
        if not p.is_file():
            raise ValueError(f"TLS file {p} does not exist")
    return TlsConfig(str(ca), str(cert), str(key))


def exporter_for(spec: ModelSpec, data: ArrayDataset, profile: FirmwareProfile
                 ) -> Callable[[Tensors, Path], list[Artifact]]:
    """Export each accepted model once: ONNX FP32 and INT8 (calibrated on 128 validation images), and
    a TensorRT engine per CUDA target where ``tensorrt`` imports; each verified against torch on
    256 other validation images before it is listed in the manifest."""
    from export.pipeline import export_model

    order = np.random.default_rng(0).permutation(len(data))
    calib, _ = data.batch(order[:128])
    verify, verify_y = data.batch(order[128:384])
    targets = list(profile.export.targets) if profile.export else []

    def run(tensors: Tensors, out: Path) -> list[Artifact]:
        model = build_model(spec.architecture, **spec.kwargs)
        set_tensors(model, tensors)
        return export_model(model.eval(), input_spec=spec.input, calib_images=calib.numpy(),
                            verify_images=verify.numpy(), verify_labels=verify_y.numpy(), out_dir=out,
                            targets=targets, threads=1)

    return run


def parse_broker(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"broker address {address!r} must be HOST:PORT")
    return host, int(port)


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@dataclass
class CoordinatorConfig:
    state_dir: Path
    broker: str
    profile: FirmwareProfile
    val_data: Path | None
    rounds: int = 5
    min_clients: int = 2
    deadline_s: float = 600.0
    strategy: str = "fedavg"
    strategy_args: dict[str, Any] = field(default_factory=dict)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    codec: str = "raw"
    seed: int = 0
    fleet: str = "default"
    rollout: str = "auto"  # auto | manual: how models get served (coordinator/lifecycle.py)
    mode: str = "sync"  # sync | async (buffered: min_clients updates close a round, stale ones count less)
    max_staleness: int = 4
    tls: TlsConfig | None = None  # mutual TLS to the broker (deploy/pki, deploy/mosquitto)
    store_url: str | None = None
    threads: int | None = None
    exit_when_done: bool = False
    export: bool = True  # ONNX FP32/INT8 (+ TensorRT per CUDA target) per model, verified on validation images
    http_port: int | None = None  # dashboard + /metrics on 127.0.0.1
    http_host: str = "127.0.0.1"


def coordinator_app(store: Any, view: Any, rounds: int) -> Any:
    """The coordinator's HTTP face: fleet dashboard and Prometheus /metrics with the fleet view."""
    from fastapi import FastAPI

    from coordinator.dashboard import dashboard_router
    from coordinator.fleet_view import fleet_registry
    from edge_agent.metrics import metrics_router

    def round_info() -> dict[str, Any] | None:
        r = store.latest_round()
        if r is None:
            return None
        return {"round": r.round_id, "of": rounds, "status": r.status, "updates": len(store.list_updates(r.round_id)),
                "version": r.result_version}

    app = FastAPI(title="fedscan coordinator")
    app.include_router(metrics_router(fleet_registry(view)))
    app.include_router(dashboard_router(view, round_info=round_info))
    return app


def run_coordinator(cfg: CoordinatorConfig) -> int:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(cfg.store_url or f"sqlite:///{cfg.state_dir / 'state.db'}")
    spec = model_spec_for(cfg.profile)
    evaluator = None
    calibrator = None
    exporter = None
    vbatch = None
    if cfg.val_data is not None:
        val = load_medmnist(cfg.val_data, "val")
        validation = ValidationPass(spec, val)
        evaluator, calibrator = validation.metrics, validation.calibration
        exporter = exporter_for(spec, val, cfg.profile) if cfg.export else None
        vbatch = validation_batch_for(val, cfg.seed)
    topics = Topics(cfg.fleet)
    host, port = parse_broker(cfg.broker)
    offline = Status(state="offline", role="coordinator").to_bytes()
    transport = MqttTransport("coordinator", host, port, will=(topics.coordinator_status(), offline), tls=cfg.tls)
    transport.connect()
    coord = Coordinator(
        store=store, blobs=BlobStore(cfg.state_dir / "blobs"), repo=ModelRepository(cfg.state_dir / "models"),
        transport=transport, topics=topics, strategy=build_strategy(cfg.strategy, **cfg.strategy_args),
        settings=RoundSettings(rounds=cfg.rounds, min_clients=cfg.min_clients, deadline_s=cfg.deadline_s,
                               training=cfg.training, codec=cfg.codec, seed=cfg.seed,
                               rollout="manual" if cfg.rollout == "manual" else "auto",
                               mode="async" if cfg.mode == "async" else "sync", max_staleness=cfg.max_staleness),
        model_spec=spec, initial_tensors=initial_weights(spec, cfg.seed), evaluator=evaluator, calibrator=calibrator,
        exporter=exporter,
        signer=ensure_signing_key(cfg.state_dir), validation_batch=vbatch,
    )
    driver = RolloutDriver(RolloutController(store), transport, topics, publish_manifest=coord.publish_manifest)
    coord.report_listeners.append(driver.on_report)
    stop = threading.Event()
    _stop_on_signals(stop)
    server = None
    if cfg.http_port is not None:
        from coordinator.fleet_view import FleetView
        from fedscan.http import BackgroundServer

        view = FleetView(topics, accept=lambda agent: store.get_agent(agent) is not None)
        view.attach(transport)
        server = BackgroundServer(coordinator_app(store, view, cfg.rounds), cfg.http_host, cfg.http_port)
        server.start()
        log.info("dashboard on http://%s:%d/dashboard, metrics on /metrics", cfg.http_host, cfg.http_port)
    coord.start()
    threading.Thread(target=driver.run, args=(stop,), name="rollout-driver", daemon=True).start()
    try:
        coord.run(stop)
        if not cfg.exit_when_done and not stop.is_set():
            log.info("all %d rounds complete; serving models and fleet state until stopped", cfg.rounds)
            stop.wait()
    finally:
        if server is not None:
            server.stop()
        transport.close(graceful_payload=(topics.coordinator_status(), offline))
        store.close()
    return 0


@dataclass
class AgentConfig:
    agent_id: str
    broker: str
    profile: FirmwareProfile
    state_dir: Path
    data: Path | None = None
    indices: Path | None = None
    threads: int | None = None
    fleet: str = "default"
    tls: TlsConfig | None = None
    trust: Path | None = None  # trusted model-signing keys; None: signatures not checked (logged)
    http_port: int | None = None  # diagnosis API (FEDSCAN_API_TOKENS for bearer tokens)
    http_host: str = "127.0.0.1"
    dicom_port: int | None = None  # C-STORE listener
    dicom_aets: tuple[str, ...] = ()
    telemetry: bool = True
    resource_gates: bool = True  # off when several simulated agents share one machine (demo, tests)


def load_agent_data(data: Path | None, indices: Path | None) -> ArrayDataset | None:
    if data is None:
        return None
    ds = load_medmnist(data, "train")
    if indices is not None:
        ds = ds.subset(np.load(indices))
    return ds


@dataclass
class EdgeServices:
    """The agent's serving side: served model, local store, audit, diagnosis API, telemetry, gates."""

    served: Any
    store: Any
    metrics: Any
    gates: Any
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for close in reversed(self.closers):
            close()


def build_edge_services(cfg: AgentConfig, agent: EdgeAgent, transport: MqttTransport) -> EdgeServices:
    """Wire the diagnosis service, telemetry and resource gates around an agent (composition root)."""
    from edge_agent.audit import AuditLog
    from edge_agent.gates import GateController
    from edge_agent.metrics import AgentMetrics
    from edge_agent.serving import ServedModel
    from edge_agent.store import LocalStore
    from edge_agent.telemetry import TelemetryPublisher, TelemetrySampler, period_from_profile
    from export.engines import EngineArtifacts, select_engine

    profile = cfg.profile
    metrics = AgentMetrics()
    served = ServedModel()
    store = LocalStore(cfg.state_dir / "local-store")
    order = list(profile.export.engine_order) if profile.export else ["ort-cpu", "torch"]
    threads = (profile.serving.threads if profile.serving else None) or 1

    cpu_target = next((t for t in (profile.export.targets if profile.export else []) if t.device == "cpu"), None)
    gpu_target = next((t for t in (profile.export.targets if profile.export else []) if t.device == "cuda"), None)

    def activate(manifest: Any, tensors: Tensors) -> None:
        from edge_agent.installer import build_from_manifest

        local = {a.kind: agent.installer.artifact_path(manifest.version, a) for a in manifest.artifacts
                 if agent.installer.has_artifact(manifest.version, a)
                 and (a.kind != "tensorrt" or (gpu_target is not None and a.target == gpu_target.name))}
        chosen = gpu_target or cpu_target
        precision = chosen.precision if chosen is not None else "fp32"
        artifacts = EngineArtifacts(onnx_fp32=local.get("onnx-fp32"), onnx_int8=local.get("onnx-int8"),
                                    tensorrt_engine=local.get("tensorrt"), precision=precision,
                                    torch_model=build_from_manifest(manifest, tensors),
                                    input_shape=(manifest.input.channels, manifest.input.height, manifest.input.width),
                                    cache_dir=cfg.state_dir / "engine-cache")
        engine, attempts = select_engine(artifacts, order, threads=threads)
        served.swap_manifest(manifest, engine, default_preprocessing=profile.preprocessing)
        metrics.set_model_version(manifest.version)
        agent.engine_report = {"engine": engine.name, "skipped": {a.name: a.reason for a in attempts if not a.ok}}

    agent.installer.add_listener(activate)
    if cfg.resource_gates:
        gates = GateController.from_profile(profile, hook=agent.pause, on_change=metrics.on_gate_change)
    else:  # inference still pauses training; CPU/GPU/window limits are off
        log.warning("resource gates are off (co-located simulation): only inference requests pause training")
        gates = GateController(None, None, hook=agent.pause, on_change=metrics.on_gate_change)
    gates.start()
    agent.training_observer = metrics
    svc = EdgeServices(served, store, metrics, gates, [gates.stop])
    if cfg.telemetry:
        sampler = TelemetrySampler(disk_path=str(cfg.state_dir), inference=metrics.inference_summary,
                                   training=metrics.training_summary, model_version=metrics.model_version)
        publisher = TelemetryPublisher(sampler, transport, agent.topics.telemetry(cfg.agent_id),
                                       period_s=period_from_profile(profile))
        publisher.listeners += [gates.observe, metrics.observe_resources]
        publisher.start()
        svc.closers.append(publisher.stop)
    if cfg.http_port is not None or cfg.dicom_port is not None:
        from edge_agent.api import create_app
        from edge_agent.api.settings import ApiSettings
        from edge_agent.metrics import metrics_router
        from fedscan.http import BackgroundServer

        audit = AuditLog(cfg.state_dir / "audit.jsonl")
        app = create_app(ApiSettings.from_env(), served, store, audit, accept=profile.input, serving=profile.serving,
                         on_inference_request=[gates.on_inference_request],
                         on_result=[metrics.observe_inference, gates.on_inference_done],
                         extra_routers=[metrics_router(metrics.registry)])
        if cfg.http_port is not None:
            server = BackgroundServer(app, cfg.http_host, cfg.http_port)
            server.start()
            svc.closers.append(server.stop)
            log.info("diagnosis API on http://%s:%d/v1/diagnose", cfg.http_host, cfg.http_port)
        if cfg.dicom_port is not None:
            from edge_agent.dicom_scp import DicomSCP

            scp = DicomSCP(app.state.service, allowed_calling_aets=list(cfg.dicom_aets), host=cfg.http_host,
                           port=cfg.dicom_port)
            scp.start()
            svc.closers.append(scp.stop)
    return svc


def run_agent(cfg: AgentConfig, stop: threading.Event | None = None) -> int:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    topics = Topics(cfg.fleet)
    host, port = parse_broker(cfg.broker)
    dataset = load_agent_data(cfg.data, cfg.indices)
    from protocol.signing import TrustStore

    trust = TrustStore.load(cfg.trust) if cfg.trust is not None else None
    settings = AgentSettings(cfg.agent_id, cfg.profile, cfg.state_dir, fleet=cfg.fleet, threads=cfg.threads,
                             trust=trust)
    offline = Status(state="offline", role="agent", profile=cfg.profile.name).to_bytes()
    transport = MqttTransport(cfg.agent_id, host, port, will=(topics.status(cfg.agent_id), offline), tls=cfg.tls)
    transport.connect()
    agent = EdgeAgent(settings, transport, dataset)
    services = build_edge_services(cfg, agent, transport)
    if dataset is None:
        agent.dataset_provider = lambda: _confirmed_examples(services.store, cfg.profile)
    stop = stop or threading.Event()
    _stop_on_signals(stop)
    if agent.installer.active_version is not None:
        agent.installer.activate(agent.installer.active_version)  # serve what we served before a restart
    agent.start()
    log.info("agent %s up: %s, profile %s", cfg.agent_id,
             f"{len(dataset)} local examples" if dataset is not None else "training on confirmed findings",
             cfg.profile.name)
    try:
        agent.run(stop)
    finally:
        services.close()
        transport.close(graceful_payload=(topics.status(cfg.agent_id), offline))
    return 0


def _confirmed_examples(store: Any, profile: FirmwareProfile) -> Any:
    """Clinician-confirmed studies of the local store, as model inputs (already preprocessed)."""
    from torch.utils.data import TensorDataset

    ex = store.training_examples(classes=list(profile.model.classes))
    if ex.y is None or len(ex.y) == 0:
        return None
    return TensorDataset(torch.from_numpy(ex.x), torch.from_numpy(ex.y.astype(np.int64)))

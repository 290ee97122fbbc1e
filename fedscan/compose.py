"""Build a coordinator or an agent process from settings: the composition root."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI
from torch.utils.data import TensorDataset

from coordinator.dashboard import dashboard_router
from coordinator.export_step import exporter_for
from coordinator.fleet_view import FleetView, fleet_registry
from coordinator.jobs import JobContext
from coordinator.keys import ensure_signing_key
from coordinator.model_repo import ModelRepository
from coordinator.model_spec import initial_weights, model_spec_for, spec_normalize
from coordinator.rollout import RolloutController, RolloutDriver
from coordinator.rounds import Coordinator, RoundSettings
from coordinator.rounds.settings import downlink_step_codec
from coordinator.states import RoundMode
from coordinator.store import BlobStore, open_store
from coordinator.validation_pass import ValidationPass, validation_batch_for
from edge_agent.activation import EngineActivator
from edge_agent.agent import AgentSettings, EdgeAgent
from edge_agent.api import create_app
from edge_agent.api.anomaly_routes import anomaly_router
from edge_agent.api.segment_routes import segment_router
from edge_agent.api.settings import ApiSettings
from edge_agent.audit import AuditLog
from edge_agent.dicom_scp import DicomSCP
from edge_agent.engine_report import EngineReport
from edge_agent.gates import GateController
from edge_agent.listeners import announce, bind_host
from edge_agent.metrics import AgentMetrics, metrics_router
from edge_agent.serving import ServedModel
from edge_agent.store import LocalStore
from edge_agent.telemetry import TelemetryPublisher, TelemetrySampler, period_from_profile
from edge_agent.trust import trust_for_agent
from fedscan.classify_job import load_agent_data
from fedscan.http import BackgroundServer
from fedscan.jobs import agent_trainers, anomaly_server_for, coordinator_jobs, load_job_data, segment_server_for
from firmware.profile import FirmwareProfile
from learning.data_source import DataSource
from protocol.broker_address import parse_broker_list, parse_proxy
from protocol.codec import Tensors
from protocol.manifest import Manifest
from protocol.messages import Status, TrainingConfig
from protocol.topics import Topics
from protocol.transport import MqttTransport, TlsConfig

__all__ = [  # what the CLI, benches and tests take from the composition root
    "AgentConfig", "CoordinatorConfig", "ValidationPass", "build_edge_services", "exporter_for", "initial_weights",
    "load_agent_data", "model_spec_for", "run_agent", "run_coordinator", "spec_normalize", "validation_batch_for",
]

log = logging.getLogger("fedscan")


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@dataclass
class CoordinatorConfig:
    """Everything ``fedscan coordinator`` is started with (see its options)."""
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
    chunk_bytes: int = 256 * 1024  # update chunk size, and chunks in flight per agent (RoundSettings)
    window: int = 8
    downlink_codec: str | None = None  # None: the profile's compression.downlink ("xor|zstd": exact)
    seed: int = 0
    fleet: str = "default"
    rollout: str = "auto"  # auto | manual: how models get served (coordinator/lifecycle.py)
    mode: str = "sync"  # sync | async (buffered: min_clients updates close a round, stale ones count less)
    max_staleness: int = 4
    tls: TlsConfig | None = None  # mutual TLS to the broker (deploy/pki, deploy/mosquitto)
    insecure_plaintext_mqtt: bool = False  # plain MQTT to a non-loopback broker: FEDSCAN_ENV=development only
    store_url: str | None = None
    threads: int | None = None
    exit_when_done: bool = False
    export: bool = True  # ONNX FP32/INT8 (+ TensorRT per CUDA target) per model, verified on validation images
    http_port: int | None = None  # dashboard + /metrics on 127.0.0.1
    http_host: str = "127.0.0.1"
    job: str = "classify"  # protocol.jobs.Job: what the federation trains (fedscan.jobs)
    job_options: dict[str, str] = field(default_factory=dict)  # the job's own options (--job-option KEY=VALUE)
    val_source: DataSource | None = None  # classify: what --val-data is (npz or labelled folder, learning/data_source.py)
    val_indices: Path | None = None  # .npy positions or .txt ids: the coordinator's share of --val-data
    select_metric: str | None = "val_auc"  # auto rollout serves the best validated round model; None: the latest


def coordinator_app(store: Any, view: Any, rounds: int) -> Any:
    """The coordinator's HTTP face: fleet dashboard and Prometheus /metrics with the fleet view."""
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
    """Wire and run a coordinator process until its rounds are done (or it is stopped); the exit code."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    # the job's model, aggregation step and validation (fedscan.jobs); refused before anything starts
    plan = coordinator_jobs().plan(cfg.job, JobContext(
        profile=cfg.profile, val_data=cfg.val_data, seed=cfg.seed, rounds=cfg.rounds, strategy=cfg.strategy,
        strategy_args=cfg.strategy_args, export=cfg.export, options=cfg.job_options, val_source=cfg.val_source,
        val_indices=cfg.val_indices))
    store = open_store(cfg.store_url or f"sqlite:///{cfg.state_dir / 'state.db'}")
    topics = Topics(cfg.fleet)
    brokers = parse_broker_list(cfg.broker)
    offline = Status(state="offline", role="coordinator").to_bytes()
    transport = MqttTransport("coordinator", brokers=brokers, will=(topics.coordinator_status(), offline), tls=cfg.tls,
                              allow_plaintext=cfg.insecure_plaintext_mqtt)
    transport.connect()
    coord = Coordinator(
        store=store, blobs=BlobStore(cfg.state_dir / "blobs"), repo=ModelRepository(cfg.state_dir / "models"),
        transport=transport, topics=topics, strategy=plan.strategy,
        settings=RoundSettings(rounds=cfg.rounds, min_clients=cfg.min_clients, deadline_s=cfg.deadline_s,
                               training=cfg.training, codec=cfg.codec, chunk_bytes=cfg.chunk_bytes,
                               window=cfg.window, seed=cfg.seed,
                               downlink_codec=downlink_step_codec(cfg.downlink_codec, cfg.profile, cfg.codec),
                               rollout="manual" if cfg.rollout == "manual" else "auto",
                               mode=RoundMode.ASYNC if cfg.mode == "async" else RoundMode.SYNC,
                               max_staleness=cfg.max_staleness, job=plan.job, job_params=plan.params,
                               select_metric=cfg.select_metric if plan.evaluator is not None else None),
        model_spec=plan.model_spec, initial_tensors=plan.initial_tensors, evaluator=plan.evaluator,
        calibrator=plan.calibrator, exporter=plan.exporter,
        signer=(signer := ensure_signing_key(cfg.state_dir)), validation_batch=plan.validation_batch,
    )
    driver = RolloutDriver(RolloutController(store), transport, topics, publish_manifest=coord.publish_manifest,
                           signer=signer)
    coord.report_listeners.append(driver.on_report)
    stop = threading.Event()
    _stop_on_signals(stop)
    server = None
    if cfg.http_port is not None:

        view = FleetView(topics, accept=lambda agent: store.get_agent(agent) is not None, roster=store)
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
    """Everything ``fedscan agent`` is started with (see its options)."""
    agent_id: str
    broker: str
    profile: FirmwareProfile
    state_dir: Path
    data: Path | None = None
    indices: Path | None = None  # .npy positions or .txt image ids into data: the site's share
    source: DataSource | None = None  # classify: what data is (npz, labelled folder, DICOM; learning/data_source.py)
    threads: int | None = None
    fleet: str = "default"
    tls: TlsConfig | None = None
    proxy: str | None = None  # http://host:port: reach the broker through an HTTP CONNECT proxy
    insecure_plaintext_mqtt: bool = False  # plain MQTT to a non-loopback broker: FEDSCAN_ENV=development only
    trust: Path | None = None  # trusted model-signing keys (required; see edge_agent.trust)
    insecure_unsigned_models: bool = False  # no trust store: FEDSCAN_ENV=development only
    http_port: int | None = None  # diagnosis API (FEDSCAN_API_TOKENS for bearer tokens)
    http_host: str = "127.0.0.1"  # bind address of the diagnosis API (edge_agent/listeners.py)
    dicom_port: int | None = None  # C-STORE listener
    dicom_host: str = "127.0.0.1"  # bind address of the DICOM listener: the scanners' network, not the API's
    dicom_aets: tuple[str, ...] = ()
    telemetry: bool = True
    resource_gates: bool = True  # off when several simulated agents share one machine (demo, tests)


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


def build_edge_services(cfg: AgentConfig, agent: EdgeAgent, transport: MqttTransport, *, metrics: AgentMetrics,
                        store: LocalStore) -> EdgeServices:
    """Wire the diagnosis service, telemetry and resource gates around an agent (composition root)."""
    profile = cfg.profile
    served = ServedModel()
    activator = EngineActivator(profile, agent.installer, served, report=agent.engine_report,
                                cache_dir=cfg.state_dir / "engine-cache", on_version=metrics.set_model_version)
    segmenter = segment_server_for(profile, cfg.state_dir)  # the segment job's /v1/segment model, or None
    detector = anomaly_server_for(profile, cfg.state_dir, lambda: agent.dataset)  # /v1/anomaly model, or None

    def activate(manifest: Manifest, tensors: Tensors) -> None:
        taken = (segmenter is not None and segmenter.activate(manifest, tensors)) or (
            detector is not None and detector.activate(manifest, tensors))
        if taken:  # torch, with the site's own local tensors
            metrics.set_model_version(manifest.version)
            agent.engine_report.set("torch", {})
            return
        activator(manifest, tensors)

    agent.installer.add_listener(activate)
    if cfg.resource_gates:
        gates = GateController.from_profile(profile, hook=agent.pause, on_change=metrics.on_gate_change)
    else:  # inference still pauses training; CPU/GPU/window limits are off
        log.warning("resource gates are off (co-located simulation): only inference requests pause training")
        gates = GateController(None, None, hook=agent.pause, on_change=metrics.on_gate_change)
    gates.start()
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

        audit = AuditLog(cfg.state_dir / "audit.jsonl")
        app = create_app(ApiSettings.from_env(), served, store, audit, accept=profile.input, serving=profile.serving,
                         on_inference_request=[gates.on_inference_request],
                         on_result=[metrics.observe_inference, gates.on_inference_done],
                         extra_routers=[metrics_router(metrics.registry), anomaly_router(detector, profile.input,
                                                                                          job=profile.job)] + (
                             [segment_router(segmenter, profile.input)] if segmenter is not None else []),
                         job=profile.job)
        if cfg.http_port is not None:
            server = BackgroundServer(app, cfg.http_host, cfg.http_port)
            server.start()
            svc.closers.append(server.stop)
            announce("diagnosis API (/v1/diagnose)", cfg.http_host, cfg.http_port)
        if cfg.dicom_port is not None:

            scp = DicomSCP(app.state.service, allowed_calling_aets=list(cfg.dicom_aets), host=cfg.dicom_host,
                           port=cfg.dicom_port)
            announce(f"DICOM listener (AE {scp.ae.ae_title})", cfg.dicom_host, scp.start())
            svc.closers.append(scp.stop)
    return svc


def run_agent(cfg: AgentConfig, stop: threading.Event | None = None) -> int:
    """Wire and run an edge agent process until it is stopped; the exit code."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    topics = Topics(cfg.fleet)
    brokers = parse_broker_list(cfg.broker)
    proxy = parse_proxy(cfg.proxy) if cfg.proxy else None
    dataset = load_job_data(cfg.profile, cfg.data, cfg.indices, site=cfg.agent_id, source=cfg.source)
    bind_host(cfg.http_host, "HTTP API")  # a typo stops the start (exit 2), not the first scanner
    bind_host(cfg.dicom_host, "DICOM listener")
    trust = trust_for_agent(cfg.trust, insecure_unsigned_models=cfg.insecure_unsigned_models,
                            environment=os.environ.get("FEDSCAN_ENV", "production"))
    settings = AgentSettings(cfg.agent_id, cfg.profile, cfg.state_dir, fleet=cfg.fleet, threads=cfg.threads,
                             trust=trust, insecure_unsigned_models=trust is None)
    offline = Status(state="offline", role="agent", profile=cfg.profile.name).to_bytes()
    transport = MqttTransport(cfg.agent_id, brokers=brokers, proxy=proxy, will=(topics.status(cfg.agent_id), offline),
                              tls=cfg.tls, allow_plaintext=cfg.insecure_plaintext_mqtt)
    transport.connect()
    metrics, store = AgentMetrics(), LocalStore(cfg.state_dir / "local-store")
    provider = (lambda: _confirmed_examples(store, cfg.profile)) if dataset is None else None
    agent = EdgeAgent(settings, transport, dataset, dataset_provider=provider, training_observer=metrics,
                      engine_report=EngineReport(), jobs=agent_trainers())
    services = build_edge_services(cfg, agent, transport, metrics=metrics, store=store)
    stop = stop or threading.Event()
    _stop_on_signals(stop)
    agent.start()  # serves what it served before a restart, verified against today's trust store
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
    ex = store.training_examples(classes=list(profile.model.classes))
    if ex.y is None or len(ex.y) == 0:
        return None
    return TensorDataset(torch.from_numpy(ex.x), torch.from_numpy(ex.y.astype(np.int64)))

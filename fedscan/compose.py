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
from learning.datasets import ArrayDataset, load_medmnist
from learning.metrics import evaluate
from learning.models import build_model, model_kwargs_for
from learning.state import get_tensors, set_tensors
from protocol.codec import Tensors
from protocol.manifest import InputSpec
from protocol.messages import Status, TrainingConfig
from protocol.profile import FirmwareProfile
from protocol.topics import Topics
from protocol.transport import MqttTransport

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


def evaluator_for(spec: ModelSpec, data: ArrayDataset, prefix: str = "val_") -> Callable[[Tensors], dict[str, float]]:
    def run(tensors: Tensors) -> dict[str, float]:
        model = build_model(spec.architecture, **spec.kwargs)
        set_tensors(model, tensors)
        r = evaluate(model, data)
        out = {f"{prefix}{k}": r[k] for k in ("accuracy", "balanced_accuracy", "auc", "loss")}
        return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}

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
    store_url: str | None = None
    threads: int | None = None
    exit_when_done: bool = False


def run_coordinator(cfg: CoordinatorConfig) -> int:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(cfg.store_url or f"sqlite:///{cfg.state_dir / 'state.db'}")
    spec = model_spec_for(cfg.profile)
    evaluator = None
    if cfg.val_data is not None:
        evaluator = evaluator_for(spec, load_medmnist(cfg.val_data, "val"))
    topics = Topics(cfg.fleet)
    host, port = parse_broker(cfg.broker)
    offline = Status(state="offline", role="coordinator").to_bytes()
    transport = MqttTransport("coordinator", host, port, will=(topics.coordinator_status(), offline))
    transport.connect()
    coord = Coordinator(
        store=store, blobs=BlobStore(cfg.state_dir / "blobs"), repo=ModelRepository(cfg.state_dir / "models"),
        transport=transport, topics=topics, strategy=build_strategy(cfg.strategy, **cfg.strategy_args),
        settings=RoundSettings(rounds=cfg.rounds, min_clients=cfg.min_clients, deadline_s=cfg.deadline_s,
                               training=cfg.training, codec=cfg.codec, seed=cfg.seed,
                               rollout="manual" if cfg.rollout == "manual" else "auto"),
        model_spec=spec, initial_tensors=initial_weights(spec, cfg.seed), evaluator=evaluator,
        signer=ensure_signing_key(cfg.state_dir),
    )
    driver = RolloutDriver(RolloutController(store), transport, topics, publish_manifest=coord.publish_manifest)
    coord.report_listeners.append(driver.on_report)
    stop = threading.Event()
    _stop_on_signals(stop)
    coord.start()
    threading.Thread(target=driver.run, args=(stop,), name="rollout-driver", daemon=True).start()
    try:
        coord.run(stop)
        if not cfg.exit_when_done and not stop.is_set():
            log.info("all %d rounds complete; serving models and fleet state until stopped", cfg.rounds)
            stop.wait()
    finally:
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
    trust: Path | None = None  # trusted model-signing keys; None: signatures not checked (logged)


def load_agent_data(data: Path | None, indices: Path | None) -> ArrayDataset | None:
    if data is None:
        return None
    ds = load_medmnist(data, "train")
    if indices is not None:
        ds = ds.subset(np.load(indices))
    return ds


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
    transport = MqttTransport(cfg.agent_id, host, port, will=(topics.status(cfg.agent_id), offline))
    transport.connect()
    agent = EdgeAgent(settings, transport, dataset)
    stop = stop or threading.Event()
    _stop_on_signals(stop)
    agent.start()
    log.info("agent %s up: %d local examples, profile %s", cfg.agent_id, len(dataset) if dataset else 0,
             cfg.profile.name)
    try:
        agent.run(stop)
    finally:
        transport.close(graceful_payload=(topics.status(cfg.agent_id), offline))
    return 0

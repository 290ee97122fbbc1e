"""An agent killed in the middle of a model download never activates (or keeps) a partial model;
restarted, it finishes the rollout. Coordinator, driver and agent in one process over the
in-memory broker; the broker drops the last chunk of every model download while "broken"."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from coordinator.model_repo import ModelRepository
from coordinator.rollout import GateConfig, RolloutController, RolloutDriver
from coordinator.rounds import Coordinator, RoundSettings
from coordinator.store import BlobStore, open_store
from coordinator.strategies import build_strategy
from edge_agent.agent import AgentSettings, EdgeAgent
from fedscan.compose import initial_weights, model_spec_for
from firmware.profile import find_profile
from protocol.chunks import parse_chunk
from protocol.signing import SigningKey, TrustStore
from protocol.topics import Topics
from protocol.transport import MemoryBroker, MemoryTransport


class LossyBroker(MemoryBroker):
    def __init__(self) -> None:
        super().__init__()
        self.broken = True
        self.dropped = 0
        self.delivered_chunks = 0

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if topic.endswith("/downloads"):
            h = parse_chunk(payload).header
            if self.broken and h.index == h.count - 1:
                self.dropped += 1
                return
            self.delivered_chunks += 1
        super().publish(topic, payload, retain=retain)


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_agent_killed_mid_download_never_activates_a_partial_model(tmp_path: Path) -> None:
    profile = find_profile("xray-cxr-28")
    spec = model_spec_for(profile)
    v0 = initial_weights(spec, 0)()
    key = SigningKey.generate()
    trust = TrustStore()
    trust.trust(key.public_raw)
    broker, topics = LossyBroker(), Topics()
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    store.enroll_agent("box", profile.name, [])
    ct = MemoryTransport(broker, "coordinator")
    ct.connect()
    repo = ModelRepository(tmp_path / "models")
    coord = Coordinator(store=store, blobs=BlobStore(tmp_path / "blobs"), repo=repo, transport=ct, topics=topics,
                        strategy=build_strategy("fedavg"),
                        settings=RoundSettings(rounds=0, rollout="manual", chunk_bytes=4096), model_spec=spec,
                        initial_tensors=lambda: v0, signer=key)
    controller = RolloutController(store, trust=trust)
    driver = RolloutDriver(controller, ct, topics, period_s=0.1, publish_manifest=coord.publish_manifest)
    coord.report_listeners.append(driver.on_report)
    stop_coord = threading.Event()
    state = tmp_path / "box"

    def start_agent() -> tuple[threading.Event, threading.Thread, MemoryTransport]:
        t = MemoryTransport(broker, "box")
        t.connect()
        agent = EdgeAgent(AgentSettings("box", profile, state, trust=trust, model_timeout_s=0.5), t, None)
        agent.start()
        stop = threading.Event()
        th = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        th.start()
        return stop, th, t

    coord.start()
    dth = threading.Thread(target=driver.run, args=(stop_coord,), daemon=True)
    dth.start()
    try:
        broker.broken = False
        stop, th, t = start_agent()
        _wait(lambda: store.get_agent("box").reported_version == "v0", 30, "v0")  # type: ignore[union-attr]
        broker.broken = True
        # v1 differs from v0 everywhere: the delta download has many chunks
        v1 = {k: (v + np.float32(0.01)).astype(np.float32) for k, v in v0.items()}
        m = coord.publisher.manifest_for("v1", "v0", None, v1, {}, [])
        repo.save(m, v1, {})
        store.add_model(version="v1", parent="v0", round_id=None, manifest=m.model_dump(mode="json"), participants=[])
        controller.approve("v1")
        controller.start("v1", gates=GateConfig(soak_s=0, stage_timeout_s=120))
        _wait(lambda: broker.dropped >= 2 and broker.delivered_chunks > 4, 30, "a partial download, asked twice")
        # kill the agent mid-download (abnormal disconnect: Last Will, no goodbye)
        t.crash()
        stop.set()
        th.join(5)
        assert not (state / "models" / "v1").exists(), "nothing of the partial model is on disk"
        assert json.loads((state / "models" / "ACTIVE").read_text())["active"] == "v0"
        assert store.get_agent("box").reported_version == "v0"  # type: ignore[union-attr]
        # back with a working network: the same box finishes the download and the rollout completes
        broker.broken = False
        stop, th, t = start_agent()
        _wait(lambda: controller.get(None).state == "complete", 30, "rollout complete")
        _wait(lambda: store.get_agent("box").reported_version == "v1", 30, "v1 served")  # type: ignore[union-attr]
        assert json.loads((state / "models" / "ACTIVE").read_text()) == {"active": "v1", "previous": "v0"}
        stop.set()
        th.join(5)
    finally:
        stop_coord.set()
        dth.join(5)
        store.close()

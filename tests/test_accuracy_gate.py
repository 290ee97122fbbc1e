"""The on-box accuracy gate: a model that predicts one constant class is stopped at the canary
stage and rolled back by itself; no agent outside the canary ever serves it; a sound model passes.

Coordinator, rollout driver and three edge agents run in one process over the in-memory broker
(the process-level paths are covered by tests/test_rollout_mqtt.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.model_repo import ModelRepository
from coordinator.rollout import GateConfig, RolloutController, RolloutDriver
from coordinator.rounds import Coordinator, RoundSettings
from coordinator.store import BlobStore, open_store
from coordinator.strategies import build_strategy
from edge_agent.agent import AgentSettings, EdgeAgent
from edge_agent.installer import build_from_manifest
from fedscan.compose import initial_weights, model_spec_for
from firmware.profile import find_profile
from protocol.codec import Tensors
from protocol.errors import ManifestError
from protocol.messages import Shadow, parse_message
from protocol.signing import SigningKey, TrustStore
from protocol.topics import Topics
from protocol.transport import MemoryBroker, MemoryTransport
from protocol.validation_batch import decode_batch, encode_batch

AGENTS = ["box-a", "box-b", "box-c"]


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_validation_batch_round_trip_and_refusals() -> None:
    x = np.random.default_rng(0).normal(size=(8, 1, 28, 28)).astype(np.float32)
    y = np.array([0, 1] * 4)
    vb = encode_batch(x, y)
    x2, y2 = decode_batch(vb, channels=1, height=28, width=28, classes=2)
    assert np.allclose(x2, x, atol=1e-2) and (y2 == y).all()
    for bad, kw in [(vb.model_copy(update={"sha256": "0" * 64}), {}),
                    (vb.model_copy(update={"uri": "https://example.org/batch.npz"}), {}),
                    (vb, {"channels": 3}), (vb, {"classes": 1})]:
        args = {"channels": 1, "height": 28, "width": 28, "classes": 2, **kw}
        with pytest.raises(ManifestError) as info:
            decode_batch(bad, **args)  # type: ignore[arg-type]
        assert info.value.reason == "bad_validation_batch"
    with pytest.raises(ValueError):
        encode_batch(x[:, 0], y)


def _constant(tensors: Tensors, cls: int) -> Tensors:
    """The same network with its classifier rewired to answer ``cls`` whatever the input."""
    out = {k: v.copy() for k, v in tensors.items()}
    bias = [k for k, v in out.items() if k.endswith("bias") and v.shape == (2,)][-1]
    weight = bias[: -len("bias")] + "weight"
    out[weight][...] = 0
    out[bias][...] = -10
    out[bias][cls] = 10
    return out


def test_constant_class_model_is_stopped_at_the_canary(tmp_path: Path) -> None:
    profile = find_profile("xray-cxr-28")
    spec = model_spec_for(profile)
    v0 = initial_weights(spec, 0)()
    # a labelled batch on which v0 is right (labels = v0's answers); the constant model answers the rarer class
    x = np.random.default_rng(1).normal(size=(32, 1, 28, 28)).astype(np.float32) * 3
    model = build_from_manifest_like(spec, v0)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    rare = int(np.argmin(np.bincount(y, minlength=2)))
    key = SigningKey.generate()
    trust = TrustStore()
    trust.trust(key.public_raw)

    broker, topics = MemoryBroker(), Topics()
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    for a in AGENTS:
        store.enroll_agent(a, profile.name, ["eu"])
    ctransport = MemoryTransport(broker, "coordinator")
    ctransport.connect()
    repo = ModelRepository(tmp_path / "models")
    coord = Coordinator(store=store, blobs=BlobStore(tmp_path / "blobs"), repo=repo, transport=ctransport,
                        topics=topics, strategy=build_strategy("fedavg"),
                        settings=RoundSettings(rounds=0, rollout="manual"), model_spec=spec,
                        initial_tensors=lambda: v0, signer=key, validation_batch=encode_batch(x, y))
    controller = RolloutController(store, trust=trust)
    driver = RolloutDriver(controller, ctransport, topics, period_s=0.1, publish_manifest=coord.publish_manifest,
                           signer=key)
    coord.report_listeners.append(driver.on_report)
    stop = threading.Event()
    threads = []
    try:
        coord.start()
        threads.append(threading.Thread(target=driver.run, args=(stop,), daemon=True))
        for a in AGENTS:
            t = MemoryTransport(broker, a)
            t.connect()
            agent = EdgeAgent(AgentSettings(a, profile, tmp_path / a, trust=trust, model_timeout_s=10), t, None)
            agent.start()
            threads.append(threading.Thread(target=agent.run, args=(stop,), daemon=True))
        for th in threads:
            th.start()
        _wait(lambda: all(r.reported_version == "v0" for r in store.list_agents()), 30, "agents on v0")

        def register(version: str, tensors: Tensors) -> None:
            m = coord.publisher.manifest_for(version, "v0", None, tensors, {}, [])
            repo.save(m, tensors, {})
            store.add_model(version=version, parent="v0", round_id=None, manifest=m.model_dump(mode="json"),
                            participants=[])
            controller.approve(version)

        register("v1", _constant(v0, rare))
        r = controller.start("v1", tags=["eu"], stages=[5, 100], gates=GateConfig(soak_s=0.5, accuracy_margin=0.05))
        canary = r.agents[0]
        assert r.stages == [1, 3]
        _wait(lambda: controller.get(r.rollout_id).state == "rolled_back", 30, "automatic rollback")
        done = controller.get(r.rollout_id)
        assert done.reason == "accuracy" and done.detail is not None and done.detail["agent"] == canary
        assert done.detail["val_accuracy"] <= 0.5 and done.detail["val_accuracy_active"] == 1.0
        assert store.get_model("v1").state == "retired"  # type: ignore[union-attr]
        _wait(lambda: all(a.reported_version == "v0" for a in store.list_agents()), 30, "canary back on v0")

        def told_to_serve(version: str) -> set[str]:
            return {topics.parse(t).agent or "" for t, p in broker.log
                    if t.endswith("/shadow/desired") and parse_message(Shadow, p).version == version}

        def served(version: str) -> set[str]:
            return {topics.parse(t).agent or "" for t, p in broker.log
                    if t.endswith("/shadow/reported") and parse_message(Shadow, p).version == version}

        assert told_to_serve("v1") == served("v1") == {canary}, "no agent outside the canary ever serves v1"

        # a sound model (same answers as v0) passes the same gate and reaches everyone
        register("v2", {k: v * np.float32(1.0001) for k, v in v0.items()})
        r2 = controller.start("v2", tags=["eu"], stages=[5, 100], gates=GateConfig(soak_s=0.5, accuracy_margin=0.05))
        _wait(lambda: controller.get(r2.rollout_id).state == "complete", 30, "v2 rollout")
        _wait(lambda: all(a.reported_version == "v2" for a in store.list_agents()), 30, "everyone on v2")
    finally:
        stop.set()
        for th in threads:
            th.join(5)
        store.close()


def build_from_manifest_like(spec, tensors: Tensors) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    from protocol.manifest import Architecture, Manifest, TensorEntry
    from protocol.tensors import tensor_hash

    m = Manifest(version="probe", architecture=Architecture(name=spec.architecture, kwargs=spec.kwargs),
                 classes=spec.classes, input=spec.input,
                 tensors=[TensorEntry(name=k, shape=tuple(v.shape)) for k, v in tensors.items()],
                 tensor_hash=tensor_hash(tensors))
    return build_from_manifest(m, tensors)

"""The compressed downlink end to end (issue 19 item 7): coordinator and edge agents in one process
over the in-memory broker, rounds with a step codec.

* boxes that hold the parent take each version from the one broadcast and ask for no weights;
  what they install is bit for bit the coordinator's version;
* a broadcast step that does not rebuild to the manifest's hash is refused, reported, and the
  version is fetched whole;
* a box that missed rounds (holds an older version) gets an exact XOR delta from what it holds; a
  box that holds nothing gets the whole model;
* artifacts come as patches against the served version's, only those the profile can use; the
  validation batch once per hash.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from coordinator.model_repo import ModelRepository
from coordinator.rounds import Coordinator, RoundSettings
from coordinator.store import BlobStore, open_store
from coordinator.strategies import build_strategy
from edge_agent.agent import AgentSettings, EdgeAgent
from fedscan.compose import initial_weights, model_spec_for
from firmware.profile import find_profile
from learning.datasets import make_synthetic
from protocol.chunks import parse_chunk, split
from protocol.codec import ErrorFeedbackState, Tensors
from protocol.frame import encode_model_step
from protocol.manifest import Artifact
from protocol.messages import AgentEvent, ModelRequest, Shadow, TrainingConfig, parse_message
from protocol.signing import SigningKey, TrustStore
from protocol.topics import Topics
from protocol.transport import MemoryBroker, MemoryTransport
from protocol.validation_batch import encode_batch

STEP = "delta|topk:0.05|q:4|ef|zstd"
PROFILE = find_profile("xray-cxr-28")  # engine order with ort-cpu, one fp32 target: ONNX FP32 only


class Broker(MemoryBroker):
    """Records every model request and event; forges the broadcast step of one version."""

    def __init__(self, topics: Topics) -> None:
        super().__init__()
        self.topics = topics
        self.requests: list[tuple[str, ModelRequest]] = []
        self.events: list[tuple[str, AgentEvent]] = []
        self.reports: list[tuple[str, Shadow]] = []
        self.forge: dict[str, Callable[[], bytes]] = {}  # version -> a forged step frame

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        p = self.topics.parse(topic)
        if topic.endswith("/models/request"):
            self.requests.append((p.agent or "", parse_message(ModelRequest, payload)))
        elif topic.endswith("/events"):
            self.events.append((p.agent or "", parse_message(AgentEvent, payload)))
        elif topic.endswith("/shadow/reported"):
            self.reports.append((p.agent or "", parse_message(Shadow, payload)))
        elif topic.endswith("/chunks") and p.version in self.forge:
            tid = parse_chunk(payload).header.transfer_id
            for c in split(self.forge.pop(p.version)(), tid, 1 << 20):
                super().publish(topic, c, retain=retain)
            return
        super().publish(topic, payload, retain=retain)

    def weight_requests(self, agent: str) -> list[tuple[str, str | None]]:
        return [(r.version, r.have) for a, r in self.requests if a == agent and r.artifact is None]


def fake_exporter(tensors: Tensors, out: Path) -> list[Artifact]:
    """An "ONNX" file that changes where the weights change (as a real export does), and an INT8 one."""
    out.mkdir(parents=True, exist_ok=True)
    arts = []
    for kind, uri, data in [("onnx-fp32", "model.fp32.onnx", b"graph" * 2000 + b"".join(v.tobytes()
                                                                                       for v in tensors.values())),
                            ("onnx-int8", "model.int8.onnx", b"int8" * 100)]:
        (out / uri).write_bytes(data)
        arts.append(Artifact(kind=kind, uri=uri, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))  # type: ignore[arg-type]
    return arts


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_broadcast_steps_missed_rounds_and_fallbacks(tmp_path: Path) -> None:
    spec = model_spec_for(PROFILE)
    key = SigningKey.generate()
    trust = TrustStore()
    trust.trust(key.public_raw)
    topics = Topics()
    broker = Broker(topics)
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    boxes = ["box-a", "box-b", "box-c", "box-d"]
    for b in boxes:
        store.enroll_agent(b, PROFILE.name, [])
    repo = ModelRepository(tmp_path / "models")
    x = np.random.default_rng(0).normal(size=(8, 1, 28, 28)).astype(np.float32)
    vbatch = encode_batch(x, np.array([0, 1] * 4))
    training = TrainingConfig(local_epochs=1, batch_size=16, lr=0.01)
    stop_all = threading.Event()
    threads: list[threading.Thread] = []
    agents: dict[str, tuple[threading.Event, MemoryTransport, EdgeAgent]] = {}

    def coordinator(rounds: int) -> tuple[Coordinator, threading.Event]:
        """A coordinator over the shared store and repository (the second one is a restart)."""
        t = MemoryTransport(broker, "coordinator")
        t.connect()
        c = Coordinator(store=store, blobs=BlobStore(tmp_path / "blobs"), repo=repo, transport=t, topics=topics,
                        strategy=build_strategy("fedavg"),
                        settings=RoundSettings(rounds=rounds, min_clients=2, deadline_s=120, reannounce_s=1.0,
                                               training=training, downlink_codec=STEP, chunk_bytes=8192),
                        model_spec=spec, initial_tensors=initial_weights(spec, 0), exporter=fake_exporter, signer=key,
                        validation_batch=vbatch)
        stop = threading.Event()
        c.start()
        th = threading.Thread(target=c.run, args=(stop,), daemon=True)
        th.start()
        threads.append(th)
        return c, stop

    def start(box: str, seed: int) -> None:
        t = MemoryTransport(broker, box)
        t.connect()
        a = EdgeAgent(AgentSettings(box, PROFILE, tmp_path / box, threads=1, trust=trust, model_timeout_s=5), t,
                      make_synthetic(32, seed=seed))
        a.start()
        stop = threading.Event()
        th = threading.Thread(target=a.run, args=(stop,), daemon=True)
        th.start()
        threads.append(th)
        agents[box] = (stop, t, a)

    def serving(box: str, version: str) -> bool:
        return store.get_agent(box).reported_version == version  # type: ignore[union-attr]

    def same_bits(box: str, version: str) -> None:
        mine, theirs = agents[box][2].installer.tensors(version), repo.tensors(version)
        assert all(mine[k].tobytes() == theirs[k].tobytes() for k in theirs), f"{box} {version} differs"

    try:
        _, stop1 = coordinator(rounds=1)
        for i, b in enumerate(boxes[:3]):
            start(b, i)
        _wait(lambda: all(serving(b, "v1") for b in boxes[:3]), 120, "v1 served by a, b, c")
        assert repo.step_frame("v1") is not None and len(repo.step_frame("v1") or b"") < 20_000
        # box-c goes away (no goodbye) and misses rounds 2 and 3
        agents["box-c"][0].set()
        agents["box-c"][1].crash()
        stop1.set()
        # v2's broadcast is forged: a step from v1 that rebuilds to other weights
        v1 = repo.tensors("v1")
        broker.forge["v2"] = lambda: encode_model_step({k: v + 0.01 for k, v in v1.items()}, version="v2", round_id=2,
                                                       base=v1, base_version="v1", codec=STEP,
                                                       state=ErrorFeedbackState())[0]
        _, stop2 = coordinator(rounds=3)  # a restarted coordinator resumes from the store
        _wait(lambda: all(serving(b, "v3") for b in boxes[:2]), 180, "v3 served by a and b")
        for b in boxes[:2]:
            asked = broker.weight_requests(b)
            # v0 whole at start; v2 whole after the forged step was refused; v1 and v3 from the broadcast alone
            assert ("v0", None) in asked and ("v2", None) in asked, asked
            assert not any(v in ("v1", "v3") for v, _ in asked), asked
            same_bits(b, "v1")
            same_bits(b, "v3")
            refused = [e.detail for a, e in broker.events if a == b and e.kind == "model_refused"]
            assert any(d.version == "v2" and d.reason == "hash_mismatch" for d in refused), refused
        # box-c comes back holding v1: v3's parent is v2, so it asks for v3 from v1 (exact XOR delta)
        start("box-c", 2)
        # box-d never ran: it holds nothing and gets v3 whole
        start("box-d", 3)
        _wait(lambda: serving("box-c", "v3") and serving("box-d", "v3"), 120, "v3 served by c and d")
        assert ("v3", "v1") in broker.weight_requests("box-c")
        assert broker.weight_requests("box-d") == [("v3", None)]
        same_bits("box-c", "v3")
        same_bits("box-d", "v3")
        # artifacts: ONNX FP32 only (the profile's engine order and target), as patches once one is served
        arts = [(a, r) for a, r in broker.requests if r.artifact is not None and not r.artifact.startswith("validation/")]
        assert arts and all(r.artifact == "model.fp32.onnx" for _, r in arts)
        a_arts = [(r.version, r.have) for a, r in arts if a == "box-a"]
        assert ("v0", None) in a_arts and ("v3", "v2") in a_arts, a_arts
        for b in boxes:
            inst = agents[b][2].installer
            assert all(inst.has_artifact("v3", x) for x in inst.manifest("v3").artifacts if x.kind == "onnx-fp32")
        # the validation batch, named by reference, is fetched once per agent process (box-c ran twice)
        batches = Counter(a for a, r in broker.requests if (r.artifact or "").startswith("validation/"))
        assert batches == {"box-a": 1, "box-b": 1, "box-c": 2, "box-d": 1}, batches
        v3_reports = [r for a, r in broker.reports if a == "box-a" and r.version == "v3" and r.detail is not None]
        assert v3_reports and v3_reports[-1].detail.val_count == 8  # type: ignore[union-attr]
        stop2.set()
    finally:
        stop_all.set()
        for stop, _, _ in agents.values():
            stop.set()
        for th in threads:
            th.join(5)
        store.close()

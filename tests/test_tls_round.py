"""A federated round over mutual TLS + ACLs, watched by an auditor that reads every message.

Two enrolled agents (certificates from ``coordinator.pki``, ACL from the state store) and the
coordinator run the real round loop (``coordinator.rounds``, ``edge_agent.agent``) through the
shipped broker config. An administrator certificate (read-only ``auditor`` in the ACL) subscribes
to ``#`` before anything starts and records every message. After the round:

- the round completed with both agents' updates;
- leak check: every agent's data holds *marker images* (high-entropy random 28×28 images, so a
  match cannot be chance). The auditor reassembles and decodes every update and model frame it
  saw, and shows that no payload — raw message, reassembled frame, or decoded tensor — contains
  (a) the exact bytes of any marker row (uint8 or normalised float32), or (b) a window whose
  |Pearson correlation| with a marker's 7×7 average-pooled copy (49 values) or with the full
  784-pixel marker exceeds ``THRESHOLD = 0.9``;
- the detector itself is shown to fire on a frame that does carry a marker (positive control),
  so a leak would fail this test.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from tls_broker import tls_mosquitto

from coordinator.acl import acl_from_store, write_acl
from coordinator.model_repo import ModelRepository
from coordinator.pki import FleetPKI, fingerprint
from coordinator.rounds import Coordinator, ModelSpec, RoundSettings
from coordinator.store import BlobStore, open_store
from coordinator.strategies import build_strategy
from edge_agent.agent import AgentSettings, EdgeAgent
from firmware.profile import find_profile
from learning.datasets import ArrayDataset
from learning.models import build_model, model_kwargs_for
from learning.state import get_tensors
from protocol.chunks import parse_chunk
from protocol.codec import TensorSpec
from protocol.errors import ProtocolError
from protocol.frame import decode_model, decode_update, encode_update
from protocol.manifest import InputSpec, parse_manifest
from protocol.messages import Status, TrainingConfig
from protocol.reassembly import Reassembler
from protocol.signing import SigningKey, TrustStore
from protocol.topics import Kind, Topics
from protocol.transport import MqttTransport, TlsConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FLEET = "lab"
AGENTS = ("site-a", "site-b")
THRESHOLD = 0.9
MARKERS_PER_AGENT = 4


# -- leak detector ---------------------------------------------------------------------------------
def max_abs_window_corr(x: np.ndarray, pattern: np.ndarray) -> float:
    """max over every contiguous window w of ``x`` (len = len(pattern)) of |corr(w, pattern)|."""
    x = np.asarray(x, dtype=np.float64).ravel()
    x = np.where(np.isfinite(x), x, 0.0)
    n = pattern.size
    if x.size < n:
        return 0.0
    p = pattern.astype(np.float64).ravel() - pattern.mean()
    p /= np.linalg.norm(p)
    num = sliding_window_view(x, n) @ p  # centred p: the window mean drops out
    c1 = np.concatenate([[0.0], np.cumsum(x)])
    c2 = np.concatenate([[0.0], np.cumsum(x * x)])
    s1, s2 = c1[n:] - c1[:-n], c2[n:] - c2[:-n]
    var = s2 - s1 * s1 / n
    ok = var > 1e-12 * np.maximum(s2, 1e-300)
    if not ok.any():
        return 0.0
    return float(np.max(np.abs(num[ok]) / np.sqrt(var[ok])))


def pool7(img: np.ndarray) -> np.ndarray:
    return img.reshape(7, 4, 7, 4).astype(np.float64).mean(axis=(1, 3))


class LeakDetector:
    def __init__(self, markers: np.ndarray) -> None:
        self.markers = markers
        self.normalized = ((markers.astype(np.float32) / 255.0) - 0.5) / 0.25
        self.needles: list[bytes] = []
        for m, f in zip(markers, self.normalized, strict=True):
            self.needles += [row.tobytes() for row in m] + [row.astype(np.float32).tobytes() for row in f]
        self.patterns = [pool7(m) for m in markers] + [m.astype(np.float64) for m in markers]

    def exact(self, blob: bytes) -> bool:
        return any(n in blob for n in self.needles)

    def correlation(self, values: np.ndarray) -> float:
        return max(max_abs_window_corr(values, p) for p in self.patterns)


# -- fixtures ------------------------------------------------------------------------------------------
def _data(agent_index: int, rng: np.random.Generator) -> tuple[ArrayDataset, np.ndarray]:
    n = 48
    labels = rng.integers(0, 2, n)
    yy, xx = np.mgrid[0:28, 0:28]
    blob = np.exp(-((yy - 14) ** 2 + (xx - 14) ** 2) / 60.0)
    images = np.clip(90 + 60 * blob[None] * (labels[:, None, None] * 2 - 1) + rng.normal(0, 20, (n, 28, 28)), 0, 255)
    images = images.astype(np.uint8)
    markers = rng.integers(0, 256, (MARKERS_PER_AGENT, 28, 28), dtype=np.uint8)
    images[:MARKERS_PER_AGENT] = markers  # plant the markers in this site's training data
    return ArrayDataset(images, labels, ["normal", "pneumonia"]), markers


class Auditor:
    """Read-only administrator: subscribes to ``#`` over mTLS and keeps every message."""

    def __init__(self, port: int, pki: FleetPKI) -> None:
        p = pki.paths("auditor")
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="auditor", protocol=mqtt.MQTTv311)
        self.client.tls_set(ca_certs=str(p.ca), certfile=str(p.cert), keyfile=str(p.key))
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, pr: c.subscribe("#", qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(5), "auditor could not subscribe"

    def all(self) -> list[tuple[str, bytes]]:
        out = []
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _decode_everything(msgs: list[tuple[str, bytes]], topics: Topics) -> dict[str, Any]:
    """Reassemble and decode every update and model frame in ``msgs``."""
    manifests = {}
    for topic, payload in msgs:
        parsed = topics.parse(topic)
        if parsed.kind is Kind.MODEL_MANIFEST and payload:
            manifests[parsed.version] = parse_manifest(payload)
    asm = Reassembler()
    frames: dict[str, bytes] = {}
    for topic, payload in msgs:
        parsed_topic = topics.parse(topic)
        if parsed_topic.kind in (Kind.UPDATES, Kind.DOWNLOADS, Kind.MODEL_CHUNKS):
            r = asm.add(parsed_topic.agent or "coordinator", parse_chunk(payload))
            if r.complete:
                frames[r.transfer_id] = r.blob()
    models: dict[str, dict[str, np.ndarray]] = {}
    updates: dict[str, dict[str, np.ndarray]] = {}
    pending = {tid: f for tid, f in frames.items() if tid.startswith("model-")}
    for _ in range(len(pending) + 1):  # full frames first, then deltas whose base is decoded
        for tid, frame in list(pending.items()):
            version = tid.split("-")[1]
            m = manifests[version]
            base_version = tid.split("-from-")[1]
            base = models.get(base_version) if base_version != "none" else None
            if base_version != "none" and base is None:
                continue
            specs = [TensorSpec(t.name, tuple(t.shape)) for t in m.tensors]
            _h, models[version] = decode_model(frame, expected=specs, expected_hash=m.tensor_hash, base=base)
            del pending[tid]
    for tid, frame in frames.items():
        if tid.startswith("model-"):
            continue
        any_manifest = next(iter(manifests.values()))
        specs = [TensorSpec(t.name, tuple(t.shape)) for t in any_manifest.tensors]
        dec = decode_update(frame, expected=specs, base=models.get("v0"))
        updates[dec.header.agent_id] = dec.tensors
    return {"frames": frames, "models": models, "updates": updates, "manifests": manifests}


def _leaks(detector: LeakDetector, msgs: list[tuple[str, bytes]], decoded: dict[str, Any]) -> dict[str, float]:
    worst: dict[str, float] = defaultdict(float)
    blobs = [p for _t, p in msgs] + list(decoded["frames"].values())
    worst["exact"] = float(any(detector.exact(b) for b in blobs))
    for b in blobs:  # raw bytes as pixel values
        worst["raw_corr"] = max(worst["raw_corr"], detector.correlation(np.frombuffer(b, np.uint8)))
    for group in ("updates", "models"):
        for tensors in decoded[group].values():
            for t in tensors.values():
                worst[f"{group}_corr"] = max(worst[f"{group}_corr"], detector.correlation(t))
                worst["exact"] = max(worst["exact"], float(detector.exact(t.tobytes())))
    return dict(worst)


# -- the test ----------------------------------------------------------------------------------------------
def test_round_over_mtls_and_no_training_image_leaves_a_site(tmp_path: Path) -> None:
    topics = Topics(FLEET)
    pki = FleetPKI.init(tmp_path / "pki", FLEET)
    pki.issue_server("broker")
    pki.issue_coordinator()
    pki.issue("auditor", "admin")
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    for a in AGENTS:
        store.enroll_agent(a, profile="xray-cxr-28", tags=[], cert_fingerprint=fingerprint(pki.issue_device(a).cert))
    acl = write_acl(tmp_path / "acl", acl_from_store(store, FLEET, observers=["auditor"]))

    profile = find_profile("xray-cxr-28")
    kwargs = model_kwargs_for(profile.model.architecture, in_channels=1, num_classes=2, height=28,
                              norm=profile.model.norm, width=8)
    spec = ModelSpec(architecture=profile.model.architecture, kwargs=kwargs, classes=list(profile.model.classes),
                     input=InputSpec(channels=1, height=28, width=28),
                     preprocessing=[s.model_dump() for s in profile.preprocessing])

    def initial() -> dict[str, np.ndarray]:
        torch.manual_seed(0)
        return get_tensors(build_model(spec.architecture, **spec.kwargs))

    rng = np.random.default_rng(42)
    datasets, markers = zip(*[_data(i, rng) for i in range(len(AGENTS))], strict=True)
    detector = LeakDetector(np.concatenate(markers))

    def tls(name: str) -> TlsConfig:
        p = pki.paths(name)
        return TlsConfig(ca_file=str(p.ca), cert_file=str(p.cert), key_file=str(p.key))

    key = SigningKey.generate()  # agents verify every model against the fleet's key
    trust = TrustStore()
    trust.trust(key.public_raw)
    with tls_mosquitto(tmp_path, pki.root, acl) as broker:
        auditor = Auditor(broker.port, pki)
        offline = Status(state="offline", role="coordinator").to_bytes()
        ct = MqttTransport("coordinator", "127.0.0.1", broker.port, tls=tls("coordinator"),
                           will=(topics.coordinator_status(), offline))
        ct.connect()
        coord = Coordinator(
            store=store, blobs=BlobStore(tmp_path / "blobs"), repo=ModelRepository(tmp_path / "models"),
            transport=ct, topics=topics, strategy=build_strategy("fedavg"),
            settings=RoundSettings(rounds=1, min_clients=2, deadline_s=90, reannounce_s=2.0, codec="raw",
                                   training=TrainingConfig(local_epochs=1, batch_size=16, lr=0.05)),
            model_spec=spec, initial_tensors=initial, signer=key,
        )
        stop = threading.Event()
        agents, transports, threads = [], [], []
        try:
            coord.start()
            for a, ds in zip(AGENTS, datasets, strict=True):
                t = MqttTransport(a, "127.0.0.1", broker.port, tls=tls(a))
                t.connect()
                agent = EdgeAgent(AgentSettings(a, profile, tmp_path / a, fleet=FLEET, threads=1, trust=trust), t, ds)
                agent.start()
                transports.append(t)
                agents.append(agent)
                threads.append(threading.Thread(target=agent.run, args=(stop,), daemon=True))
            for th in threads:
                th.start()
            runner = threading.Thread(target=coord.run, args=(stop,), daemon=True)
            runner.start()
            runner.join(timeout=120)
            assert not runner.is_alive(), "round did not complete over TLS within 120 s"
            deadline = time.monotonic() + 10  # let the new model's manifest reach the auditor
            while time.monotonic() < deadline and coord.completed_rounds() < 1:
                time.sleep(0.1)
            time.sleep(1.0)
        finally:
            stop.set()
            for th in threads:
                th.join(timeout=5)
            for t in transports:
                t.close()
            ct.close()
            auditor.close()

    rec = store.get_round(1)
    assert rec is not None and rec.status == "complete", rec
    assert sorted(u.agent_id for u in store.list_updates(1)) == list(AGENTS)
    assert all(a.rounds_trained == 1 for a in agents)
    msgs = auditor.all()
    decoded = _decode_everything(msgs, topics)
    # the auditor really saw and decoded both updates and the models (so the checks below are not vacuous)
    assert sorted(decoded["updates"]) == list(AGENTS)
    assert "v0" in decoded["manifests"] and "v1" in decoded["manifests"]
    leaks = _leaks(detector, msgs, decoded)
    print(f"auditor: {len(msgs)} messages, {len(decoded['frames'])} frames, "
          f"{len(decoded['updates'])} updates, models {sorted(decoded['models'])}; worst: {leaks}")
    assert leaks["exact"] == 0.0
    assert max(v for k, v in leaks.items() if k.endswith("_corr")) < THRESHOLD, leaks

    # positive control: the same detector on an update that does carry a marker
    honest = decoded["updates"][AGENTS[0]]
    leaky = {k: v.copy() for k, v in honest.items()}
    big = max(leaky, key=lambda k: leaky[k].size)
    flat = leaky[big].ravel()
    flat[:49] = pool7(markers[0][1]).ravel() * 1e-3 + rng.normal(0, 1e-5, 49)  # a scaled, noisy thumbnail
    assert detector.correlation(leaky[big]) > THRESHOLD
    frame = encode_update({**honest, big: flat.reshape(leaky[big].shape)}, agent_id=AGENTS[0], round_id=1,
                          base_version="v0", sample_count=1)
    assert detector.exact(frame + markers[1][0].tobytes())
    with pytest.raises(ProtocolError):  # and a frame the auditor cannot decode would not go unnoticed
        decode_update(frame[:-3], expected=[TensorSpec(k, v.shape) for k, v in honest.items()])

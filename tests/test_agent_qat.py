"""QAT switched on by the device profile: the agent trains with fake-quant, and its update frame
carries exactly the float tensors of the contract (no observer state)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from agent_helpers import tiny_trust, tiny_v0

from edge_agent.agent import AgentSettings, EdgeAgent
from firmware.profile import find_profile
from learning.datasets import make_synthetic
from protocol.frame import decode_update, read_header, specs_of
from protocol.messages import Task, TrainingConfig
from protocol.transport import MemoryBroker, MemoryTransport


def _train_once(tmp_path: Path, qat: bool) -> tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray]]:
    base_profile = find_profile("xray-cxr-28")
    profile = base_profile.model_copy(update={"training": base_profile.training.model_copy(update={"qat": qat})})
    manifest, weights = tiny_v0()
    broker = MemoryBroker()
    t = MemoryTransport(broker, "a1")
    t.connect()
    agent = EdgeAgent(AgentSettings("a1", profile, tmp_path, threads=1, ack_timeout_s=0.5, trust=tiny_trust()), t,
                      make_synthetic(64, seed=1))
    agent.installer.install(manifest, weights)
    frames: list[bytes] = []
    chunks_seen = threading.Event()
    from protocol.chunks import parse_chunk
    from protocol.reassembly import Reassembler

    r = Reassembler()

    def on_chunk(topic: str, payload: bytes) -> None:
        rec = r.add("agent", parse_chunk(payload))
        if rec.complete:
            frames.append(rec.blob())
            chunks_seen.set()

    client = MemoryTransport(broker, "sink")
    client.connect()
    client.subscribe("fedscan/v1/default/agents/a1/updates/+", on_chunk)
    task = Task(round_id=1, base_version="v0", deadline=time.time() + 30,
                training=TrainingConfig(local_epochs=1, batch_size=16, lr=0.05))
    stop = threading.Event()
    worker = threading.Thread(target=agent._handle_task, args=(task, stop), daemon=True)
    worker.start()
    assert chunks_seen.wait(60), "no update uploaded"
    stop.set()
    worker.join(10)
    header, _ = read_header(frames[0])
    return [ti.name for ti in header.tensors], weights, decode_update(frames[0], expected=specs_of(weights)).tensors


def test_qat_profile_trains_with_fake_quant_and_uploads_contract_tensors(tmp_path: Path) -> None:
    names, weights, qat = _train_once(tmp_path / "qat", qat=True)
    assert names == list(weights), "observer state or renamed tensors leaked into the frame"
    assert any(not np.array_equal(qat[k], weights[k]) for k in weights), "the model did not train"
    _, _, plain = _train_once(tmp_path / "float", qat=False)
    # same seed, data and start weights: only fake quantization in the forward pass can make them differ
    assert any(not np.array_equal(qat[k], plain[k]) for k in weights), "QAT was not applied"

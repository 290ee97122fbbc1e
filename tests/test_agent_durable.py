"""Durable agent state (issue 15 item 8) and unguessable update ids (item 1, agent side): what the
agent must not forget is fsynced with its directory, the outbox forgets a frame once answered and
never hands a frame to another federation, and update ids are random but stable across resends."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import tiny_manifest, tiny_trust, tiny_v0

from edge_agent.agent import AgentSettings, EdgeAgent
from edge_agent.installer import ModelInstaller
from edge_agent.outbox import Binding, Outbox
from edge_agent.private_training import BUDGET_FILE, PrivateTrainer
from firmware.profile import PrivacySection, find_profile
from learning.datasets import make_synthetic
from protocol.chunks import parse_chunk
from protocol.frame import read_header
from protocol.messages import Ack, Task, TrainingConfig
from protocol.reassembly import Reassembler
from protocol.topics import Topics
from protocol.transport import MemoryBroker, MemoryTransport

PROFILE = find_profile("xray-cxr-28")


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path passed to ``os.fsync`` from now on (files and directories)."""
    seen: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_outbox_models_active_pointer_and_privacy_budget_are_fsynced_with_their_directories(
        tmp_path: Path, fsynced: list[str]) -> None:
    manifest, weights = tiny_v0()
    outbox = Outbox(tmp_path / "outbox")
    outbox.put(Binding.of(1, manifest), b"frame")
    inst = ModelInstaller(tmp_path / "models", trust=tiny_trust(), profile=PROFILE.name)
    inst.install(manifest, weights)
    inst.activate("v0")
    section = PrivacySection(dp_sgd=True, noise_multiplier=1.0, max_grad_norm=1.0, target_delta=1e-5,
                             epsilon_budget=8.0)
    trainer = PrivateTrainer(section, tmp_path)
    trainer.budget.spend(noise_multiplier=1.0, sampling_rate=0.1, steps=10, what="test")
    trainer._save()
    must = [tmp_path / "outbox" / "round-1.fsuf", tmp_path / "outbox" / "round-1.json", tmp_path / "outbox",
            tmp_path / "models" / "v0" / "weights.fsuf", tmp_path / "models" / "v0" / "manifest.json",
            tmp_path / "models" / "v0", tmp_path / "models" / "ACTIVE", tmp_path / "models",
            tmp_path / BUDGET_FILE, tmp_path]
    # a file is fsynced under its temporary name, then renamed: compare by the final name's directory + stem
    for p in must:
        ok = str(p) in fsynced if p.is_dir() else any(
            os.path.dirname(f) == str(p.parent) and p.name in os.path.basename(f) for f in fsynced)
        assert ok, f"{p} was not fsynced"
    assert json.loads((tmp_path / BUDGET_FILE).read_text())["events"]


def test_outbox_never_hands_a_frame_to_another_federation_and_sweeps_leftovers(tmp_path: Path) -> None:
    manifest, weights = tiny_v0()
    outbox = Outbox(tmp_path)
    outbox.put(Binding.of(1, manifest), b"old federation's frame")
    assert outbox.get(Binding.of(1, manifest)) == b"old federation's frame"
    # the coordinator was reset: round 1 again, from a "v0" that is another model (same name)
    reset_v0 = tiny_manifest("v0", weights, created_at=manifest.created_at + 3600)
    assert outbox.get(Binding.of(1, reset_v0)) is None
    assert outbox.rounds() == [] and not any(tmp_path.iterdir()), "the stale entry is deleted, never sent"
    (tmp_path / ".round-2.fsuf.tmp-1-2").write_bytes(b"torn")
    (tmp_path / "round-3.fsuf").write_bytes(b"frame without its metadata")
    Outbox(tmp_path)  # start-up
    assert not any(tmp_path.iterdir())


class Coordinator:
    """Reassembles uploads on the in-memory broker and answers each with ``status``."""

    def __init__(self, broker: MemoryBroker, status: str = "accepted") -> None:
        self.status, self.topics = status, Topics()
        self.received = threading.Event()
        self.update_ids: list[str] = []
        self.frames = Reassembler()
        self.t = MemoryTransport(broker, "coordinator")
        self.t.connect()
        self.t.subscribe("fedscan/v1/default/agents/+/updates/+", self.on_chunk)

    def on_chunk(self, topic: str, payload: bytes) -> None:
        rec = self.frames.add("agent", parse_chunk(payload))
        if rec.complete:
            update_id = read_header(rec.blob())[0].update_id
            self.update_ids.append(update_id)
            self.frames.discard("agent", rec.transfer_id)
            self.received.set()
            if not self.status:
                return
            agent = self.topics.parse(topic).agent or ""
            self.t.publish(self.topics.acks(agent), Ack(update_id=update_id, round_id=1, status=self.status).to_bytes())


def _agent(state: Path, broker: MemoryBroker, name: str = "a1") -> EdgeAgent:
    manifest, weights = tiny_v0()
    t = MemoryTransport(broker, name)
    t.connect()
    agent = EdgeAgent(AgentSettings(name, PROFILE, state, threads=1, trust=tiny_trust(), ack_timeout_s=0.3), t,
                      make_synthetic(32, seed=1))
    agent.installer.install(manifest, weights)
    agent.uploader.attach()
    return agent


def _task(deadline_s: float = 30) -> Task:
    return Task(round_id=1, base_version="v0", deadline=time.time() + deadline_s,
                training=TrainingConfig(local_epochs=1, batch_size=16, lr=0.05))


def test_an_acknowledged_frame_is_deleted(tmp_path: Path) -> None:
    broker = MemoryBroker()
    coord = Coordinator(broker)
    agent = _agent(tmp_path, broker)
    agent._handle_task(_task(), threading.Event())
    assert coord.update_ids and 1 in agent._done_rounds
    assert agent.outbox.rounds() == [] and not any((tmp_path / "outbox").iterdir())


def test_update_ids_are_random_per_entry_and_stable_across_resends(tmp_path: Path) -> None:
    broker = MemoryBroker()
    coord = Coordinator(broker, status="")  # never answers: the agent keeps the frame
    first = _agent(tmp_path / "a", broker)
    killed = coord.received  # the box dies once its frame is out, before any answer
    first._handle_task(_task(), killed)
    assert first.outbox.rounds() == [1], "unanswered: kept for a resend"
    sent = read_header(_stored(tmp_path / "a"))[0].update_id
    # the same box restarted resends the same entry with the same id
    again = _agent(tmp_path / "a", broker)
    coord.status = "duplicate"
    again._handle_task(_task(), threading.Event())
    assert coord.update_ids == [sent, sent] and again.outbox.rounds() == []
    # another box, same round and seed (same training seed derivation): another, unguessable id
    other = _agent(tmp_path / "b", broker, name="a2")
    other._handle_task(_task(), threading.Event())
    ids = coord.update_ids
    assert len(set(ids)) == 2 and all(len(i) == 32 for i in ids)
    assert all(set(i) <= set("0123456789abcdef") for i in ids), "128 random bits, nothing derived from agent or round"
    # the same round trained afresh (the entry was answered and deleted) gets a new id too
    coord.status = "accepted"
    fresh = _agent(tmp_path / "c", broker)
    fresh._handle_task(_task(), threading.Event())
    assert len(set(coord.update_ids)) == 3


def _stored(state: Path) -> bytes:
    return (state / "outbox" / "round-1.fsuf").read_bytes()


def test_private_budget_survives_when_the_process_dies_right_after_saving(tmp_path: Path) -> None:
    """The budget write is atomic: no temporary file is left and the file parses."""
    section = PrivacySection(dp_sgd=True, noise_multiplier=1.0, max_grad_norm=1.0, target_delta=1e-5)
    trainer = PrivateTrainer(section, tmp_path)
    trainer.budget.spend(noise_multiplier=1.0, sampling_rate=0.1, steps=10, what="test")
    trainer._save()
    assert sorted(p.name for p in tmp_path.iterdir()) == [BUDGET_FILE]
    again = PrivateTrainer(section, tmp_path)
    assert np.isclose(again.budget.spent, trainer.budget.spent)

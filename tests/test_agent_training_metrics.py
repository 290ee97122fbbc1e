"""The agent's training jobs drive its /metrics: round, steps done of steps planned, loss, active."""

from __future__ import annotations

import time
from pathlib import Path

from agent_helpers import tiny_trust, tiny_v0
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.agent import AgentSettings, EdgeAgent
from edge_agent.metrics import AgentMetrics
from firmware.profile import find_profile
from learning.datasets import make_synthetic
from protocol.messages import Task, TrainingConfig
from protocol.transport import MemoryBroker, MemoryTransport


def _samples(metrics: AgentMetrics) -> dict[str, float]:
    text = metrics.exposition().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_training_progress_reaches_the_agent_metrics(tmp_path: Path) -> None:
    manifest, weights = tiny_v0()
    t = MemoryTransport(MemoryBroker(), "a1")
    t.connect()
    metrics = AgentMetrics()
    agent = EdgeAgent(AgentSettings("a1", find_profile("xray-cxr-28"), tmp_path, threads=1, trust=tiny_trust()), t, make_synthetic(64, seed=1),
                      training_observer=metrics)
    agent.installer.install(manifest, weights)
    seen: list[dict[str, float]] = []
    real = metrics.on_train_progress

    def spy(done: int, planned: int, loss: float) -> None:
        real(done, planned, loss)
        seen.append(_samples(metrics))

    metrics.on_train_progress = spy  # type: ignore[method-assign]
    task = Task(round_id=7, base_version="v0", deadline=time.time() + 60,
                training=TrainingConfig(local_epochs=2, batch_size=16, lr=0.05))
    agent.training.run(task, make_synthetic(64, seed=1), "u-test")
    assert seen, "the trainer never reported progress"
    assert all(s["fedscan_training_active"] == 1 and s["fedscan_training_round"] == 7 for s in seen)
    assert [s["fedscan_training_step"] for s in seen] == sorted(s["fedscan_training_step"] for s in seen)
    assert seen[-1]["fedscan_training_step"] == seen[-1]["fedscan_training_steps_total"] == 8  # 2 epochs x 64/16
    end = _samples(metrics)
    assert end["fedscan_training_active"] == 0 and end["fedscan_training_loss"] > 0
    assert metrics.training_summary()["state"] == "done"

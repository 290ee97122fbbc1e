"""An agent whose profile says ``privacy.dp_sgd: true`` trains with DP-SGD, keeps its ε on disk
across restarts, sends ε with its update, and refuses a round that would pass its budget (issue 9:
"a spent privacy budget: training refuses to start with a clear message")."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import tiny_trust, tiny_v0

from edge_agent.agent import AgentSettings, EdgeAgent
from edge_agent.private_training import BUDGET_FILE, PrivacyStateError, dp_training_config
from firmware.profile import FirmwareProfile, PrivacySection, find_profile
from learning.datasets import make_synthetic
from learning.privacy_accounting import BudgetExhausted, RdpAccountant
from protocol.frame import decode_update, read_header, specs_of
from protocol.messages import AgentEvent, Task, TrainingConfig
from protocol.topics import Topics
from protocol.transport import MemoryBroker, MemoryTransport

DELTA = 1e-5
N, BATCH = 64, 16  # Poisson rate q = 1/4, 4 steps per epoch


def _epsilon(z: float, q: float, steps: int) -> float:
    acc = RdpAccountant()
    acc.compose(z, q, steps)
    return acc.epsilon(DELTA)


def _profile(budget: float | None, z: float = 1.0) -> FirmwareProfile:
    return find_profile("xray-cxr-28").model_copy(update={"privacy": PrivacySection(
        dp_sgd=True, noise_multiplier=z, max_grad_norm=1.0, target_delta=DELTA, epsilon_budget=budget)})


def _agent(state: Path, profile: FirmwareProfile, broker: MemoryBroker | None = None) -> EdgeAgent:
    manifest, weights = tiny_v0()
    t = MemoryTransport(broker or MemoryBroker(), "a1")
    t.connect()
    agent = EdgeAgent(AgentSettings("a1", profile, state, threads=1, trust=tiny_trust()), t, make_synthetic(N, seed=1))
    agent.installer.install(manifest, weights)
    return agent


def _task(round_id: int) -> Task:
    return Task(round_id=round_id, base_version="v0", deadline=time.time() + 60,
                training=TrainingConfig(local_epochs=1, batch_size=BATCH, lr=0.05, momentum=0.0, loss="balanced_ce"))


def _delta_norm(agent: EdgeAgent, frame: bytes) -> float:
    base = agent.installer.tensors("v0")
    got = decode_update(frame, expected=specs_of(base), base=base).tensors
    return float(np.sqrt(sum(float(np.sum((got[k].astype(np.float64) - base[k]) ** 2)) for k in base)))


def test_dp_agent_spends_its_budget_across_restarts_and_then_refuses(tmp_path: Path) -> None:
    one_round = _epsilon(1.0, 0.25, 4)
    two_rounds = _epsilon(1.0, 0.25, 8)
    budget = (one_round + two_rounds) / 2  # room for one round, not for two
    profile = _profile(budget)

    agent = _agent(tmp_path, profile)
    header, _ = read_header(agent.training.run(_task(1), make_synthetic(N, seed=1), "u-test"))
    m = header.metrics
    assert m["dp_steps"] == 4 and m["dp_sampling_rate"] == pytest.approx(0.25)
    assert m["dp_epsilon"] == pytest.approx(one_round, rel=1e-6) and m["dp_budget_epsilon"] == pytest.approx(budget)
    assert m["dp_noise_multiplier"] == 1.0 and m["dp_delta"] == DELTA
    stored = json.loads((tmp_path / BUDGET_FILE).read_text())
    assert stored["events"], "the spent ε must be on disk before the update leaves the box"

    # a restarted agent reads the budget back and refuses the round that would pass it
    broker = MemoryBroker()
    again = _agent(tmp_path, profile, broker)
    with pytest.raises(BudgetExhausted, match="privacy budget exhausted: DP-SGD round 2 refused"):
        again.training.run(_task(2), make_synthetic(N, seed=1), "u-test")
    again._handle_task(_task(3), again._stop)
    events = [AgentEvent.model_validate_json(p) for t, p in broker.log if t == Topics("default").events("a1")]
    assert [e.kind for e in events] == ["training_refused"]
    assert events[0].detail.round_id == 3 and "budget" in str(events[0].detail.detail)
    assert not (tmp_path / "outbox" / "round-3.fsuf").exists()  # nothing trained, nothing to send
    assert json.loads((tmp_path / BUDGET_FILE).read_text()) == stored  # a refusal spends nothing


def test_dp_noise_reaches_the_update(tmp_path: Path) -> None:
    """The same round with DP noise z = 20 moves the weights far more than with z = 0 (clipping
    only): the update really went through the DP optimizer."""
    quiet = _agent(tmp_path / "quiet", _profile(None, z=0.0))
    noisy = _agent(tmp_path / "noisy", _profile(None, z=20.0))
    n_quiet = _delta_norm(quiet, quiet.training.run(_task(1), make_synthetic(N, seed=1), "u-test"))
    n_noisy = _delta_norm(noisy, noisy.training.run(_task(1), make_synthetic(N, seed=1), "u-test"))
    # z·C = 20 per step on the summed clipped gradients vs a sum of at most ~16 clipped norms of 1
    assert n_noisy > 3 * n_quiet > 0


def test_unreadable_budget_file_refuses_training_instead_of_starting_afresh(tmp_path: Path) -> None:
    (tmp_path / BUDGET_FILE).write_text("{not json")
    agent = _agent(tmp_path, _profile(8.0))
    with pytest.raises(PrivacyStateError, match="never delete it"):
        agent.training.run(_task(1), make_synthetic(N, seed=1), "u-test")


def test_dp_config_drops_what_the_accounting_does_not_cover() -> None:
    cfg = dp_training_config(TrainingConfig(loss="balanced_ce", prox_mu=0.1, lr=0.2))
    assert (cfg.loss, cfg.prox_mu, cfg.lr) == ("ce", 0.0, 0.2)


def test_shipped_dermoscope_profile_asks_for_dp() -> None:
    privacy = find_profile("dermoscope-rgb-64").privacy
    assert privacy is not None and privacy.dp_sgd and privacy.epsilon_budget == 8.0


def test_round_record_lists_each_dp_agents_epsilon() -> None:
    from coordinator.rounds import client_privacy
    from coordinator.strategies import ClientResult

    results = [ClientResult("a1", {}, 10, {"train_loss": 0.3, "dp_epsilon": 2.5, "dp_delta": 1e-5}),
               ClientResult("a2", {}, 10, {"train_loss": 0.4})]
    assert client_privacy(results) == {"a1": {"epsilon": 2.5, "delta": 1e-5}}

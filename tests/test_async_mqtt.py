"""Integration: async rounds over a real mosquitto, one agent process stalled (SIGSTOP) for two
rounds. The federation does not wait for it; when it comes back, the update it trained from v0
counts in round 3, two rounds stale."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from fedproc import Federation, wait_for
from mqtt_broker import Broker

from coordinator.store import open_store
from learning.datasets import load_medmnist
from tools import forkserver

pytestmark = pytest.mark.integration


def _store_value(fed: Federation, read):  # type: ignore[no-untyped-def]
    store = open_store(f"sqlite:///{fed.state / 'state.db'}")
    try:
        return read(store)
    finally:
        store.close()


def _status(fed: Federation, round_id: int) -> str | None:
    return _store_value(fed, lambda s: (r.status if (r := s.get_round(round_id)) is not None else None))


def test_a_stalled_agent_does_not_block_async_rounds_and_its_late_update_counts(
    tmp_path: Path, broker: Broker, pneumonia_npz: Path
) -> None:
    train = load_medmnist(pneumonia_npz, "train")
    # site-1/site-2 have enough images that a round of theirs takes seconds: the test stops them
    # between rounds 2 and 3 long before they could upload round 3; site-3 is small and stalled
    fed = Federation(tmp_path, broker.port, pneumonia_npz, sizes=[1200, 1200, 100], rounds=3,
                     extra_coordinator_args=["--mode", "async", "--min-clients", "2", "--no-export",
                                             "--exit-when-done"])
    fed.prepare(train.labels).close()
    fed.start_all()
    try:
        wait_for(lambda: _store_value(fed, lambda s: bool((a := s.get_agent("site-3")) and a.online)), 120,
                 "site-3 online", fed)
        forkserver.send_signal(fed.agents["site-3"], signal.SIGSTOP)
        wait_for(lambda: _status(fed, 2) == "complete", 240, "rounds 1 and 2 without site-3", fed)
        for name in ("site-1", "site-2"):
            forkserver.send_signal(fed.agents[name], signal.SIGSTOP)
        assert _store_value(fed, lambda s: len(s.list_updates(3))) == 0, "site-1/2 were stopped too late"
        forkserver.send_signal(fed.agents["site-3"], signal.SIGCONT)
        wait_for(lambda: _store_value(fed, lambda s: len(s.list_updates(3))) == 1, 120, "site-3's late update", fed)
        forkserver.send_signal(fed.agents["site-1"], signal.SIGCONT)
        wait_for(lambda: _status(fed, 3) == "complete", 120, "round 3", fed)
        forkserver.send_signal(fed.agents["site-2"], signal.SIGCONT)
    finally:
        for p in fed.agents.values():
            forkserver.send_signal(p, signal.SIGCONT)
        fed.stop()
    rounds = _store_value(fed, lambda s: {r: {u.agent_id: u.staleness for u in s.list_updates(r)} for r in (1, 2, 3)})
    assert rounds[1] == {"site-1": 0, "site-2": 0}
    assert rounds[2] == {"site-1": 0, "site-2": 0}
    assert rounds[3] == {"site-3": 2, "site-1": 0}, fed.logs()
    assert "2 rounds stale" in (fed.state / "coordinator.log").read_text()

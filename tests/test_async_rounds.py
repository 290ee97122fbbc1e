"""Async (buffered, FedBuff-style) rounds over the in-memory transport twin: a round closes when its
buffer holds min_clients updates, a late update counts in a later round scaled by
(1 + staleness) ** -0.5, a too-old one is refused with a reason, and a restart loses nothing."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from test_coordinator_rounds import SPEC, Harness, _frame, _init

from coordinator.model_repo import ModelRepository
from coordinator.rounds import Coordinator, RoundSettings
from coordinator.store import BlobStore
from coordinator.strategies import build_strategy
from protocol.codec import Tensors
from protocol.tensors import tensor_hash
from protocol.transport import MemoryTransport

SETTINGS = RoundSettings(rounds=3, min_clients=2, deadline_s=60, reannounce_s=0.2, mode="async", max_staleness=1)


def _harness(tmp: Path) -> Harness:
    h = Harness(tmp, ["a1", "a2", "a3"], min_clients=2, settings=SETTINGS)
    h.thread.start()
    return h


def _restart(h: Harness, tmp: Path) -> None:
    """Stop the coordinator and start a new one on the same store, blobs and models."""
    h.stop.set()
    h.thread.join(5)
    transport = MemoryTransport(h.broker, "coordinator-2")
    transport.connect()
    h.coord = Coordinator(
        store=h.store, blobs=BlobStore(tmp / "blobs"), repo=ModelRepository(tmp / "models"), transport=transport,
        topics=h.topics, strategy=build_strategy("fedavg"), settings=SETTINGS, model_spec=SPEC, initial_tensors=_init,
    )
    h.coord.start()
    h.stop = threading.Event()
    h.thread = threading.Thread(target=h.coord.run, args=(h.stop,), daemon=True)
    h.thread.start()


def _complete(h: Harness, round_id: int) -> None:
    h.wait(lambda: (r := h.store.get_round(round_id)) is not None and r.status == "complete")


def _plus(t: Tensors, x: float) -> Tensors:
    return {k: v + np.float32(x) for k, v in t.items()}


def _stale_round(tmp: Path, *, restart: bool) -> tuple[Harness, Tensors]:
    h = _harness(tmp)
    h.wait(lambda: {t.round_id for t in h.tasks} == {1} and len(h.tasks) >= 3)
    v0 = h.coord.repo.tensors("v0")
    h.send("a1", 1, _frame("a1", _plus(v0, 0.01)), "r1-a1")
    h.send("a2", 1, _frame("a2", _plus(v0, 0.03)), "r1-a2")
    _complete(h, 1)  # a3 is still training: the buffer does not wait for it
    v1 = h.coord.repo.tensors("v1")
    # round 2: a1 and a2 get round 2's task; a3 is only reminded of the task it is working on
    h.wait(lambda: any(t.round_id == 2 for t in h.tasks))
    h.wait(lambda: (r := h.store.get_round(2)) is not None and r.status == "collecting")
    late = _plus(v0, 0.05)
    h.send("a3", 1, _frame("a3", late), "r1-a3")
    h.wait(lambda: any(a.update_id == "r1-a3" and a.status == "accepted" for a in h.acks))
    if restart:
        _restart(h, tmp)
    h.send("a1", 2, _frame("a1", _plus(v1, 0.02), round_id=2, base="v1"), "r2-a1")
    _complete(h, 2)
    return h, h.coord.repo.tensors("v2")


def test_a_late_update_counts_in_the_next_round_down_weighted(tmp_path: Path) -> None:
    h, v2 = _stale_round(tmp_path, restart=False)
    try:
        ups = {u.agent_id: u for u in h.store.list_updates(2)}
        assert set(ups) == {"a1", "a3"} and ups["a3"].staleness == 1 and ups["a1"].staleness == 0
        assert h.store.get_round(2).mode == "async"  # type: ignore[union-attr]
        v0, v1 = h.coord.repo.tensors("v0"), h.coord.repo.tensors("v1")
        s = 2.0 ** -0.5
        for k in v2:  # FedAvg (equal sample counts) of a1's model and a3's delta on v1, scaled by s
            a3_effective = v1[k] + s * (np.float32(0.05) + v0[k] - v0[k])
            expected = (v1[k] + np.float32(0.02) + a3_effective) / 2
            np.testing.assert_allclose(v2[k], expected, rtol=1e-5, atol=1e-6)
        reminded = [t for t in h.tasks if t.mode == "async" and t.round_id == 1]
        assert len(reminded) >= 4  # a3 kept being told its round-1 task, never round 2's, while it trained
    finally:
        h.stop.set()


def test_a_restart_between_a_late_update_and_the_aggregation_changes_nothing(tmp_path: Path) -> None:
    h1, plain = _stale_round(tmp_path / "plain", restart=False)
    h1.stop.set()
    h2, restarted = _stale_round(tmp_path / "restarted", restart=True)
    try:
        assert tensor_hash(plain) == tensor_hash(restarted)
    finally:
        h2.stop.set()


@pytest.mark.parametrize("case", ["too_stale", "already_in_buffer"])
def test_refusals_with_reasons(tmp_path: Path, case: str) -> None:
    h = _harness(tmp_path)
    try:
        h.wait(lambda: len(h.tasks) >= 3)
        v0 = h.coord.repo.tensors("v0")
        h.send("a1", 1, _frame("a1", _plus(v0, 0.01)), "r1-a1")
        h.send("a2", 1, _frame("a2", _plus(v0, 0.02)), "r1-a2")
        _complete(h, 1)
        v1 = h.coord.repo.tensors("v1")
        h.wait(lambda: (r := h.store.get_round(2)) is not None and r.status == "collecting")
        if case == "already_in_buffer":
            h.send("a1", 2, _frame("a1", _plus(v1, 0.01), round_id=2, base="v1"), "r2-a1")
            h.wait(lambda: any(a.update_id == "r2-a1" and a.status == "accepted" for a in h.acks))
            h.send("a1", 1, _frame("a1", _plus(v0, 0.04)), "r1-a1-again")  # a second one into the same buffer
            bad = "r1-a1-again"
        else:
            h.send("a1", 2, _frame("a1", _plus(v1, 0.01), round_id=2, base="v1"), "r2-a1")
            h.send("a2", 2, _frame("a2", _plus(v1, 0.01), round_id=2, base="v1"), "r2-a2")
            _complete(h, 2)
            h.wait(lambda: (r := h.store.get_round(3)) is not None and r.status == "collecting")
            h.send("a3", 1, _frame("a3", _plus(v0, 0.04)), "r1-a3")  # two rounds behind, max is one
            bad = "r1-a3"
        h.wait(lambda: any(a.update_id == bad and a.status == "rejected" for a in h.acks))
        ack = next(a for a in h.acks if a.update_id == bad and a.status == "rejected")
        assert ack.reason == case
        assert case in {e.reason for e in h.store.list_events("update_rejected")}
        assert all(u.update_id != bad for r in (1, 2, 3) for u in h.store.list_updates(r))
    finally:
        h.stop.set()

"""Refusals are all counted but written sparingly: a box sending junk cannot turn the coordinator
into a database-write amplifier (issue 15 item 2, coordinator side)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.model_repo import ModelRepository
from coordinator.refusals import RefusalLog
from coordinator.rounds import Coordinator, ModelSpec, RoundSettings
from coordinator.store import BlobStore, Store, open_store
from coordinator.strategies import build_strategy
from protocol.manifest import InputSpec
from protocol.topics import Topics
from protocol.transport import MemoryBroker, MemoryTransport


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    yield s
    s.close()


def test_at_most_n_events_per_agent_per_window_and_one_summary(store: Store) -> None:
    now = [0.0]
    log = RefusalLog(store, per_window=3, window_s=60, clock=lambda: now[0])
    recorded = [log.refuse("update", "junk", 1, "bad_magic", "not a chunk") for _ in range(500)]
    assert recorded == [True] * 3 + [False] * 497
    assert log.refuse("update", "honest", 1, "round_closed", "late")  # other agents keep their own budget
    assert log.counts["update:bad_magic"] == 500 and store.count_events("update_rejected") == 4
    assert log.flush() == 0  # the window is not over yet
    now[0] = 61.0
    assert log.flush() == 1
    (summary,) = store.list_events("refusals_suppressed")
    assert summary.agent_id == "junk" and summary.detail == {"suppressed": 497, "by_reason": {"update:bad_magic": 497},
                                                             "window_s": 60}
    assert log.refuse("update", "junk", 1, "bad_magic", "again")  # a new window records again


def test_a_summary_is_also_written_by_the_next_refusal_after_the_window(store: Store) -> None:
    now = [0.0]
    log = RefusalLog(store, per_window=1, window_s=10, clock=lambda: now[0])
    for _ in range(5):
        log.refuse("shadow", "box", None, "topic_mismatch", "x")
    now[0] = 11.0
    log.refuse("shadow", "box", None, "unknown_version", "y")
    assert [e.detail["suppressed"] for e in store.list_events("refusals_suppressed")] == [4]  # type: ignore[index]
    assert store.count_events("shadow_rejected") == 2


def test_a_flood_of_junk_chunks_costs_a_bounded_number_of_writes(tmp_path: Path) -> None:
    """Over the coordinator's own intake: 300 garbage chunks from one enrolled box."""
    import torch

    from learning.models import build_model
    from learning.state import get_tensors

    spec = ModelSpec("small_cnn", {"in_channels": 1, "num_classes": 2, "width": 4, "norm": "group"}, ["a", "b"],
                     InputSpec(channels=1, height=28, width=28))
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    store.enroll_agent("junk", "xray-cxr-28", [])
    broker, topics = MemoryBroker(), Topics("r")
    transport = MemoryTransport(broker, "coordinator")
    transport.connect()
    torch.manual_seed(0)
    coord = Coordinator(store=store, blobs=BlobStore(tmp_path / "blobs"), repo=ModelRepository(tmp_path / "models"),
                        transport=transport, topics=topics, strategy=build_strategy("fedavg"),
                        settings=RoundSettings(rounds=1, min_clients=1, deadline_s=30),
                        model_spec=spec, initial_tensors=lambda: get_tensors(build_model("small_cnn", **spec.kwargs)),
                        refusals=RefusalLog(store, per_window=10, window_s=3600))
    coord.start()
    stop = threading.Event()
    th = threading.Thread(target=coord.run, args=(stop,), daemon=True)
    th.start()
    box = MemoryTransport(broker, "junk")
    box.connect()
    try:
        for i in range(300):
            box.publish(topics.updates("junk", 1), b"garbage %d" % i)
        deadline = time.monotonic() + 20
        while coord.refusals.counts["update:bad_magic"] < 300:
            assert time.monotonic() < deadline, coord.refusals.counts
            time.sleep(0.05)
        assert store.count_events("update_rejected") == 10  # was 300 fsync'd writes
    finally:
        stop.set()
        th.join(5)
        store.close()

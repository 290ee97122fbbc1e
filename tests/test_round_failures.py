"""A round that cannot aggregate fails alone, with a reason and an event; the coordinator goes on
with the next round instead of exiting and resuming into the same failure forever (issue 15 item 4)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.model_repo import ModelRepository
from coordinator.rounds import Coordinator, ModelSpec, RoundSettings
from coordinator.store import BlobStore, Store, open_store
from coordinator.strategies import AggregateReport, ClientResult, Strategy, build_strategy
from protocol.chunks import split
from protocol.codec import Tensors
from protocol.frame import encode_update
from protocol.manifest import InputSpec
from protocol.topics import Topics
from protocol.transport import MemoryBroker, MemoryTransport

SPEC = ModelSpec("small_cnn", {"in_channels": 1, "num_classes": 2, "width": 4, "norm": "group"}, ["a", "b"],
                 InputSpec(channels=1, height=28, width=28))
AGENTS = ["a1", "a2", "a3"]


def _init() -> Tensors:
    import torch

    from learning.models import build_model
    from learning.state import get_tensors

    torch.manual_seed(0)
    return get_tensors(build_model(SPEC.architecture, **SPEC.kwargs))


class Exploding(Strategy):
    """A strategy whose aggregation raises, as Krum with too few clients or a numeric bug would."""

    name = "exploding"

    def aggregate(self, round_id: int, base: Tensors, results: list[ClientResult]) -> tuple[Tensors, AggregateReport]:
        raise ValueError("cannot combine these")


def _until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Rig:
    def __init__(self, tmp: Path, strategy: Strategy, settings: RoundSettings) -> None:
        self.store: Store = open_store(f"sqlite:///{tmp / 'state.db'}")
        for a in AGENTS:
            self.store.enroll_agent(a, "xray-cxr-28", [])
        self.broker, self.topics = MemoryBroker(), Topics("f")
        transport = MemoryTransport(self.broker, "coordinator")
        transport.connect()
        self.blobs = BlobStore(tmp / "blobs")
        self.coord = Coordinator(store=self.store, blobs=self.blobs, repo=ModelRepository(tmp / "models"),
                                 transport=transport, topics=self.topics, strategy=strategy, settings=settings,
                                 model_spec=SPEC, initial_tensors=_init)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.coord.run, args=(self.stop,), daemon=True)
        self.client = MemoryTransport(self.broker, "boxes")
        self.client.connect()

    def run(self) -> None:
        self.coord.start()
        self.thread.start()

    def upload(self, agent: str, round_id: int = 1) -> None:
        base = _init()
        frame = encode_update({k: v + 0.01 for k, v in base.items()}, agent_id=agent, round_id=round_id,
                              base_version="v0", sample_count=10)
        for c in split(frame, f"u-{agent}-{round_id}", 8192):
            self.client.publish(self.topics.updates(agent, round_id), c)

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(5)
        self.store.close()


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for r in made:
        r.close()


def _failed(store: Store, round_id: int) -> str | None:
    r = store.get_round(round_id)
    return None if r is None or r.status != "failed" else str((r.detail or {}).get("reason"))


def test_an_aggregation_that_raises_fails_its_round_and_the_next_one_starts(tmp_path: Path, rigs: list[Rig]) -> None:
    rig = Rig(tmp_path, Exploding(), RoundSettings(rounds=1, min_clients=2, deadline_s=60, reannounce_s=60))
    rigs.append(rig)
    rig.run()
    _until(lambda: rig.store.get_round(1) is not None)
    rig.upload("a1")
    rig.upload("a2")
    _until(lambda: _failed(rig.store, 1) is not None)
    assert _failed(rig.store, 1) == "aggregation_failed"
    (event,) = rig.store.list_events("round_failed")
    assert event.round_id == 1 and "cannot combine these" in (event.detail or {})["message"]
    _until(lambda: rig.store.get_round(2) is not None)  # the coordinator goes on
    assert rig.thread.is_alive() and rig.store.latest_model().version == "v0"  # type: ignore[union-attr]


def test_krum_short_of_updates_at_the_deadline_fails_the_round(tmp_path: Path, rigs: list[Rig]) -> None:
    rig = Rig(tmp_path, build_strategy("krum", f=1), RoundSettings(rounds=1, min_clients=5, deadline_s=3,
                                                                   reannounce_s=60))
    rigs.append(rig)
    rig.run()
    _until(lambda: rig.store.get_round(1) is not None)
    for a in AGENTS:
        rig.upload(a)
    _until(lambda: _failed(rig.store, 1) is not None)
    assert _failed(rig.store, 1) == "too_few_updates"
    _until(lambda: rig.store.get_round(2) is not None)
    assert rig.thread.is_alive()


def test_a_restart_into_a_round_whose_blob_is_gone_fails_it_and_goes_on(tmp_path: Path, rigs: list[Rig]) -> None:
    """The coordinator died while aggregating; one accepted update's frame is no longer on disk."""
    rig = Rig(tmp_path, build_strategy("fedavg"), RoundSettings(rounds=1, min_clients=2, deadline_s=60,
                                                                reannounce_s=60))
    rigs.append(rig)
    rig.coord.start()  # records v0
    rig.store.create_round(1, base_version="v0", config={}, deadline=time.time() + 60)
    for a in ("a1", "a2"):
        rig.store.add_update(round_id=1, agent_id=a, update_id=f"u-{a}", sample_count=10, metrics={},
                             blob_sha256=hashlib.sha256(a.encode()).hexdigest(), nbytes=1)
    rig.store.set_round_status(1, "aggregating")
    rig.thread.start()
    _until(lambda: _failed(rig.store, 1) is not None)
    assert _failed(rig.store, 1) == "blob_missing"
    _until(lambda: rig.store.get_round(2) is not None)
    assert rig.thread.is_alive()


def test_start_sweeps_partial_blob_files_left_by_a_crash(tmp_path: Path, rigs: list[Rig]) -> None:
    """A coordinator killed mid-write leaves a temp file; the next start removes it (issue 15 item 8)."""
    rig = Rig(tmp_path, build_strategy("fedavg"), RoundSettings(rounds=1, min_clients=2))
    rigs.append(rig)
    sha = rig.blobs.put(b"kept")
    partial = rig.blobs.path(sha).parent / ".tmp-killed-mid-put"
    partial.write_bytes(b"half a frame")
    rig.coord.start()
    assert not partial.exists() and rig.blobs.get(sha) == b"kept"

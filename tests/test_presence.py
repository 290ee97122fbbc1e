"""AgentPresence that stays true (issue 19 item 6): one answer, kept in the store, from the broker's
retained status and Last Will bounded by when each box was last heard from."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from coordinator.dashboard import dashboard_router
from coordinator.fleet_view import FleetView, fleet_registry
from coordinator.model_repo import ModelRepository
from coordinator.presence import STALE_AFTER_S, PresenceTracker, presence_of
from coordinator.rounds import Coordinator, ModelSpec, RoundSettings
from coordinator.states import AgentPresence
from coordinator.store import BlobStore, Store, open_store
from coordinator.strategies import build_strategy
from fedscan.cli import app as cli
from protocol.manifest import InputSpec
from protocol.messages import Status, Telemetry
from protocol.topics import Topics
from protocol.transport import MemoryBroker, MemoryTransport

TOPICS = Topics("presence")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    yield s
    s.close()


def _api(view: FleetView, **params: object) -> dict[str, object]:
    app = FastAPI()
    app.include_router(dashboard_router(view))
    resp = TestClient(app).get("/dashboard/api/fleet", params={"points": 0, **params})  # type: ignore[arg-type]
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _until(cond: object, timeout: float = 10.0) -> None:
    """Handlers run on the transport's dispatcher thread: wait for their effect."""
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _presence(store: Store, agent: str) -> AgentPresence:
    rec = store.get_agent(agent)
    assert rec is not None
    return presence_of(rec.online, rec.last_seen, time.time())


def _fleet_ls(state_dir: Path) -> dict[str, dict[str, object]]:
    result = CliRunner().invoke(cli, ["fleet", "ls", "--state", str(state_dir), "--json"])
    assert result.exit_code == 0, result.output
    return {a["agent_id"]: a for a in json.loads(result.output)}


def test_presence_rule() -> None:
    now = 10_000.0
    assert presence_of(True, None, now) is AgentPresence.UNSEEN
    assert presence_of(False, now - 1, now) is AgentPresence.OFFLINE
    assert presence_of(True, now - STALE_AFTER_S, now) is AgentPresence.ONLINE
    assert presence_of(True, now - STALE_AFTER_S - 0.1, now) is AgentPresence.STALE


def test_a_restarted_coordinator_shows_every_enrolled_agent_and_agrees_with_fleet_ls(store: Store,
                                                                                    tmp_path: Path) -> None:
    """The reported case: 4 agents enrolled, stopped 21 minutes ago, coordinator restarted on a fresh
    broker. The dashboard said "0 / 0 online", ``fleet ls`` "online" for all four."""
    names = [f"box-{i}" for i in range(4)]
    for n in names:
        store.enroll_agent(n, "xray-cxr-28", [])
        store.mark_seen(n, online=True, at=time.time() - 21 * 60)  # what the old coordinator left behind
    broker = MemoryBroker()
    coordinator = MemoryTransport(broker, "coordinator")
    coordinator.connect()
    PresenceTracker(store, TOPICS).attach(coordinator)
    view = FleetView(TOPICS, roster=store)
    view.attach(coordinator)

    data = _api(view)
    assert (data["total"], data["online"]) == (4, 0)
    assert [(a["agent"], a["online"], a["presence"]) for a in data["agents"]] == [(n, False, "stale") for n in names]
    listed = _fleet_ls(tmp_path)
    assert [(listed[n]["online"], listed[n]["presence"]) for n in names] == [(False, "stale")] * 4

    # box-1 comes back: its birth message and telemetry make it online everywhere at once
    box = MemoryTransport(broker, "box-1")
    box.connect()
    box.publish(TOPICS.status("box-1"), Status(state="online").to_bytes(), retain=True)
    box.publish(TOPICS.telemetry("box-1"), Telemetry(cpu_percent=12.0).to_bytes(), qos=0)
    _until(lambda: _presence(store, "box-1") is AgentPresence.ONLINE and view.counts["telemetry"] == 1)
    data = _api(view)
    assert (data["total"], data["online"]) == (4, 1)
    assert {a["agent"]: a["presence"] for a in data["agents"]}["box-1"] == "online"
    assert _fleet_ls(tmp_path)["box-1"]["presence"] == "online"
    up = {s.labels["agent"]: s.value for f in fleet_registry(view).collect() for s in f.samples
          if s.name == "fedscan_agent_up"}
    assert up == {"box-0": 0.0, "box-1": 1.0, "box-2": 0.0, "box-3": 0.0}  # /metrics says the same


def test_presence_is_rebuilt_from_retained_status_and_last_will(store: Store) -> None:
    for n in ("up", "gone", "killed", "never"):
        store.enroll_agent(n, "xray-cxr-28", [])
    broker = MemoryBroker()
    # what the broker retained while no coordinator was running
    up = MemoryTransport(broker, "up")
    up.connect()
    up.publish(TOPICS.status("up"), Status(state="online").to_bytes(), retain=True)
    gone = MemoryTransport(broker, "gone")
    gone.connect()
    gone.publish(TOPICS.status("gone"), Status(state="online").to_bytes(), retain=True)
    gone.close(graceful_payload=(TOPICS.status("gone"), Status(state="offline").to_bytes()))
    killed = MemoryTransport(broker, "killed", will=(TOPICS.status("killed"), Status(state="offline").to_bytes()))
    killed.connect()
    killed.publish(TOPICS.status("killed"), Status(state="online").to_bytes(), retain=True)
    killed.crash()  # the broker publishes the Last Will
    fresh = MemoryTransport(broker, "coordinator")
    fresh.connect()
    tracker = PresenceTracker(store, TOPICS)
    tracker.attach(fresh)
    _until(lambda: tracker.counts["status"] == 3)
    got = {a.agent_id: _presence(store, a.agent_id) for a in store.list_agents()}
    assert got == {"up": AgentPresence.ONLINE, "gone": AgentPresence.OFFLINE, "killed": AgentPresence.OFFLINE,
                   "never": AgentPresence.UNSEEN}


def test_an_old_retained_birth_does_not_make_a_box_look_fresh(store: Store) -> None:
    store.enroll_agent("quiet", "p", [])
    broker = MemoryBroker()
    box = MemoryTransport(broker, "quiet")
    box.connect()
    box.publish(TOPICS.status("quiet"), Status(state="online", at=time.time() - 3600).to_bytes(), retain=True)
    tracker = PresenceTracker(store, TOPICS)
    tracker.attach(MemoryTransport(broker, "coordinator"))
    _until(lambda: tracker.counts["status"] == 1)
    assert _presence(store, "quiet") is AgentPresence.STALE  # until it is heard from
    tracker.heard("quiet")
    assert _presence(store, "quiet") is AgentPresence.ONLINE


def test_heartbeats_are_written_sparingly_and_never_move_last_seen_back(store: Store) -> None:
    store.enroll_agent("box", "p", [])
    clock = [1000.0]
    tracker = PresenceTracker(store, TOPICS, write_every_s=15, clock=lambda: clock[0])
    for _ in range(100):  # telemetry every 0.1 s for 10 s
        tracker.on_telemetry_message(TOPICS.telemetry("box"), b"{}")
        clock[0] += 0.1
    assert tracker.counts["heard"] == 100 and tracker.counts["writes"] == 1
    clock[0] = 1016.0
    tracker.heard("box")
    assert tracker.counts["writes"] == 2 and store.get_agent("box").last_seen == 1016.0  # type: ignore[union-attr]
    store.record_presence("box", seen_at=900.0)  # a late, older report
    assert store.get_agent("box").last_seen == 1016.0  # type: ignore[union-attr]
    tracker.heard("not-enrolled")
    assert tracker.counts["refused"] == 1


def test_a_thousand_agents_are_paged_and_filtered_by_the_store(tmp_path: Path) -> None:
    store = open_store("sqlite://")  # in memory: 1,000 enrollments without 1,000 fsyncs
    try:
        now = time.time()
        for i in range(1000):
            store.enroll_agent(f"box-{i:04d}", "p", [])
            if i % 3 == 0:
                store.mark_seen(f"box-{i:04d}", online=True, at=now)
        view = FleetView(TOPICS, roster=store)
        page = _api(view, offset=100, limit=50)
        assert (page["total"], page["online"], page["matching"]) == (1000, 334, 1000)
        assert [a["agent"] for a in page["agents"]] == [f"box-{i:04d}" for i in range(100, 150)]  # type: ignore[union-attr]
        online = _api(view, state="online", limit=500)
        assert online["matching"] == 334 and all(a["online"] for a in online["agents"])  # type: ignore[union-attr]
        found = _api(view, q="BOX-09", state="offline")
        assert found["matching"] == 66 and found["agents"][0]["agent"] == "box-0901"  # type: ignore[index]
        assert _api(view, q="%")["matching"] == 0  # LIKE wildcards are matched literally
        app = FastAPI()
        app.include_router(dashboard_router(view))
        assert TestClient(app).get("/dashboard/api/fleet", params={"limit": 501}).status_code == 422
    finally:
        store.close()


def test_the_coordinator_keeps_presence_and_resends_the_task_to_a_box_that_comes_back(tmp_path: Path) -> None:
    import torch

    from learning.models import build_model
    from learning.state import get_tensors

    spec = ModelSpec("small_cnn", {"in_channels": 1, "num_classes": 2, "width": 4, "norm": "group"}, ["a", "b"],
                     InputSpec(channels=1, height=28, width=28))
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    store.enroll_agent("a1", "xray-cxr-28", [])
    broker = MemoryBroker()
    transport = MemoryTransport(broker, "coordinator")
    transport.connect()
    torch.manual_seed(0)
    coord = Coordinator(store=store, blobs=BlobStore(tmp_path / "blobs"), repo=ModelRepository(tmp_path / "models"),
                        transport=transport, topics=TOPICS, strategy=build_strategy("fedavg"),
                        settings=RoundSettings(rounds=1, min_clients=1, deadline_s=30, reannounce_s=60),
                        model_spec=spec, initial_tensors=lambda: get_tensors(build_model("small_cnn", **spec.kwargs)))
    # the box listens before the coordinator starts: the first announcement is not retained, and one
    # published before the box subscribed was missed (the test then waited for it in vain)
    box = MemoryTransport(broker, "a1")
    tasks: list[bytes] = []
    box.subscribe(TOPICS.tasks("a1"), lambda _t, p: tasks.append(p))
    box.connect()
    coord.start()
    stop = threading.Event()
    th = threading.Thread(target=coord.run, args=(stop,), daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 10
        while not tasks and time.monotonic() < deadline:  # the first announcement
            time.sleep(0.02)
        assert tasks
        n = len(tasks)
        box.publish(TOPICS.status("a1"), Status(state="online").to_bytes(), retain=True)
        _until(lambda: len(tasks) == n + 1)  # the task again, for a box that may have missed it
        assert _presence(store, "a1") is AgentPresence.ONLINE
    finally:
        stop.set()
        th.join(5)
        store.close()

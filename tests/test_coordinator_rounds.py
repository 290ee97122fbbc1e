"""Round manager over the in-memory transport twin: refusals with reasons, the round goes on."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.model_repo import ModelRepository
from coordinator.rounds import Coordinator, ModelSpec, RoundSettings
from coordinator.rounds.state import RoundTask
from coordinator.store import BlobStore, Store, open_store
from coordinator.strategies import build_strategy
from protocol.chunks import split
from protocol.codec import Tensors
from protocol.frame import encode_update
from protocol.manifest import InputSpec
from protocol.messages import Ack, Task, parse_message
from protocol.topics import Topics
from protocol.transport import MemoryBroker, MemoryTransport

SPEC = ModelSpec("small_cnn", {"in_channels": 1, "num_classes": 2, "width": 4, "norm": "group"}, ["a", "b"],
                 InputSpec(channels=1, height=28, width=28))


def _init() -> Tensors:
    import torch

    from learning.models import build_model
    from learning.state import get_tensors

    torch.manual_seed(0)
    return get_tensors(build_model(SPEC.architecture, **SPEC.kwargs))


class Harness:
    def __init__(self, tmp: Path, agents: list[str], min_clients: int, settings: RoundSettings | None = None) -> None:
        self.broker = MemoryBroker()
        self.store: Store = open_store(f"sqlite:///{tmp / 'state.db'}")
        for a in agents:
            self.store.enroll_agent(a, "xray-cxr-28", [])
        self.transport = MemoryTransport(self.broker, "coordinator")
        self.transport.connect()
        self.topics = Topics()
        self.coord = Coordinator(
            store=self.store, blobs=BlobStore(tmp / "blobs"), repo=ModelRepository(tmp / "models"),
            transport=self.transport, topics=self.topics, strategy=build_strategy("fedavg"),
            settings=settings or RoundSettings(rounds=1, min_clients=min_clients, deadline_s=30, reannounce_s=0.2),
            model_spec=SPEC, initial_tensors=_init,
        )
        self.coord.start()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.coord.run, args=(self.stop,), daemon=True)
        self.acks: list[Ack] = []
        self.tasks: list[Task] = []
        self.client = MemoryTransport(self.broker, "test-client")
        self.client.connect()
        self.agent_acks: list[tuple[str | None, Ack]] = []
        self.client.subscribe(self.topics.prefix + "/agents/+/acks", self._on_ack)
        self.client.subscribe(self.topics.prefix + "/agents/+/tasks",
                              lambda t, p: self.tasks.append(parse_message(Task, p)))

    def _on_ack(self, topic: str, payload: bytes) -> None:
        ack = parse_message(Ack, payload)
        self.acks.append(ack)
        self.agent_acks.append((self.topics.parse(topic).agent, ack))

    def send(self, agent: str, round_id: int, frame: bytes, transfer: str = "u") -> None:
        for c in split(frame, transfer, 4096):
            self.client.publish(self.topics.updates(agent, round_id), c)

    def wait(self, cond, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
        t0 = time.monotonic()
        while not cond():
            assert time.monotonic() - t0 < timeout, "timed out"
            time.sleep(0.02)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path, ["a1", "a2"], min_clients=2)
    harness.thread.start()
    harness.wait(lambda: harness.tasks)
    yield harness
    harness.stop.set()
    harness.thread.join(5)


def _frame(agent: str, tensors: Tensors, round_id: int = 1, base: str = "v0", **kw: object) -> bytes:
    return encode_update(tensors, agent_id=agent, round_id=round_id, base_version=base, sample_count=10,
                         **kw)  # type: ignore[arg-type]


def test_bad_updates_are_refused_with_reasons_and_the_round_goes_on(h: Harness) -> None:
    base = _init()
    good = {k: v + 0.01 for k, v in base.items()}
    wrong_shape = dict(base)
    wrong_shape[next(iter(base))] = np.zeros((1,), np.float32)
    nonfinite = {k: v.copy() for k, v in base.items()}
    next(iter(nonfinite.values())).flat[0] = np.inf
    h.send("a1", 1, _frame("a1", wrong_shape), "t1")
    h.send("a1", 1, _frame("a1", nonfinite), "t2")
    h.send("a1", 1, _frame("a2", good), "t3")  # frame claims another agent
    h.send("a1", 1, _frame("a1", good, base="v9"), "t4")  # trained from the wrong base
    h.send("a1", 7, _frame("a1", good, round_id=7), "t5")  # round not open
    h.send("nobody", 1, _frame("nobody", good), "t6")  # not enrolled
    h.client.publish(h.topics.updates("a1", 1), b"garbage, not a chunk at all")
    expected = {"shape_mismatch", "non_finite", "topic_mismatch", "stale_base", "round_closed", "not_enrolled",
                "bad_magic"}
    h.wait(lambda: expected <= {e.reason for e in h.store.list_events("update_rejected")})
    assert h.store.list_updates(1) == []
    rejected = {a.reason for a in h.acks if a.status == "rejected"}
    assert {"shape_mismatch", "non_finite", "round_closed", "not_enrolled"} <= rejected
    # the round goes on: two good updates complete it
    h.send("a1", 1, _frame("a1", good), "g1")
    h.send("a2", 1, _frame("a2", good), "g2")
    h.wait(lambda: (r := h.store.get_round(1)) is not None and r.status == "complete")
    assert sorted(u.agent_id for u in h.store.list_updates(1)) == ["a1", "a2"]
    phases = (h.store.get_round(1).detail or {})["phases_ms"]  # type: ignore[union-attr]
    assert set(phases) == {"aggregate", "evaluate", "manifest", "save"} and all(v >= 0 for v in phases.values())


def test_duplicate_update_is_acknowledged_once_and_counted_once(h: Harness) -> None:
    base = _init()
    f = _frame("a1", {k: v + 0.01 for k, v in base.items()})
    h.send("a1", 1, f, "d1")
    h.wait(lambda: any(a.status == "accepted" for a in h.acks))
    h.send("a1", 1, f, "d1")  # resend of the same update
    h.send("a1", 1, _frame("a1", base), "d2")  # a different second update for the same round
    h.wait(lambda: sum(a.status == "duplicate" for a in h.acks) >= 2)
    assert len(h.store.list_updates(1)) == 1


def test_missing_chunks_are_named_in_the_ack(h: Harness) -> None:
    base = _init()
    chunks = split(_frame("a1", base), "m1", 1024)
    assert len(chunks) > 3
    for i, c in enumerate(chunks):
        if i != 1:
            h.client.publish(h.topics.updates("a1", 1), c)
    h.wait(lambda: any(a.status == "incomplete" for a in h.acks))
    ack = next(a for a in h.acks if a.status == "incomplete")
    assert ack.missing == [1]
    h.client.publish(h.topics.updates("a1", 1), chunks[1])
    h.wait(lambda: any(a.status == "accepted" for a in h.acks))


def test_codec_per_device_profile(tmp_path: Path) -> None:
    """With codec "profile", each agent's task carries its firmware profile's uplink codec."""
    hz = Harness(tmp_path, [], min_clients=1,
                 settings=RoundSettings(rounds=1, min_clients=1, deadline_s=30, codec="profile"))
    hz.store.enroll_agent("cxr", "xray-cxr-28", [])
    hz.store.enroll_agent("gpu", "xray-gpu-224", [])
    hz.store.enroll_agent("odd", "no-such-profile", [])
    hz.coord.tasks.announce(RoundTask(1, "v0", time.time() + 30))
    hz.wait(lambda: len(hz.tasks) >= 3)
    codecs = sorted(t.codec for t in hz.tasks)
    assert codecs == sorted(["raw", "delta|topk:0.01|ef|q:8|zstd", "raw"])


def test_another_agents_update_id_is_no_duplicate(h: Harness) -> None:
    """a1 uploads first under the id a2 will use: a2 is still accepted, never told "duplicate" (issue 15 item 1)."""
    base = _init()
    good = {k: v + 0.01 for k, v in base.items()}
    taken = "a2-r1-00000000"  # predictable ids were {agent}-r{round}-{hash of the seed}
    h.send("a1", 1, _frame("a1", good, update_id=taken), taken)
    h.wait(lambda: ("a1", "accepted") in {(a, k.status) for a, k in h.agent_acks})
    h.send("a2", 1, _frame("a2", good, update_id=taken), taken)
    h.wait(lambda: any(a == "a2" for a, _ in h.agent_acks))
    assert [k.status for a, k in h.agent_acks if a == "a2"] == ["accepted"]
    h.wait(lambda: (r := h.store.get_round(1)) is not None and r.status == "complete")
    assert {(u.agent_id, u.update_id) for u in h.store.list_updates(1)} == {("a1", taken), ("a2", taken)}


def _with_header(frame: bytes, old: bytes, new: bytes) -> bytes:
    """The frame with ``old`` replaced by ``new`` in its header JSON (what a hostile box can send)."""
    from protocol import envelope
    from protocol.frame import FRAME_FORMAT, FRAME_MAGIC, MAX_HEADER_BYTES

    head, payload = envelope.unpack(frame, magic=FRAME_MAGIC, fmt=FRAME_FORMAT, max_header=MAX_HEADER_BYTES,
                                    what="frame")
    assert old in head
    return envelope.pack(FRAME_MAGIC, FRAME_FORMAT, head.replace(old, new), payload)


def test_malformed_updates_are_answered_and_leave_no_blob(h: Harness, tmp_path: Path) -> None:
    """NaN in metrics, a count above the database's integer range, thousands of metrics: each is
    answered "rejected" with a reason and nothing is written (issue 15 item 7). They used to be
    written to the blob store, then refused by the store with no answer, resent until the deadline."""
    base = _init()
    good = {k: v + 0.01 for k, v in base.items()}
    nan = _with_header(encode_update(good, agent_id="a1", round_id=1, base_version="v0", sample_count=10,
                                     metrics={"loss": 0.5}), b'"loss":0.5', b'"loss":NaN')
    huge_count = encode_update(good, agent_id="a1", round_id=1, base_version="v0", sample_count=2**31)
    many = encode_update(good, agent_id="a1", round_id=1, base_version="v0", sample_count=10,
                         metrics={f"metric_{i}": 1.0 for i in range(5000)})
    for i, frame in enumerate((nan, huge_count, many)):
        h.send("a1", 1, frame, f"bad-{i}")
    h.wait(lambda: sum(a.status == "rejected" for a in h.acks) == 3)
    assert sorted(a.reason or "" for a in h.acks) == ["bad_header", "non_finite", "too_large"]
    assert list(BlobStore(tmp_path / "blobs").iter_shas()) == [] and h.store.list_updates(1) == []
    h.send("a1", 1, _frame("a1", good), "good")  # the round goes on
    h.wait(lambda: any(a.status == "accepted" for a in h.acks))


def test_transfers_are_kept_per_agent(h: Harness) -> None:
    """Another agent's chunks under the same transfer id, or 300 junk transfers, leave a victim's
    partial upload alone (issue 15 item 2: one reassembler keyed by transfer id let them throw it away)."""
    base = _init()
    victim = split(_frame("a1", {k: v + 0.01 for k, v in base.items()}), "shared-id", 1024)
    assert len(victim) > 3
    for c in victim[:-1]:  # all but its last chunk
        h.client.publish(h.topics.updates("a1", 1), c)
    for i in range(300):  # junk from a2: partial transfers that never complete
        h.client.publish(h.topics.updates("a2", 1), split(b"x" * 2048, f"junk-{i}", 1024)[0])
    h.send("a2", 1, _frame("a2", {k: v - 0.01 for k, v in base.items()}), "shared-id")  # same id, other agent
    h.wait(lambda: ("a2", "accepted") in {(a, k.status) for a, k in h.agent_acks})
    h.client.publish(h.topics.updates("a1", 1), victim[-1])
    h.wait(lambda: ("a1", "accepted") in {(a, k.status) for a, k in h.agent_acks})
    assert not any(k.status == "rejected" for _, k in h.agent_acks)

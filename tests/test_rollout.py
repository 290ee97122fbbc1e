"""Model lifecycle, the rollout state machine (stages, gates, automatic rollback, pause/resume,
restart), its refusals, the driver's desired shadows, and the coordinator in ``--rollout manual``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.lifecycle import LifecycleError, transition
from coordinator.model_repo import ModelRepository
from coordinator.rollout import (
    AgentReport,
    GateConfig,
    RolloutController,
    RolloutDriver,
    RolloutError,
    evaluate,
    order_agents,
    plan_stages,
)
from coordinator.rounds import Coordinator, ModelSpec, RoundSettings
from coordinator.store import BlobStore, RolloutRecord, Store, open_store
from coordinator.strategies import build_strategy
from protocol.chunks import split
from protocol.frame import encode_update
from protocol.manifest import Architecture, InputSpec, Manifest, TensorEntry
from protocol.messages import Shadow, parse_message
from protocol.signing import SigningKey, TrustStore
from protocol.topics import Topics
from protocol.transport import MemoryBroker, MemoryTransport

AGENTS = [f"box-{i:02d}" for i in range(10)]
HASH = "ab" * 32


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def _manifest(version: str, key: SigningKey | None) -> dict[str, object]:
    m = Manifest(version=version, architecture=Architecture(name="small_cnn"), classes=["a", "b"],
                 input=InputSpec(channels=1, height=28, width=28), tensors=[TensorEntry(name="w", shape=(2,))],
                 tensor_hash=HASH)
    return (key.sign_manifest(m) if key else m).model_dump(mode="json")


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def store(tmp_path: Path, key: SigningKey) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    for i, a in enumerate(AGENTS):
        s.enroll_agent(a, "xray-cxr-28", ["eu", "ward"] if i % 5 else ["eu"])
        s.set_desired_version(a, "v0")
        s.set_reported_version(a, "v0")
    s.enroll_agent("ct-1", "ct-head-64", ["eu", "ward"])
    s.add_model(version="v0", parent=None, round_id=None, manifest=_manifest("v0", key), participants=[],
                state="active")
    s.add_model(version="v1", parent="v0", round_id=None, manifest=_manifest("v1", key), participants=[])
    s.add_model(version="v2", parent="v0", round_id=None, manifest=_manifest("v2", SigningKey.generate()),
                participants=[])
    yield s
    s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ctl(store: Store, key: SigningKey, clock: Clock) -> RolloutController:
    trust = TrustStore()
    trust.trust(key.public_raw)
    return RolloutController(store, trust=trust, clock=clock)


def _served(r: RolloutRecord, version: str, clock: Clock, **kw: object) -> dict[str, AgentReport]:
    return {a: AgentReport(version=version, at=clock.t, **kw) for a in r.agents[: r.stages[r.stage]]}  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- pure parts
def test_plan_stages() -> None:
    assert plan_stages(10, [5, 25, 100]) == [1, 3, 10]
    assert plan_stages(100, [5, 25, 100]) == [5, 25, 100]
    assert plan_stages(3, [5, 25, 100]) == [1, 2, 3]  # every stage adds at least one agent
    assert plan_stages(1, [5, 25, 100]) == [1]  # stages that would add nobody are dropped
    assert plan_stages(40, [10, 100]) == [4, 40]
    for bad in ([], [25, 5, 100], [5, 25], [0, 100], [5, 5, 100], [5, 150]):
        with pytest.raises(RolloutError) as info:
            plan_stages(10, bad)
        assert info.value.reason == "bad_stages"
    with pytest.raises(RolloutError) as info:
        plan_stages(0, [100])
    assert info.value.reason == "empty_cohort"


def test_agent_order_is_deterministic_and_per_version() -> None:
    assert order_agents(AGENTS, "v1") == order_agents(list(reversed(AGENTS)), "v1")
    assert sorted(order_agents(AGENTS, "v1")) == AGENTS
    assert order_agents(AGENTS, "v1") != order_agents(AGENTS, "v2")  # the canary is not always the same box


def test_lifecycle_transitions(store: Store) -> None:
    with pytest.raises(LifecycleError) as info:
        transition(store, "v1", "active")  # candidate cannot skip approval
    assert info.value.reason == "bad_transition"
    assert store.get_model("v1").state == "candidate"  # type: ignore[union-attr]
    with pytest.raises(LifecycleError) as info:
        transition(store, "nope", "approved")
    assert info.value.reason == "unknown_version"
    with pytest.raises(LifecycleError) as info:
        transition(store, "v1", "live")
    assert info.value.reason == "unknown_state"
    for state in ("approved", "canary", "active", "retired"):
        assert transition(store, "v1", state).state == state
    with pytest.raises(LifecycleError):
        transition(store, "v1", "approved")  # retired is final
    assert [e.detail["to"] for e in store.list_events("model_state")] == ["approved", "canary", "active", "retired"]  # type: ignore[index]


def test_gate_evaluation(store: Store, ctl: RolloutController, clock: Clock) -> None:
    ctl.approve("v1")
    r = ctl.start("v1", profile="xray-cxr-28", tags=["eu"], stages=[10, 100], gates=GateConfig(soak_s=5, stage_timeout_s=60,
                                                                         max_error_rate=0.1, max_p95_ms=200))
    canary = r.agents[0]
    assert evaluate(r, {}, clock.t).action == "wait"
    assert evaluate(r, {}, clock.t + 61).reason == "install_timeout"
    assert evaluate(r, {canary: AgentReport("v0", at=clock.t, refused="v1", reason="unknown_key")},
                    clock.t).reason == "install_refused"
    # a refusal reported before this rollout started does not count
    assert evaluate(r, {canary: AgentReport("v0", at=clock.t - 10, refused="v1")}, clock.t).action == "wait"
    assert evaluate(r, {canary: AgentReport("v1", error_rate=0.5)}, clock.t).reason == "error_rate"
    assert evaluate(r, {canary: AgentReport("v1", p95_ms=900)}, clock.t).reason == "latency_p95"
    assert evaluate(r, {canary: AgentReport("v1", val_accuracy=0.5, val_accuracy_active=0.9)},
                    clock.t).reason == "accuracy"
    ok = evaluate(r, {canary: AgentReport("v1", error_rate=0.01, p95_ms=50, val_accuracy=0.89,
                                          val_accuracy_active=0.9)}, clock.t)
    assert ok.action == "wait" and ok.healthy_since == clock.t  # soak starts
    with pytest.raises(RolloutError) as info:
        GateConfig(soak_s=-1)
    assert info.value.reason == "bad_config"


# ---------------------------------------------------------------------------------- controller
def test_bad_rollouts_are_refused_and_state_is_unchanged(store: Store, ctl: RolloutController) -> None:
    def refused(version: str, **kw: object) -> str:
        with pytest.raises(RolloutError) as info:
            ctl.start(version, **kw)  # type: ignore[arg-type]
        return info.value.reason

    models_before = [(m.version, m.state) for m in store.list_models()]
    assert refused("v9") == "unknown_version"
    assert refused("v1") == "not_approved"  # still a candidate
    ctl.approve("v1")
    ctl.approve("v2")
    assert refused("v2") == "untrusted_unknown_key"  # signed by a key the fleet does not trust
    assert refused("v1", tags=["no-such-tag"]) == "empty_cohort"
    assert refused("v1", profile="mri-knee-128") == "empty_cohort"
    assert refused("v1", stages=[50, 10, 100]) == "bad_stages"
    assert store.list_rollouts() == []
    assert [(m.version, m.state) for m in store.list_models()] == [
        (v, "approved" if v in ("v1", "v2") else s) for v, s in models_before]
    assert all(a.desired_version == "v0" for a in store.list_agents() if a.agent_id in AGENTS)
    with pytest.raises(RolloutError) as info:
        ctl.approve("v1")  # approved → approved is not a transition
    assert info.value.reason == "bad_transition"
    for cmd in (ctl.pause, ctl.resume, ctl.rollback):
        with pytest.raises(RolloutError) as info:
            cmd(None)
        assert info.value.reason == "unknown_rollout"


def test_staged_rollout_reaches_everyone(store: Store, ctl: RolloutController, clock: Clock) -> None:
    ctl.approve("v1")
    r = ctl.start("v1", profile="xray-cxr-28", tags=["eu"], gates=GateConfig(soak_s=10))
    assert r.stages == [1, 3, 10] and sorted(r.agents) == AGENTS  # the ct box is not in the cohort
    assert store.get_model("v1").state == "canary"  # type: ignore[union-attr]
    with pytest.raises(RolloutError) as info:
        ctl.start("v0", tags=["eu"])  # an active model may go to another cohort, but not while one is open
    assert info.value.reason == "rollout_open"
    seen = []
    for _ in range(40):
        if r.state != "running":
            break
        seen.append(r.stages[r.stage])
        r = ctl.tick(_served(r, "v1", clock))  # type: ignore[assignment]
        clock.t += 4
    assert r.state == "complete"
    assert sorted(set(seen)) == [1, 3, 10]
    assert store.get_model("v1").state == "active"  # type: ignore[union-attr]
    assert [e.detail["agents"] for e in store.list_events("rollout_stage")] == [3, 10]  # type: ignore[index]


def test_soak_must_hold_and_a_stage_waits_for_every_agent(store: Store, ctl: RolloutController, clock: Clock) -> None:
    ctl.approve("v1")
    r = ctl.start("v1", tags=["eu"], gates=GateConfig(soak_s=10))
    r = ctl.tick(_served(r, "v1", clock))  # type: ignore[assignment]
    assert r.healthy_since == clock.t and r.stage == 0
    clock.t += 5
    r = ctl.tick(_served(r, "v1", clock))  # type: ignore[assignment]
    assert r.stage == 0  # soak not over
    clock.t += 6
    r = ctl.tick(_served(r, "v1", clock))  # type: ignore[assignment]
    assert r.stage == 1 and r.healthy_since is None
    partial = _served(r, "v1", clock)
    partial.pop(r.agents[2])  # one stage agent still on v0
    for _ in range(5):
        clock.t += 20
        r = ctl.tick(partial)  # type: ignore[assignment]
    assert r.stage == 1 and r.state == "running" and r.healthy_since is None


def test_failed_gate_rolls_the_stage_back_and_retires_the_model(store: Store, ctl: RolloutController, clock: Clock
                                                                ) -> None:
    ctl.approve("v1")
    r = ctl.start("v1", tags=["eu"], gates=GateConfig(soak_s=0, max_error_rate=0.05))
    r = ctl.tick(_served(r, "v1", clock))  # type: ignore[assignment]
    assert r.stage == 1
    reports = _served(r, "v1", clock)
    reports[r.agents[1]] = AgentReport("v1", at=clock.t, error_rate=0.3)
    r = ctl.tick(reports)  # type: ignore[assignment]
    assert r.state == "rolling_back" and r.reason == "error_rate" and r.detail["agent"] == r.agents[1]  # type: ignore[index]
    assert store.get_model("v1").state == "retired"  # type: ignore[union-attr]


def test_pause_resume_and_manual_rollback(store: Store, ctl: RolloutController, clock: Clock) -> None:
    ctl.approve("v1")
    r = ctl.start("v1", tags=["eu"], gates=GateConfig(soak_s=5))
    r = ctl.pause()
    assert r.state == "paused"
    with pytest.raises(RolloutError) as info:
        ctl.pause()
    assert info.value.reason == "bad_state"
    for _ in range(5):  # paused: healthy reports and time do not move it
        clock.t += 10
        r = ctl.tick(_served(r, "v1", clock))  # type: ignore[assignment]
    assert r.state == "paused" and r.stage == 0
    with pytest.raises(RolloutError):
        ctl.resume(r.rollout_id + 1)
    r = ctl.resume()
    assert r.state == "running" and r.stage_started_at == clock.t
    r = ctl.tick(_served(r, "v1", clock))  # type: ignore[assignment]
    clock.t += 6
    r = ctl.tick(_served(r, "v1", clock))  # type: ignore[assignment]
    assert r.stage == 1
    r = ctl.rollback()
    assert r.state == "rolling_back" and r.reason == "manual"
    assert store.get_model("v1").state == "approved"  # type: ignore[union-attr]  # a person may retry
    with pytest.raises(RolloutError) as info:
        ctl.resume()
    assert info.value.reason == "bad_state"


def test_restart_resumes_the_rollout_from_the_store(tmp_path: Path, store: Store, ctl: RolloutController,
                                                    clock: Clock) -> None:
    ctl.approve("v1")
    r = ctl.start("v1", tags=["eu"], gates=GateConfig(soak_s=0))
    r = ctl.tick(_served(r, "v1", clock))  # type: ignore[assignment]
    assert r.stage == 1
    reopened = open_store(f"sqlite:///{tmp_path / 'state.db'}")  # a restarted coordinator
    try:
        again = RolloutController(reopened, clock=clock)
        r2 = again.get(None)
        assert (r2.rollout_id, r2.stage, r2.agents, r2.previous) == (r.rollout_id, 1, r.agents, r.previous)
        r2 = again.tick(_served(r2, "v1", clock))  # type: ignore[assignment]
        assert r2.stage == 2
    finally:
        reopened.close()


# ---------------------------------------------------------------------------------- driver
class Net:
    def __init__(self) -> None:
        self.broker = MemoryBroker()
        self.topics = Topics()
        self.transport = MemoryTransport(self.broker, "coordinator")
        self.transport.connect()

    def desired(self, agent: str) -> str | None:
        got = self.broker.retained(self.topics.shadow_desired(agent))
        return parse_message(Shadow, got[0][1]).version if got else None

    def ever_desired(self, version: str) -> set[str]:
        out = set()
        for topic, payload in self.broker.log:
            if topic.endswith("/shadow/desired") and parse_message(Shadow, payload).version == version:
                out.add(self.topics.parse(topic).agent or "")
        return out


def test_driver_canary_refusal_rolls_back_and_nobody_else_gets_the_model(store: Store, ctl: RolloutController,
                                                                         clock: Clock) -> None:
    net = Net()
    published: list[str] = []
    driver = RolloutDriver(ctl, net.transport, net.topics, publish_manifest=published.append)
    ctl.approve("v1")
    r = ctl.start("v1", tags=["eu"], gates=GateConfig(soak_s=0))
    canary = r.agents[0]
    driver.step()
    assert published == ["v1"] and net.desired(canary) == "v1"
    assert store.get_agent(canary).desired_version == "v1"  # type: ignore[union-attr]
    assert net.ever_desired("v1") == {canary}
    # the canary refuses it (e.g. its trust store does not know the key); the agent keeps serving v0
    driver.on_report(canary, Shadow(version="v0", detail={"agent": canary, "refused": "v1", "reason": "unknown_key"},
                                    at=clock.t))
    r = driver.step()  # type: ignore[assignment]
    assert r.state == "rolled_back" and r.reason == "install_refused"
    assert r.detail == {"agent": canary, "agent_reason": "unknown_key"}
    assert net.desired(canary) == "v0" and store.get_agent(canary).desired_version == "v0"  # type: ignore[union-attr]
    assert net.ever_desired("v1") == {canary}, "no agent outside the canary was ever told to serve v1"
    assert store.get_model("v1").state == "retired"  # type: ignore[union-attr]
    driver.step()  # closed rollouts are left alone
    assert net.desired(canary) == "v0"


def test_driver_runs_a_rollout_to_the_end(store: Store, ctl: RolloutController, clock: Clock) -> None:
    net = Net()
    driver = RolloutDriver(ctl, net.transport, net.topics, period_s=0.01)
    ctl.approve("v1")
    ctl.start("v1", profile="xray-cxr-28", tags=["eu"], gates=GateConfig(soak_s=0))
    stop = threading.Event()
    th = threading.Thread(target=driver.run, args=(stop,), daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # fake agents: install whatever they are told to serve
            for a in AGENTS:
                v = net.desired(a)
                if v is not None:
                    driver.on_report(a, Shadow(version=v, at=clock.t))
            r = ctl.get(None)
            if r.state == "complete":
                break
            time.sleep(0.02)
    finally:
        stop.set()
        th.join(5)
    assert ctl.get(None).state == "complete"
    assert all(net.desired(a) == "v1" for a in AGENTS)
    assert net.desired("ct-1") == "v0"  # outside the cohort: adopted the active model, never v1
    assert store.get_model("v1").state == "active"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------- coordinator
SPEC = ModelSpec("small_cnn", {"in_channels": 1, "num_classes": 2, "width": 4, "norm": "group"}, ["a", "b"],
                 InputSpec(channels=1, height=28, width=28))


def _init():  # type: ignore[no-untyped-def]
    import torch

    from learning.models import build_model
    from learning.state import get_tensors

    torch.manual_seed(0)
    return get_tensors(build_model(SPEC.architecture, **SPEC.kwargs))


def _wait(cond, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)


def test_manual_mode_round_models_are_signed_candidates_and_bad_shadows_are_refused(tmp_path: Path) -> None:
    key = SigningKey.generate()
    trust = TrustStore()
    trust.trust(key.public_raw)
    net = Net()
    st = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    for a in ("a1", "a2"):
        st.enroll_agent(a, "xray-cxr-28", [])
    coord = Coordinator(store=st, blobs=BlobStore(tmp_path / "blobs"), repo=ModelRepository(tmp_path / "models"),
                        transport=net.transport, topics=net.topics, strategy=build_strategy("fedavg"),
                        settings=RoundSettings(rounds=1, min_clients=2, deadline_s=30, reannounce_s=0.2,
                                               rollout="manual"),
                        model_spec=SPEC, initial_tensors=_init, signer=key)
    coord.start()
    stop = threading.Event()
    th = threading.Thread(target=coord.run, args=(stop,), daemon=True)
    th.start()
    client = MemoryTransport(net.broker, "agent-sim")
    client.connect()
    try:
        assert net.desired("a1") == "v0"  # the initial model is served by everyone
        base = _init()
        for a in ("a1", "a2"):
            frame = encode_update({k: v + 0.01 for k, v in base.items()}, agent_id=a, round_id=1, base_version="v0",
                                  sample_count=10)
            _wait(lambda: st.get_round(1) is not None)
            for c in split(frame, f"u-{a}", 4096):
                client.publish(net.topics.updates(a, 1), c)
        _wait(lambda: (r := st.get_round(1)) is not None and r.status == "complete")
        v1 = st.get_model("v1")
        assert v1 is not None and v1.state == "candidate"
        assert trust.verify_manifest(Manifest.model_validate(v1.manifest)) == key.key_id
        assert trust.verify_manifest(ModelRepository(tmp_path / "models").manifest("v1")) == key.key_id
        assert net.broker.retained(net.topics.model_manifest("v1")), "agents can train from the candidate"
        assert net.desired("a1") == net.desired("a2") == "v0", "but nobody is told to serve it"

        # shadow reports: one claiming to be another agent, one naming an unknown model: refused, unchanged
        client.publish(net.topics.shadow_reported("a1"), Shadow(version="v1", detail={"agent": "a2"}).to_bytes())
        client.publish(net.topics.shadow_reported("a1"), Shadow(version="v77", detail={"agent": "a1"}).to_bytes())
        _wait(lambda: {"topic_mismatch", "unknown_version"} <= {e.reason for e in st.list_events("shadow_rejected")})
        assert st.get_agent("a1").reported_version is None  # type: ignore[union-attr]
        client.publish(net.topics.shadow_reported("a1"), Shadow(version="v0", detail={"agent": "a1"}).to_bytes())
        _wait(lambda: st.get_agent("a1").reported_version == "v0")  # type: ignore[union-attr]
    finally:
        stop.set()
        th.join(5)
        st.close()


def test_store_rollout_contract(store: Store) -> None:
    r = store.create_rollout(version="v1", cohort={"tags": []}, stages=[1, 2], agents=["box-00", "box-01"],
                             previous={"box-00": "v0", "box-01": None}, config={"soak_s": 1})
    assert (r.state, r.stage, r.previous) == ("running", 0, {"box-00": "v0", "box-01": None})
    from coordinator.store import DuplicateError, NotFoundError, StoreError

    with pytest.raises(DuplicateError):
        store.create_rollout(version="v1", cohort={}, stages=[1], agents=["box-00"], previous={}, config={})
    with pytest.raises(StoreError):
        store.update_rollout(r.rollout_id, expect_state="paused", state="running")
    assert store.update_rollout(r.rollout_id, expect_state="running", state="complete").state == "complete"
    with pytest.raises(ValueError):
        store.update_rollout(r.rollout_id, agents=[])
    with pytest.raises(ValueError):
        store.update_rollout(r.rollout_id, state="exploded")
    with pytest.raises(NotFoundError):
        store.update_rollout(999, state="paused")
    with pytest.raises(NotFoundError):
        store.create_rollout(version="v9", cohort={}, stages=[1], agents=["a"], previous={}, config={})
    with pytest.raises(ValueError):
        store.create_rollout(version="v1", cohort={}, stages=[2, 1], agents=["a", "b"], previous={}, config={})
    assert [x.rollout_id for x in store.list_rollouts()] == [r.rollout_id]


def test_a_rollback_carries_the_signed_order_agents_require(store: Store, ctl: RolloutController,
                                                           clock: Clock) -> None:
    """Going back to an older version needs a signed RollbackOrder (issue 15 item 5): the driver signs one
    per agent, for exactly the move it asks for; moving forward carries none."""
    key = SigningKey.generate()
    trust = TrustStore()
    trust.trust(key.public_raw)
    net = Net()
    driver = RolloutDriver(ctl, net.transport, net.topics, signer=key)
    ctl.approve("v1")
    r = ctl.start("v1", tags=["eu"], gates=GateConfig(soak_s=0))
    canary = r.agents[0]
    driver.step()
    forward = parse_message(Shadow, net.broker.retained(net.topics.shadow_desired(canary))[0][1])
    assert forward.version == "v1" and forward.rollback is None
    ctl.rollback()
    driver.step()
    back = parse_message(Shadow, net.broker.retained(net.topics.shadow_desired(canary))[0][1])
    assert back.version == "v0" and back.rollback is not None
    order = back.rollback
    assert (order.fleet, order.agent_id, order.from_version, order.to_version) == (net.topics.fleet, canary, "v1", "v0")
    assert trust.verify_rollback(order) == key.key_id

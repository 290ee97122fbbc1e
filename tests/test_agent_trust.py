"""Model trust on by default (issue 15 item 5, agent side): a trust store is required to start,
models only move forward unless a signed rollback order says otherwise, and every (re-)activation,
start-up included, is verified against the trust store as it is now."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import FLEET_KEY, tiny_manifest, tiny_trust, tiny_v0
from typer.testing import CliRunner

from coordinator.rollout import rollback_shadow
from edge_agent.agent import AgentSettings, EdgeAgent
from edge_agent.installer import ModelInstaller
from edge_agent.trust import TrustConfigError, TrustSource, trust_for_agent
from fedscan.cli import app
from firmware.profile import find_profile
from protocol.errors import ManifestError
from protocol.messages import AgentEvent, RollbackOrder, Shadow, parse_message
from protocol.signing import SignatureError, SigningKey, TrustStore
from protocol.topics import Topics
from protocol.transport import MemoryBroker, MemoryTransport

PROFILE = find_profile("xray-cxr-28")


def _versions() -> dict[str, tuple[object, dict[str, np.ndarray]]]:
    """v0 (created first), v1 and v2 (later), all signed by the fleet key."""
    _, w0 = tiny_v0()
    out = {}
    for i, version in enumerate(("v0", "v1", "v2")):
        w = {k: (v + np.float32(0.001 * i)).astype(np.float32) for k, v in w0.items()}
        out[version] = (tiny_manifest(version, w, created_at=1000.0 + i), w)
    return out


def _installer(root: Path, trust: TrustStore | TrustSource | None = None) -> ModelInstaller:
    inst = ModelInstaller(root, trust=trust if trust is not None else tiny_trust(), profile=PROFILE.name,
                          agent_id="box-1", fleet="default")
    for m, w in _versions().values():
        inst.install(m, w)  # type: ignore[arg-type]
    return inst


def _order(frm: str, to: str, *, at: float, agent: str = "box-1", fleet: str = "default",
           key: SigningKey | None = FLEET_KEY) -> RollbackOrder:
    order = RollbackOrder(fleet=fleet, agent_id=agent, from_version=frm, to_version=to, issued_at=at)
    return key.sign_rollback(order) if key is not None else order


# -- start-up rule ---------------------------------------------------------------------------------
def test_an_agent_without_a_trust_store_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(TrustConfigError, match="no trust store"):
        trust_for_agent(None, insecure_unsigned_models=False, environment="production")
    with pytest.raises(TrustConfigError, match="refused outside FEDSCAN_ENV=development"):
        trust_for_agent(None, insecure_unsigned_models=True, environment="production")
    assert trust_for_agent(None, insecure_unsigned_models=True, environment="development") is None
    path = tmp_path / "trust.json"
    tiny_trust().save(path)
    with pytest.raises(TrustConfigError, match="contradict"):
        trust_for_agent(path, insecure_unsigned_models=True, environment="development")
    assert FLEET_KEY.key_id in trust_for_agent(path, insecure_unsigned_models=False,  # type: ignore[union-attr]
                                               environment="production").current().keys
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TrustConfigError, match="bad_trust_store"):
        trust_for_agent(tmp_path / "bad.json", insecure_unsigned_models=False, environment="production")


def test_the_agent_command_exits_2_without_trust_and_insecure_mode_only_in_development(tmp_path: Path) -> None:
    base = ["agent", "--id", "box-1", "--broker", "127.0.0.1:9", "--state", str(tmp_path / "s")]
    runner = CliRunner()
    plain = runner.invoke(app, base, env={"FEDSCAN_ENV": "production"})
    assert plain.exit_code == 2 and "no trust store" in plain.output, plain.output
    insecure = runner.invoke(app, [*base, "--insecure-unsigned-models"], env={"FEDSCAN_ENV": "production"})
    assert insecure.exit_code == 2 and "development" in insecure.output, insecure.output


# -- forward only, back by signed order -------------------------------------------------------------
def test_versions_only_move_forward_without_a_signed_rollback_order(tmp_path: Path) -> None:
    inst = _installer(tmp_path / "box")
    inst.activate("v1")
    with pytest.raises(ManifestError) as info:
        inst.activate("v0")  # an older signed model, the random v0 included
    assert info.value.reason == "downgrade" and inst.active_version == "v1"
    inst.activate("v2")
    refused = [
        (_order("v2", "v1", at=50.0, key=None), "unsigned"),
        (_order("v2", "v1", at=50.0, key=SigningKey.generate()), "unknown_key"),
        (_order("v2", "v1", at=50.0).model_copy(update={"issued_at": 51.0}), "bad_signature"),
        (_order("v2", "v1", at=50.0, agent="box-2"), "rollback_wrong_agent"),
        (_order("v2", "v1", at=50.0, fleet="other"), "rollback_wrong_fleet"),
        (_order("v2", "v0", at=50.0), "rollback_wrong_target"),
        (_order("v1", "v0", at=50.0), "rollback_stale"),
    ]
    for order, reason in refused:
        with pytest.raises(ManifestError) as info:
            inst.activate(order.to_version if reason != "rollback_wrong_target" else "v1", rollback=order)
        assert info.value.reason == reason, order
        assert inst.active_version == "v2"
    order = _order("v2", "v1", at=50.0)
    assert inst.activate("v1", rollback=order).version == "v1"
    assert json.loads((inst.root / "ACTIVE").read_text())["last_rollback_at"] == 50.0
    inst.activate("v2")  # forward again (a rolled-back model may be rolled out again)
    with pytest.raises(ManifestError) as info:
        inst.activate("v1", rollback=order)  # the same order, replayed
    assert info.value.reason == "rollback_replayed" and inst.active_version == "v2"


# -- verification on every (re-)activation -----------------------------------------------------------
def test_a_retired_key_stops_reactivation_and_the_restarted_agent_serves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    tiny_trust().save(path)
    source = TrustSource(path)
    inst = _installer(tmp_path / "models", source)  # the agent below (state tmp_path) finds it
    inst.activate("v1")
    inst.activate("v1")  # re-activation verifies again: fine while the key is trusted
    retired = TrustStore.load(path)
    retired.retire(FLEET_KEY.key_id)
    retired.save(path)  # a new trust store provisioned to the box, no restart
    with pytest.raises(SignatureError) as info:
        inst.activate("v1")
    assert info.value.reason == "retired_key"

    broker = MemoryBroker()
    t = MemoryTransport(broker, "box-1")
    t.connect()
    agent = EdgeAgent(AgentSettings("box-1", PROFILE, tmp_path, trust=TrustSource(path)), t, None)
    served: list[str] = []
    agent.installer.add_listener(lambda m, w: served.append(m.version))
    agent.start()  # start-up re-verifies the ACTIVE model
    assert agent.serving is None and served == []
    events = [parse_message(AgentEvent, p) for topic, p in broker.log if topic.endswith("/events")]
    assert [(e.kind, e.detail.reason) for e in events] == [("install_refused", "retired_key")]


def _wait(cond: Callable[[], bool], timeout: float = 20) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)


def test_agent_refuses_a_desired_downgrade_and_obeys_the_coordinators_signed_rollback(tmp_path: Path) -> None:
    broker, topics = MemoryBroker(), Topics()
    t = MemoryTransport(broker, "box-1")
    t.connect()
    agent = EdgeAgent(AgentSettings("box-1", PROFILE, tmp_path, trust=tiny_trust()), t, None)
    for m, w in _versions().values():
        agent.installer.install(m, w)  # type: ignore[arg-type]
    coordinator = MemoryTransport(broker, "coordinator")
    coordinator.connect()
    reports: list[Shadow] = []
    coordinator.subscribe(topics.shadow_reported("box-1"), lambda _t, p: reports.append(parse_message(Shadow, p)))
    stop = threading.Event()
    agent.start()
    th = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    th.start()
    try:
        def desire(shadow: Shadow) -> None:
            coordinator.publish(topics.shadow_desired("box-1"), shadow.to_bytes(), retain=True)

        desire(Shadow(version="v1"))
        _wait(lambda: agent.serving == "v1")
        desire(Shadow(version="v0"))  # whoever can publish a desired shadow cannot bring back an old model
        _wait(lambda: any(r.detail.refused == "v0" for r in reports))
        refusal = next(r for r in reports if r.detail.refused == "v0")
        assert refusal.version == "v1" and refusal.detail.reason == "downgrade" and agent.serving == "v1"
        # the coordinator's rollout driver, rolling back, signs the order into the desired shadow
        desire(rollback_shadow(fleet="default", agent="box-1", from_version="v1", to_version="v0", signer=FLEET_KEY))
        _wait(lambda: bool(reports) and reports[-1].version == "v0")
        assert agent.serving == "v0" and "refused" not in reports[-1].detail
    finally:
        stop.set()
        th.join(5)

"""Integration: coordinator and agents as separate processes over a real mosquitto."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from fedproc import Federation, round_complete, stratified_parts, wait_for
from mqtt_broker import Broker
from simref import bitwise_diff, federation_training, simulate_federation

from coordinator.keys import ensure_signing_key, trust_path
from coordinator.model_repo import ModelRepository
from coordinator.store import open_store
from fedscan.compose import model_spec_for
from fedscan.experiments import split_metrics
from firmware.profile import find_profile
from learning.datasets import load_medmnist
from tools import forkserver

pytestmark = pytest.mark.integration


def _history(fed: Federation) -> list[tuple[str, str | None, list[str], str]]:
    store = open_store(f"sqlite:///{fed.state / 'state.db'}")
    try:
        return [(m.version, m.parent, sorted(m.participants), m.manifest["tensor_hash"]) for m in store.list_models()]
    finally:
        store.close()


def test_two_rounds_three_agent_processes(tmp_path: Path, broker: Broker, pneumonia_npz: Path) -> None:
    train = load_medmnist(pneumonia_npz, "train")
    # 2 local epochs, lr 0.02, class-balanced loss: balanced accuracy 0.77 in-process with these seeds
    fed = Federation(tmp_path, broker.port, pneumonia_npz, sizes=[600, 600, 600], rounds=2, local_epochs=2)
    fed.prepare(train.labels).close()
    fed.start_all()
    try:
        wait_for(lambda: round_complete(fed, 2), 240, "round 2 to complete", fed)
        # every agent installs the newest model and reports it through its shadow
        store = open_store(f"sqlite:///{fed.state / 'state.db'}")
        wait_for(lambda: all(a.reported_version == "v2" for a in store.list_agents()), 90, "agents to report v2", fed)
        store.close()
    finally:
        fed.stop()
    assert fed.coordinator is not None and fed.coordinator.returncode == 0, fed.logs()
    history = _history(fed)
    assert [h[:3] for h in history] == [("v0", None, []), ("v1", "v0", fed.sites), ("v2", "v1", fed.sites)]
    assert len({h[3] for h in history}) == 3, "the global model must change every round"
    repo = ModelRepository(fed.state / "models")
    spec = model_spec_for(find_profile("xray-cxr-28"))
    test = load_medmnist(pneumonia_npz, "test")
    final = split_metrics(spec, repo.tensors("v2"), test)
    assert final["balanced_accuracy"] >= 0.7, final
    cal = repo.manifest("v2").calibration  # temperature scaling fitted on the coordinator's validation split
    assert cal is not None and cal.fitted_on == "validation" and 0.05 < cal.temperature < 20


def test_coordinator_sigkill_mid_round_resumes_without_loss(tmp_path: Path, broker: Broker, pneumonia_npz: Path
                                                            ) -> None:
    """SIGKILL the coordinator in round 2 after some updates were acknowledged; restart it.
    The round completes, no acknowledged update is lost or counted twice, and the version
    history (versions, parents, participants, and even the weights) equals an uninterrupted run:
    the in-process simulation of the same federation, which tests/test_sim_equals_runtime.py shows
    computes bitwise what an uninterrupted federation of processes computes."""
    train = load_medmnist(pneumonia_npz, "train")
    sizes = [160, 480, 1400]  # different speeds, so round 2's updates arrive seconds apart
    fed = Federation(tmp_path, broker.port, pneumonia_npz, sizes=sizes, rounds=2)
    fed.prepare(train.labels).close()
    fed.start_all()
    try:
        store = open_store(f"sqlite:///{fed.state / 'state.db'}")
        wait_for(lambda: store.get_round(2) is not None and len(store.list_updates(2)) >= 1, 240,
                 "a first acknowledged update in round 2", fed, poll=0.02)
        fed.kill_coordinator()
        before = store.list_updates(2)
        assert 1 <= len(before) < len(sizes), "the kill must land mid-round"
        r2 = store.get_round(2)
        assert r2 is not None and r2.status == "collecting"
        time.sleep(1.0)  # agents keep working (and resending) while the coordinator is down
        fed.start_coordinator()
        wait_for(lambda: round_complete(fed, 2), 240, "round 2 after restart", fed)
        after = store.list_updates(2)
        store.close()
    finally:
        fed.stop()
    assert {u.update_id for u in before} <= {u.update_id for u in after}, "an acknowledged update was lost"
    assert sorted(u.agent_id for u in after) == sorted(fed.sites), "each agent counted exactly once"
    assert len({u.update_id for u in after}) == len(after)
    history = _history(fed)
    assert [h[:3] for h in history] == [("v0", None, []), ("v1", "v0", fed.sites), ("v2", "v1", fed.sites)]
    repo = ModelRepository(fed.state / "models")
    uninterrupted = simulate_federation(pneumonia_npz, fed.sites, stratified_parts(train.labels, sizes, fed.seed), 2,
                                        training=federation_training(fed.lr))
    for r, weights in enumerate(uninterrupted, start=1):
        assert bitwise_diff(weights, repo.tensors(f"v{r}")) == [], f"v{r} differs from the uninterrupted run"


def test_broker_killed_mid_round_round_completes(tmp_path: Path, broker: Broker, pneumonia_npz: Path) -> None:
    train = load_medmnist(pneumonia_npz, "train")
    fed = Federation(tmp_path, broker.port, pneumonia_npz, sizes=[300, 300, 900], rounds=2)
    fed.prepare(train.labels).close()
    fed.start_all()
    try:
        store = open_store(f"sqlite:///{fed.state / 'state.db'}")
        wait_for(lambda: store.get_round(1) is not None and len(store.list_updates(1)) >= 1, 240,
                 "round 1 underway", fed, poll=0.02)
        broker.stop()
        time.sleep(2.0)
        broker.start()  # a fresh broker: no sessions, no retained messages
        wait_for(lambda: round_complete(fed, 2), 300, "both rounds after the broker restart", fed)
        assert sorted(u.agent_id for u in store.list_updates(1)) == fed.sites
        store.close()
    finally:
        fed.stop()


def test_dead_broker_gives_clear_error_and_exit_code(tmp_path: Path) -> None:
    from mqtt_broker import free_port

    port = free_port()  # nothing listens here
    ensure_signing_key(tmp_path / "coord")
    t0 = time.monotonic()
    proc = subprocess.run(
        [*forkserver.command(), "agent", "--id", "site-x", "--broker", f"127.0.0.1:{port}",
         "--state", str(tmp_path / "s"), "--trust", str(trust_path(tmp_path / "coord"))],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert "unreachable after" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60, "retries must be bounded"


def test_unenrolled_and_malformed_inputs_are_refused_over_mqtt(tmp_path: Path, broker: Broker,
                                                               pneumonia_npz: Path) -> None:
    """Messages from an unknown agent, on a wrong topic, or malformed, are refused with reasons
    and counted; the enrolled agents' round still completes."""
    import paho.mqtt.client as mqtt

    train = load_medmnist(pneumonia_npz, "train")
    fed = Federation(tmp_path, broker.port, pneumonia_npz, sizes=[300, 300], rounds=1)
    fed.prepare(train.labels).close()
    fed.start_coordinator()
    store = open_store(f"sqlite:///{fed.state / 'state.db'}")
    try:
        wait_for(lambda: store.get_round(1) is not None, 120, "round 1 to open", fed)
        intruder = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="intruder")
        intruder.connect("127.0.0.1", broker.port)
        intruder.loop_start()
        from protocol.chunks import split
        from protocol.topics import Topics

        t = Topics()
        intruder.publish(t.updates("intruder", 1), split(b"x" * 100, "u1", 1024)[0], qos=1).wait_for_publish(5)
        intruder.publish(t.updates("site-1", 1), b"not a chunk", qos=1).wait_for_publish(5)
        intruder.publish(t.prefix + "/agents/site-1/updates/notanumber", b"x", qos=1).wait_for_publish(5)
        intruder.publish(t.model_request("site-2"), b"{bad json", qos=1).wait_for_publish(5)
        intruder.loop_stop()
        intruder.disconnect()
        wait_for(lambda: store.count_events("update_rejected") >= 2, 30, "rejections recorded", fed)
        reasons = {e.reason for e in store.list_events()}
        assert {"not_enrolled", "bad_magic"} <= reasons, reasons
        for name in fed.sites:
            fed.start_agent(name)
        wait_for(lambda: round_complete(fed, 1), 240, "round 1 to complete despite bad input", fed)
        assert sorted(u.agent_id for u in store.list_updates(1)) == fed.sites
    finally:
        store.close()
        fed.stop()

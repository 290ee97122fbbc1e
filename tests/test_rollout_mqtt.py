"""Integration: staged rollouts and signed models with the coordinator, 10 agents and the
``fedscan`` CLI as separate processes over a real mosquitto."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from fedproc import wait_for
from mqtt_broker import Broker

from coordinator.keys import ensure_signing_key
from coordinator.model_repo import ModelRepository
from coordinator.rollout import order_agents
from coordinator.store import Store, open_store
from protocol.messages import Shadow
from protocol.signing import SigningKey
from protocol.topics import Topics
from protocol.transport import MqttTransport
from tools import forkserver

pytestmark = pytest.mark.integration

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@dataclass
class Fleet:
    root: Path
    port: int
    agents: list[str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def state(self) -> Path:
        return self.root / "coordinator"

    def store(self) -> Store:
        return open_store(f"sqlite:///{self.state / 'state.db'}")

    def _spawn(self, name: str, args: list[str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            self.procs[name] = subprocess.Popen([*forkserver.command(), *args], stdout=fh,
                                                stderr=subprocess.STDOUT, env=ENV)

    def enroll(self, tags: list[str]) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        s = self.store()
        for a in self.agents:
            s.enroll_agent(a, "xray-cxr-28", tags)
        s.close()

    def start_coordinator(self) -> None:
        self._spawn("coordinator", ["coordinator", "--state", str(self.state), "--broker", f"127.0.0.1:{self.port}",
                                    "--rounds", "0", "--rollout", "manual", "--threads", "1"],
                    self.state / "coordinator.log")

    def start_agent(self, name: str) -> None:
        self._spawn(name, ["agent", "--id", name, "--broker", f"127.0.0.1:{self.port}", "--state",
                           str(self.root / name), "--threads", "1", "--trust", str(self.state / "keys" / "trust.json")],
                    self.root / name / "agent.log")

    def kill(self, name: str) -> None:
        p = self.procs.pop(name)
        forkserver.send_signal(p, signal.SIGKILL)  # the process itself, at once
        p.wait(10)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*forkserver.command(), *args, "--state", str(self.state)], env=ENV,
                              capture_output=True, text=True, timeout=60)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def logs(self) -> str:
        parts = []
        for log in [self.state / "coordinator.log", *(self.root / a / "agent.log" for a in self.agents)]:
            if log.exists():
                parts.append(f"===== {log}\n" + log.read_text(errors="replace")[-2500:])
        return "\n".join(parts)

    def up(self, store: Store, agents: list[str] | None = None) -> None:
        """Coordinator and agents (with the coordinator's trust store, provisioned first); all serve v0."""
        ensure_signing_key(self.state)  # what the coordinator would do on its first start
        self.start_coordinator()
        agents = self.agents if agents is None else agents
        for a in agents:
            self.start_agent(a)
        wait_for(lambda: all(x.reported_version == "v0" for x in store.list_agents() if x.agent_id in agents), 180,
                 "every agent on v0", None)

    def register(self, store: Store, version: str, key: SigningKey | None = None, **changes: object) -> None:
        """A new candidate model beside v0 (a perturbed copy), signed by ``key`` (default: the coordinator's)."""
        repo = ModelRepository(self.state / "models")
        base = repo.manifest("v0")
        rng = np.random.default_rng(len(version))
        tensors = {k: (v + rng.normal(0, 1e-3, v.shape)).astype(np.float32) for k, v in repo.tensors("v0").items()}
        from protocol.tensors import tensor_hash

        m = base.model_copy(update={"version": version, "parent": "v0", "tensor_hash": tensor_hash(tensors),
                                    "signature": None, "created_at": base.created_at + 1.0})  # newer: forward-only
        m = (key or SigningKey.load(self.state / "keys" / "signing.pem")).sign_manifest(m)
        m = m.model_copy(update=changes)  # changes after signing = tampering
        repo.save(m, tensors, {})
        store.add_model(version=version, parent="v0", round_id=None, manifest=m.model_dump(mode="json"),
                        participants=[], state="candidate")


def test_staged_rollout_to_ten_agent_processes_survives_a_coordinator_restart(tmp_path: Path, broker: Broker
                                                                             ) -> None:
    """10 agent processes, stages 1 → 3 → 10; the coordinator is SIGKILLed during stage 2 and resumes
    the rollout from the store; the last agent of the order is offline until stage 3 and catches up."""
    fleet = Fleet(tmp_path, broker.port, [f"box-{i:02d}" for i in range(10)])
    fleet.enroll(["eu", "radiology"])
    offline = order_agents(fleet.agents, "v1")[-1]
    store = fleet.store()
    try:
        fleet.up(store, [a for a in fleet.agents if a != offline])
        fleet.register(store, "v1")
        assert fleet.cli("model", "approve", "v1").returncode == 0
        started = fleet.cli("rollout", "start", "v1", "--cohort-tags", "eu,radiology", "--stages", "5,25,100",
                            "--soak", "4", "--stage-timeout", "90", "--json")
        assert started.returncode == 0, started.stderr
        plan = json.loads(started.stdout)
        assert plan["stages"] == [1, 3, 10] and plan["state"] == "running"
        order: list[str] = plan["agents"]
        assert order[-1] == offline

        seen: list[set[str]] = []

        def desired_v1() -> set[str]:
            got = {a.agent_id for a in store.list_agents() if a.desired_version == "v1"}
            if not seen or got != seen[-1]:
                seen.append(got)
            return got

        def stage_healthy(n: int) -> bool:
            desired_v1()
            r = store.list_rollouts()[-1]
            agents = {a.agent_id: a for a in store.list_agents()}
            return r.stage == 1 and all(agents[a].reported_version == "v1" for a in order[:n])

        wait_for(lambda: stage_healthy(3), 90, "stage 2 (3 agents) installed", None, poll=0.05)
        # SIGKILL the coordinator during stage 2's soak; a new one resumes the rollout from the store
        fleet.kill("coordinator")
        assert store.list_rollouts()[-1].state == "running"
        fleet.start_coordinator()
        wait_for(lambda: desired_v1() is not None and store.list_rollouts()[-1].stage == 2, 60, "stage 3", None)
        assert store.get_agent(offline).reported_version is None  # type: ignore[union-attr]
        fleet.start_agent(offline)  # back online: catches up from its retained desired shadow
        wait_for(lambda: desired_v1() is not None and store.list_rollouts()[-1].state == "complete", 120,
                 "rollout to complete", None, poll=0.05)
        wait_for(lambda: all(a.reported_version == a.desired_version == "v1" for a in store.list_agents()), 60,
                 "every agent to report v1", None)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{fleet.logs()}") from exc
    finally:
        fleet.stop()
        store.close()
    # stages in order, each a prefix of the rollout order: 1 agent, then 3, then all 10
    sizes = [len(s) for s in seen]
    assert sizes == sorted(sizes) and {1, 3, 10} <= set(sizes), sizes
    for s in seen:
        assert s == set(order[: len(s)])
    store = fleet.store()
    try:
        assert store.get_model("v1").state == "active"  # type: ignore[union-attr]
        assert store.count_events("install_refused") == 0
    finally:
        store.close()
    status = json.loads(fleet.cli("rollout", "status", "--json").stdout)
    assert status["state"] == "complete" and status["stage"] == 2
    fleet_ls = json.loads(fleet.cli("fleet", "ls", "--json").stdout)
    assert [(a["reported_version"], a["desired_version"]) for a in fleet_ls] == [("v1", "v1")] * 10
    assert "v1" in fleet.cli("model", "ls").stdout


def test_untrusted_and_tampered_manifests_are_refused_and_the_box_keeps_serving(tmp_path: Path, broker: Broker
                                                                                ) -> None:
    fleet = Fleet(tmp_path, broker.port, ["box-a", "box-b"])
    fleet.enroll(["eu"])
    store = fleet.store()
    topics = Topics()
    pub = MqttTransport("test-operator", "127.0.0.1", broker.port)
    try:
        fleet.up(store)
        fleet.register(store, "v7", key=SigningKey.generate())  # foreign key
        fleet.register(store, "v8", metrics={"val_accuracy": 0.99})  # right key, manifest altered after signing
        # the coordinator refuses to roll out the foreign-signed model: state unchanged
        assert fleet.cli("model", "approve", "v7").returncode == 0
        refused = fleet.cli("rollout", "start", "v7", "--cohort-tags", "eu", "--json")
        assert refused.returncode == 1 and json.loads(refused.stdout)["reason"] == "untrusted_unknown_key"
        assert store.list_rollouts() == []
        # something else tells the boxes to serve them anyway (the broker ACL would stop this; the box must too)
        pub.connect()
        for version in ("v7", "v8"):
            from coordinator.model_repo import ModelRepository

            m = ModelRepository(fleet.state / "models").manifest(version)
            pub.publish(topics.model_manifest(version), m.to_bytes(), retain=True)
        pub.publish(topics.shadow_desired("box-a"), Shadow(version="v7").to_bytes(), retain=True)
        pub.publish(topics.shadow_desired("box-b"), Shadow(version="v8").to_bytes(), retain=True)

        def reasons() -> dict[str, str | None]:
            out: dict[str, str | None] = {}
            for e in store.list_events("install_refused"):
                out[e.agent_id or ""] = e.reason
            return out

        wait_for(lambda: reasons() == {"box-a": "unknown_key", "box-b": "bad_signature"}, 60,
                 "both refusals reported", None)
        assert [a.reported_version for a in store.list_agents()] == ["v0", "v0"], "the boxes keep serving v0"
        for box, version in (("box-a", "v7"), ("box-b", "v8")):
            assert not (tmp_path / box / "models" / version).exists(), "nothing of a refused model is installed"
            assert json.loads((tmp_path / box / "models" / "ACTIVE").read_text())["active"] == "v0"
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{fleet.logs()}") from exc
    finally:
        pub.close()
        fleet.stop()
        store.close()

"""Hospital network in network namespaces: the agents reach the broker only through port 443.

Three virtual hosts (``ip netns``), joined by veth pairs: the broker host runs mosquitto on its
own loopback only, ``fedscan ws-bridge`` on 443 (TLS, fleet client certificates) and the
coordinator (to the broker over loopback); two hospital hosts run one agent each with
``--broker wss://<broker>:443/mqtt``. Nothing but 443 listens on the broker host's network
address, so "only 443" holds by construction, and the test checks it from an agent's host: a
plain MQTT connection to 1883 is refused, 443 answers. A federated round then completes with
both agents' updates. Needs root (``ip netns add``); skips with the reason elsewhere, and
deletes its namespaces (and with them the veths) even when it fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fedproc import Federation, wait_for

from coordinator.pki import FleetPKI
from coordinator.store import open_store
from learning.datasets import load_medmnist

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # 3 namespaces, 4 processes, 1 round: ~1-3 min

TAG = f"{os.getpid() % 100000}"
BROKER_NS, AGENT_NS = f"fsb{TAG}", [f"fsa1-{TAG}", f"fsa2-{TAG}"]


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


def _netns_usable() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); CI may not be root"
    probe = f"fsprobe{TAG}"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True, timeout=30)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"ip netns add is not permitted here: {getattr(exc, 'stderr', b'') or exc}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


@contextlib.contextmanager
def hospital_network() -> Iterator[list[str]]:
    """Broker host + two agent hosts; returns the broker's address as seen from each agent host."""
    for ns in [BROKER_NS, *AGENT_NS]:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)  # leftovers of a crash
    seen_from: list[str] = []
    try:
        for ns in [BROKER_NS, *AGENT_NS]:
            _ip("netns", "add", ns)
            _ip("link", "set", "lo", "up", ns=ns)
        for i, ns in enumerate(AGENT_NS, start=1):
            b, a = f"b{i}-{TAG}", f"a{i}-{TAG}"
            _ip("link", "add", b, "type", "veth", "peer", "name", a)
            _ip("link", "set", b, "netns", BROKER_NS)
            _ip("link", "set", a, "netns", ns)
            _ip("addr", "add", f"10.201.{i}.1/24", "dev", b, ns=BROKER_NS)
            _ip("addr", "add", f"10.201.{i}.2/24", "dev", a, ns=ns)
            _ip("link", "set", b, "up", ns=BROKER_NS)
            _ip("link", "set", a, "up", ns=ns)
            seen_from.append(f"10.201.{i}.1")
        yield seen_from
    finally:
        for ns in [BROKER_NS, *AGENT_NS]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _in(ns: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "ab") as fh:
        return subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=fh, stderr=subprocess.STDOUT, env=env)


def _tcp_from(ns: str, host: str, port: int) -> bool:
    code = (f"import socket,sys\ntry:\n socket.create_connection(({host!r},{port}),timeout=3).close()\n"
            "except OSError as e:\n print(e); sys.exit(1)\n")
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True,
                          timeout=60).returncode == 0


def _round_done(fed: Federation) -> bool:
    store = open_store(f"sqlite:///{fed.state / 'state.db'}")
    try:
        r = store.get_round(1)
        return r is not None and r.status == "complete"
    finally:
        store.close()


def test_agents_reach_the_fleet_only_through_443(tmp_path: Path, pneumonia_npz: Path) -> None:
    if (why := _netns_usable()) is not None:
        pytest.skip(why)
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto binary not installed")
    train = load_medmnist(pneumonia_npz, "train")
    fed = Federation(tmp_path / "fed", 1883, pneumonia_npz, sizes=[200, 200], rounds=1)
    fed.prepare(train.labels).close()
    pki = FleetPKI.init(tmp_path / "pki", "lab")
    server = pki.issue_server("bridge", hosts=("10.201.1.1", "10.201.2.1"))
    conf = tmp_path / "mosquitto.conf"  # the broker host's loopback only: nothing else may reach it
    conf.write_text("listener 1883 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 20000\nmessage_size_limit 4194304\n")
    py = [sys.executable, "-m", "fedscan"]
    procs: list[subprocess.Popen[bytes]] = []
    with hospital_network() as broker_ip:
        try:
            procs.append(_in(BROKER_NS, ["mosquitto", "-c", str(conf)], tmp_path / "mosquitto.log"))
            procs.append(_in(BROKER_NS, [*py, "ws-bridge", "--listen", "0.0.0.0:443", "--upstream", "127.0.0.1:1883",
                                         "--tls-cert", str(server.cert), "--tls-key", str(server.key),
                                         "--tls-ca", str(server.ca)], tmp_path / "bridge.log"))
            wait_for(lambda: _tcp_from(AGENT_NS[0], broker_ip[0], 443), 60, "the bridge on 443")
            assert not _tcp_from(AGENT_NS[0], broker_ip[0], 1883), "plain MQTT must not be reachable"
            assert not _tcp_from(AGENT_NS[1], broker_ip[1], 8883), "nor MQTT over TLS"
            assert not _tcp_from(AGENT_NS[0], broker_ip[1], 443), "an agent host has no route to the other subnet"
            fed.coordinator = _in(BROKER_NS, [*py, "coordinator", "--state", str(fed.state), "--broker", "127.0.0.1:1883",
                                              "--val-data", str(pneumonia_npz), "--rounds", "1", "--min-clients", "2",
                                              "--lr", "0.02", "--seed", "0", "--threads", "1", "--no-export"],
                                  fed.state / "coordinator.log")
            for name, ns, ip in zip(fed.sites, AGENT_NS, broker_ip, strict=True):
                dev = pki.issue_device(name)
                fed.agents[name] = _in(ns, [*py, "agent", "--id", name, "--broker", f"wss://{ip}:443/mqtt",
                                            "--state", str(fed.root / name / "state"), "--data", str(pneumonia_npz),
                                            "--indices", str(fed.root / name / "indices.npy"), "--threads", "1",
                                            "--no-resource-gates", "--trust", str(fed.trust), "--tls-ca", str(dev.ca),
                                            "--tls-cert", str(dev.cert), "--tls-key", str(dev.key)],
                                       fed.root / name / "agent.log")
            wait_for(lambda: _round_done(fed), 300, "round 1 over port 443", fed)
        finally:
            fed.stop()
            for p in procs:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
                if p.poll() is None:
                    p.kill()
    store = open_store(f"sqlite:///{fed.state / 'state.db'}")
    try:
        assert sorted(u.agent_id for u in store.list_updates(1)) == fed.sites
    finally:
        store.close()
    for name, ip in zip(fed.sites, broker_ip, strict=True):
        assert f"connected to wss://{ip}:443/mqtt" in (fed.root / name / "agent.log").read_text()
    assert "ws-bridge: wss://0.0.0.0:443/mqtt" in (tmp_path / "bridge.log").read_text()

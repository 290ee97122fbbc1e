"""The CLI's mTLS path: an agent process with its device certificate connects to the TLS+ACL broker
and announces itself; without certificates it is refused and exits with the broker code (3)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from tls_broker import tls_mosquitto

from coordinator.acl import acl_from_store, write_acl
from coordinator.keys import ensure_signing_key, trust_path
from coordinator.pki import FleetPKI
from coordinator.store import open_store
from protocol.messages import Status, parse_message
from protocol.topics import Topics
from tools import forkserver

pytestmark = pytest.mark.integration
FLEET = "default"


def test_agent_cli_connects_with_mtls_and_is_refused_without(tmp_path: Path) -> None:
    pki = FleetPKI.init(tmp_path / "pki", FLEET)
    pki.issue_server("broker")
    pki.issue("auditor", "admin")
    dev = pki.issue_device("box-1")
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    store.enroll_agent("box-1", "xray-cxr-28", [])
    acl = write_acl(tmp_path / "acl", acl_from_store(store, FLEET, observers=["auditor"]))
    store.close()
    ensure_signing_key(tmp_path / "coord")  # the box refuses to start without a trust store
    topics = Topics(FLEET)
    with tls_mosquitto(tmp_path, pki.root, acl) as broker:
        online = threading.Event()
        aud = pki.paths("auditor")
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="auditor")
        client.tls_set(ca_certs=str(aud.ca), certfile=str(aud.cert), keyfile=str(aud.key))

        def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
            if msg.payload and parse_message(Status, msg.payload).state == "online":
                online.set()

        client.on_message = on_message
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.status("box-1"), 1)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        base = [*forkserver.command(), "agent", "--id", "box-1", "--broker", f"127.0.0.1:{broker.port}",
                "--state", str(tmp_path / "box"), "--no-resource-gates", "--no-telemetry",
                "--trust", str(trust_path(tmp_path / "coord"))]
        agent = subprocess.Popen([*base, "--tls-ca", str(dev.ca), "--tls-cert", str(dev.cert), "--tls-key",
                                  str(dev.key)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert online.wait(60), "the agent never announced itself over mTLS"
        finally:
            agent.terminate()
            agent.wait(20)
            client.loop_stop()
            client.disconnect()
        plain = subprocess.run(base, capture_output=True, text=True, timeout=120)
        assert plain.returncode == 3, plain.stderr
        assert "unreachable" in plain.stderr

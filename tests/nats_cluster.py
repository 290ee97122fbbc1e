"""Start a private 3-node NATS cluster (JetStream + MQTT listener per node) for one test.

Each node gets its own ``server_name``, store directory, client, route, monitoring and MQTT
ports, all on loopback and all free ports: never the system nats-server on 4222. NATS's MQTT
support needs JetStream (sessions, retained messages and QoS-1 messages live in JetStream
streams, replicated across the cluster), so a node is "ready" only once its MQTT port listens
and its monitoring endpoint shows every route up and a JetStream meta leader elected. ``kill`` sends SIGKILL to one node (a
crash, no goodbye to the others); ``start_node`` brings it back on the same ports and store.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedscan.broker import free_port, wait_port

NATS_BIN = "nats-server"

# max_payload is NATS's message size limit (1 MiB by default); fedscan's chunks are <= 1 MiB of
# data plus a <= 4 KiB header, so the test cluster allows 4 MiB like the mosquitto config.
NODE_CONF = """\
server_name: {name}
listen: 127.0.0.1:{client_port}
http: 127.0.0.1:{monitor_port}
max_payload: 4194304
jetstream {{
  store_dir: "{store}"
  max_memory_store: 268435456
  max_file_store: 2147483648
}}
cluster {{
  name: fedscan-test
  listen: 127.0.0.1:{cluster_port}
  routes: [{routes}]
}}
mqtt {{
  listen: 127.0.0.1:{mqtt_port}
  # sessions, retained and QoS-1 messages on all 3 nodes: one node may die (NATS picks the number
  # of servers it knows when the streams are first made, which may be 2 while the cluster forms)
  stream_replicas: 3
  ack_wait: "10s"
  max_ack_pending: 2048
}}
"""


@dataclass
class NatsNode:
    """One cluster node: its name, ports, config file, store and process."""

    name: str
    client_port: int
    cluster_port: int
    monitor_port: int
    mqtt_port: int
    conf: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """The node's MQTT listener as ``HOST:PORT``."""
        return f"127.0.0.1:{self.mqtt_port}"

    @property
    def running(self) -> bool:
        """Whether the node's process is alive."""
        return self.proc is not None and self.proc.poll() is None


@dataclass
class NatsCluster:
    """Three NATS nodes routed to each other; ``brokers`` is the ``--broker`` list for fedscan."""

    root: Path
    nodes: list[NatsNode] = field(default_factory=list)

    @property
    def brokers(self) -> str:
        """Every node's MQTT address, comma-separated (the ``--broker`` value)."""
        return ",".join(n.address for n in self.nodes)

    def node_by_port(self, mqtt_port: int) -> NatsNode:
        """The node whose MQTT listener is on ``mqtt_port``."""
        return next(n for n in self.nodes if n.mqtt_port == mqtt_port)

    def start_node(self, node: NatsNode) -> None:
        """Start (or restart) ``node`` on its ports and store, without waiting."""
        with open(node.log, "ab") as fh:
            node.proc = subprocess.Popen([NATS_BIN, "-c", str(node.conf)], stdout=fh, stderr=subprocess.STDOUT)

    def kill(self, node: NatsNode) -> None:
        """SIGKILL ``node``: a crash, no clean shutdown, no goodbye to the routes."""
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(10)

    def stop(self) -> None:
        """SIGKILL every node that still runs."""
        for node in self.nodes:
            self.kill(node)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until every running node listens for MQTT, routes to the others, and sees a meta leader."""
        deadline = time.monotonic() + timeout
        running = [n for n in self.nodes if n.running]
        for node in running:
            wait_port(node.mqtt_port, timeout=max(1.0, deadline - time.monotonic()))
            while not (_ready(node.monitor_port, len(running) - 1) and _mqtt_accepts(node.mqtt_port)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"NATS node {node.name} not healthy within {timeout}s:\n" + self.logs())
                time.sleep(0.2)

    def logs(self) -> str:
        """The tail of every node's log, for assertion messages."""
        return "\n".join(f"===== {n.name}\n" + n.log.read_text(errors="replace")[-2000:]
                         for n in self.nodes if n.log.exists())


def _monitor(port: int, path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=1) as resp:
        data = json.loads(resp.read())
    return data if isinstance(data, dict) else {}


def _mqtt_accepts(port: int) -> bool:
    """Whether the node answers an MQTT 3.1.1 CONNECT (clean session) with CONNACK 0: its MQTT
    listener can open sessions (JetStream behind it ready), not merely accept TCP."""
    client_id = b"fedscan-probe"
    var = b"\x00\x04MQTT\x04\x02\x00\x05" + len(client_id).to_bytes(2, "big") + client_id
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(bytes([0x10, len(var)]) + var)
            ack = sock.recv(4)
            sock.sendall(b"\xe0\x00")  # DISCONNECT
    except OSError:
        return False
    return ack == b"\x20\x02\x00\x00"


def _ready(monitor_port: int, peers: int) -> bool:
    try:
        routes = _monitor(monitor_port, "routez").get("num_routes", 0)
        meta = _monitor(monitor_port, "jsz").get("meta_cluster") or {}
    except (OSError, urllib.error.URLError, ValueError):
        return False
    return isinstance(routes, int) and routes >= peers and isinstance(meta, dict) and bool(meta.get("leader"))


def make_cluster(root: Path, size: int = 3) -> NatsCluster:
    """Write the configs of a ``size``-node cluster under ``root`` (nothing started)."""
    root.mkdir(parents=True, exist_ok=True)
    ports = [(free_port(), free_port(), free_port(), free_port()) for _ in range(size)]
    cluster = NatsCluster(root)
    for i, (client, route, monitor, mqtt_port) in enumerate(ports):
        name = f"n{i + 1}"
        routes = ", ".join(f'"nats-route://127.0.0.1:{p[1]}"' for j, p in enumerate(ports) if j != i)
        conf = root / f"{name}.conf"
        conf.write_text(NODE_CONF.format(name=name, client_port=client, monitor_port=monitor, store=root / name,
                                         cluster_port=route, routes=routes, mqtt_port=mqtt_port))
        cluster.nodes.append(NatsNode(name, client, route, monitor, mqtt_port, conf, root / f"{name}.log"))
    return cluster


@contextlib.contextmanager
def nats_cluster(root: Path, size: int = 3) -> Iterator[NatsCluster]:
    """A running ``size``-node cluster with JetStream and MQTT; killed afterwards, even on failure."""
    if shutil.which(NATS_BIN) is None:
        import pytest

        pytest.skip("nats-server not installed (apt-get install nats-server)")
    cluster = make_cluster(root, size)
    try:
        for node in cluster.nodes:
            cluster.start_node(node)
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()

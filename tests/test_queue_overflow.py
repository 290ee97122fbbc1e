"""Queue overflow (issue 19 item 2): the broker drops, the end-to-end acknowledgements notice, 0 updates lost.

mosquitto runs with its default limits (``max_queued_messages 1000``, ``max_inflight_messages 20``
per client: nothing about queues in its config). 300 agents (``bench/load_fleet.py``: real MQTT
clients with persistent sessions and the real uploader, 100 per process) upload a round's update in
16 KiB chunks (14 per update, 4,200 messages). As the first update is accepted the coordinator
process is paused (SIGSTOP: a disk stall, a GC pause, a busy box): the broker holds 20 messages in
flight and 1,000 queued for it and drops the rest of the burst, which ``$SYS`` counts. When it
resumes, transfers whose last chunk arrived are answered ``incomplete`` with the missing chunks,
the others get no answer and are resent whole after the agents' ack timeout; the round must close
with every one of the 300 updates accepted once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.keys import ensure_signing_key
from coordinator.states import RoundStatus
from coordinator.store import open_store
from fedscan.broker import free_port, stop_processes, wait_port
from tools import forkserver

ROOT = Path(__file__).resolve().parent.parent
AGENTS, PROCESSES = 300, 3

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto not installed")


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    with log.open("ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


class Dropped:
    """mosquitto's ``$SYS/broker/publish/messages/dropped`` counter."""

    def __init__(self, port: int) -> None:
        self.value = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-sys", clean_session=True)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("$SYS/broker/publish/messages/dropped", 0)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.value = int(float(msg.payload))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _logs(tmp: Path) -> str:
    return "\n".join(f"===== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(tmp.glob("*.log")))


def test_burst_over_default_queue_limit_loses_no_update(tmp_path: Path) -> None:
    state = tmp_path / "coordinator"
    state.mkdir()
    ensure_signing_key(state)
    store = open_store(f"sqlite:///{state / 'state.db'}")
    ids = [f"box-{i:03d}" for i in range(AGENTS)]
    for a in ids:
        store.enroll_agent(a, "xray-cxr-28", ["burst"])
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nsys_interval 1\n")
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs: list[subprocess.Popen[bytes]] = []
    dropped: Dropped | None = None
    try:
        wait_port(port)
        dropped = Dropped(port)
        # the agents first, so that every one holds a persistent session when the round is announced
        outs = [tmp_path / f"agents-{i}.json" for i in range(PROCESSES)]
        for i in range(PROCESSES):
            procs.append(_spawn([*forkserver.script_command(ROOT / "bench" / "load_fleet.py"), "--port", str(port),
                                 "--state", str(state), "--ids", ",".join(ids[i::PROCESSES]), "--workers", "100",
                                 "--ack-timeout", "8", "--seed", str(i), "--out", str(outs[i])],
                                tmp_path / f"agents-{i}.log"))
        deadline = time.monotonic() + 120
        while not all("ready" in (tmp_path / f"agents-{i}.log").read_text() for i in range(PROCESSES)):
            assert time.monotonic() < deadline, "agents did not connect\n" + _logs(tmp_path)
            assert all(p.poll() is None for p in procs), _logs(tmp_path)
            time.sleep(0.2)
        coord = _spawn([*forkserver.command(), "coordinator", "--state", str(state), "--broker",
                        f"127.0.0.1:{port}", "--rounds", "1", "--min-clients", str(AGENTS), "--deadline", "600",
                        "--no-export", "--exit-when-done", "--threads", "1", "--chunk-bytes", "16384"],
                       tmp_path / "coordinator.log")
        procs.append(coord)
        # pause the coordinator as soon as the burst reaches it
        deadline = time.monotonic() + 120
        while store.get_round(1) is None or not store.list_updates(1):
            assert time.monotonic() < deadline and coord.poll() is None, "no update accepted\n" + _logs(tmp_path)
            time.sleep(0.02)
        forkserver.send_signal(coord, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 60
            while dropped.value == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2.0)  # let the rest of the burst arrive (and be dropped)
        finally:
            forkserver.send_signal(coord, signal.SIGCONT)
        assert dropped.value > 0, "the broker dropped nothing: the burst did not overflow its queue"
        seen_dropped = dropped.value
        assert coord.wait(timeout=240) == 0, _logs(tmp_path)
        stop_processes(procs[:PROCESSES], timeout=60)
        stats = [json.loads(o.read_text()) for o in outs]
    finally:
        stop_processes(procs)
        if dropped is not None:
            dropped.close()
        broker.kill()
        broker.wait(10)
    rnd = store.get_round(1)
    assert rnd is not None and rnd.status == RoundStatus.COMPLETE, _logs(tmp_path)
    updates = store.list_updates(1)
    assert sorted(u.agent_id for u in updates) == ids  # every agent's update, each once: 0 lost
    assert sum(s.get("uploads_accepted", 0) + s.get("uploads_duplicate", 0) for s in stats) == AGENTS
    assert sum(s.get("resent_bytes_approx", 0) for s in stats) > 0  # the dropped chunks were sent again
    print(f"broker dropped {seen_dropped} messages; all {AGENTS} updates accepted")

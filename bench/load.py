"""Fleet load (issue 19 item 1): rounds with 100, 300 and 1,000 agents as real MQTT clients.

Per fleet size N: a private mosquitto on loopback (limits raised on purpose: no connection cap,
``max_queued_messages 100000``, ``$SYS`` every second), the real coordinator process
(``fedscan coordinator``, FedAvg, sync rounds that close when all N updates are in, no validation
set and no export, so the figures are the federation's own cost), N agents enrolled in its store,
and ``ceil(N / 250)`` processes of simulated agents (``bench/load_fleet.py``: one MqttTransport,
persistent session, presence and the real uploader per agent; training replaced by a seeded
perturbation of the base). The model is the ``xray-cxr-28`` small CNN (56,034 float32
parameters, 224 KB raw frames, codec ``raw``).

Measured per round: wall time (the coordinator's own round record, created → complete),
coordinator CPU seconds and RSS (psutil, sampled every 0.2 s; peak = the kernel's VmHWM), broker
PUBLISH messages (and all MQTT packets) and bytes in and out and messages dropped (mosquitto's
``$SYS`` counters, differences over the round, 1 s resolution), updates accepted (the store) and lost (N minus accepted). The
headline is memory: aggregation streams (``Strategy.aggregate_stream``), so the coordinator's peak
RSS at 1,000 agents must stay within 2x of 100 agents; the rows also give the peak's growth over
the coordinator's RSS before round 1, and what holding every update would take (N x model bytes).

Rows: ``section`` ``round`` (one per fleet size and round) and ``fleet`` (one per fleet size,
``round: "all"``); other sections (e.g. per-agent traffic up and down) add rows with their own
``section`` value and the same ``agents`` key.

``--quick``: 20 agents, 1 round. Full: 100, 300, 1000 agents x 3 rounds. ``ulimit -n`` is raised
to its hard limit for the broker (1,000 clients need > 1,024 descriptors).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, print_table, write_rows

from coordinator.keys import ensure_signing_key
from coordinator.states import RoundStatus
from coordinator.store import open_store
from fedscan.broker import free_port, stop_processes, wait_port

AGENTS_PER_PROCESS = 250
MODEL_BYTES = 56_034 * 4
#: mosquitto's $SYS counters -> row keys
SYS_KEYS = {"publish/messages/received": "broker_publish_in_msgs", "publish/messages/sent": "broker_publish_out_msgs",
            "messages/received": "broker_packets_in_msgs", "messages/sent": "broker_packets_out_msgs",
            "bytes/received": "broker_bytes_in", "bytes/sent": "broker_bytes_out",
            "publish/messages/dropped": "broker_dropped_msgs"}


class SysCounters:
    """mosquitto's ``$SYS/broker/...`` counters as (time, value) samples, read by a plain paho client."""

    def __init__(self, port: int) -> None:
        self.samples: dict[str, list[tuple[float, float]]] = {k: [] for k in SYS_KEYS}
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sys", clean_session=True)
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port)
        for k in SYS_KEYS:
            self._client.subscribe(f"$SYS/broker/{k}", 0)
        self._client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        key = msg.topic.removeprefix("$SYS/broker/")
        with contextlib.suppress(KeyError, ValueError):
            self.samples[key].append((time.time(), float(msg.payload)))

    def at(self, key: str, t: float) -> float:
        """The counter's value last reported at or before ``t`` (0 before the first report)."""
        before = [v for ts, v in self.samples[key] if ts <= t]
        return before[-1] if before else 0.0

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class ProcessSampler:
    """CPU seconds and RSS of one process every ``period`` s, until it exits; peak from VmHWM."""

    def __init__(self, pid: int, period: float = 0.2) -> None:
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, float, int]] = []  # (time, cpu s, rss bytes)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            try:
                with self.proc.oneshot():
                    cpu = self.proc.cpu_times()
                    rss = self.proc.memory_info().rss
                status = Path(f"/proc/{self.proc.pid}/status").read_text()
                hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
            except (psutil.Error, OSError, StopIteration):
                return
            self.samples.append((time.time(), cpu.user + cpu.system, rss))
            self.peak_rss = max(self.peak_rss, hwm)
            self._stop.wait(period)

    def cpu_at(self, t: float) -> float:
        before = [c for ts, c, _ in self.samples if ts <= t]
        return before[-1] if before else 0.0

    def max_rss_between(self, t0: float, t1: float) -> int:
        return max((r for ts, _, r in self.samples if t0 <= ts <= t1 + 0.2), default=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def start_broker(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = root / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\n"
                    "max_queued_messages 100000\nmax_inflight_messages 100\nmessage_size_limit 0\nsys_interval 1\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)


def run_fleet(n_agents: int, rounds: int, root: Path, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One fleet size: broker, coordinator, agent processes; rows per round and a summary row."""
    state = root / "coordinator"
    state.mkdir(parents=True)
    ensure_signing_key(state)
    store = open_store(f"sqlite:///{state / 'state.db'}")
    ids = [f"box-{i:04d}" for i in range(n_agents)]
    for a in ids:
        store.enroll_agent(a, "xray-cxr-28", ["load"])
    store.close()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    broker, port = start_broker(root)
    sys_counters = SysCounters(port)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        t_start = time.time()
        coord = _spawn(
            [sys.executable, "-m", "fedscan", "coordinator", "--state", str(state), "--broker", f"127.0.0.1:{port}",
             "--rounds", str(rounds), "--min-clients", str(n_agents), "--deadline", "1200", "--no-export",
             "--exit-when-done", "--threads", "1", "--seed", str(seed)], root / "coordinator.log", env)
        sampler = ProcessSampler(coord.pid)
        n_procs = math.ceil(n_agents / AGENTS_PER_PROCESS)
        outs = [root / f"agents-{i}.json" for i in range(n_procs)]
        for i in range(n_procs):
            part = ids[i::n_procs]
            procs.append(_spawn(
                [sys.executable, str(Path(__file__).with_name("load_fleet.py")), "--port", str(port), "--state",
                 str(state), "--ids", ",".join(part), "--seed", str(seed * 100 + i), "--out", str(outs[i])],
                root / f"agents-{i}.log", env))
        coord.wait(timeout=1200 * rounds)
        t_end = time.time()
        sampler.stop()
        time.sleep(1.5)  # one more $SYS report after the last round
        stop_processes(procs, timeout=60)
        sys_counters.close()
        if coord.returncode != 0:
            raise RuntimeError(f"coordinator exited {coord.returncode}: see {root / 'coordinator.log'}")
        agent_stats = [json.loads(o.read_text()) for o in outs if o.exists()]
    finally:
        stop_processes(procs)
        sys_counters.close()
        broker.kill()
        broker.wait(10)
    store = open_store(f"sqlite:///{state / 'state.db'}")
    rows: list[dict[str, Any]] = []
    first = None
    for r in range(1, rounds + 1):
        rec = store.get_round(r)
        assert rec is not None
        t0, t1 = rec.created_at, rec.updated_at
        first = t0 if first is None else first
        accepted = len(store.list_updates(r))
        row: dict[str, Any] = {
            "section": "round", "agents": n_agents, "round": r, "status": str(rec.status),
            "round_wall_s": round(t1 - t0, 2),
            "coordinator_cpu_s": round(sampler.cpu_at(t1) - sampler.cpu_at(t0), 2),
            "coordinator_rss_max_mb": round(sampler.max_rss_between(t0, t1) / 2**20, 1),
            "aggregate_ms": (rec.detail or {}).get("phases_ms", {}).get("aggregate"),
            "updates_accepted": accepted, "updates_lost": n_agents - accepted,
        }
        for k, name in SYS_KEYS.items():
            row[name] = int(sys_counters.at(k, t1 + 1.0) - sys_counters.at(k, t0))
        rows.append(row)
    complete = sum(1 for r in range(1, rounds + 1) if (rec := store.get_round(r)) and rec.status == RoundStatus.COMPLETE)
    store.close()
    baseline = [rss for ts, _, rss in sampler.samples if first is not None and ts < first]
    base_mb = (baseline[-1] if baseline else 0) / 2**20
    summary = {
        "section": "fleet", "agents": n_agents, "round": "all", "rounds_complete": complete, "agent_processes": n_procs,
        "agents_per_process": math.ceil(n_agents / n_procs),
        "run_wall_s": round(t_end - t_start, 1),
        "coordinator_cpu_s": round(sampler.samples[-1][1] if sampler.samples else 0.0, 2),
        "coordinator_rss_before_round1_mb": round(base_mb, 1),
        "coordinator_peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
        "coordinator_peak_growth_mb": round(sampler.peak_rss / 2**20 - base_mb, 1),
        "all_updates_in_memory_mb": round(n_agents * MODEL_BYTES / 2**20, 1),
        "updates_accepted": sum(r["updates_accepted"] for r in rows),
        "updates_lost": sum(r["updates_lost"] for r in rows),
        "agent_uploads_accepted": sum(s.get("uploads_accepted", 0) for s in agent_stats),
        "agent_uploads_unacked": sum(s.get("uploads_no_ack", 0) + s.get("uploads_error", 0) for s in agent_stats),
        "agent_resent_bytes": sum(s.get("resent_bytes_approx", 0) for s in agent_stats),
        "agent_connect_ms_max": max((s.get("connect_ms", 0) for s in agent_stats), default=0),
    }
    return rows, summary


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--agents", default=None, help="comma-separated fleet sizes (default 100,300,1000)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    if shutil.which("mosquitto") is None:
        print("bench/load.py: mosquitto is not installed (apt-get install mosquitto); nothing measured")
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sizes = [int(x) for x in args.agents.split(",")] if args.agents else ([20] if args.quick else [100, 300, 1000])
    rounds = args.rounds or (1 if args.quick else 3)
    rows: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"fedscan-load-{n}-") as tmp:
            try:
                per_round, summary = run_fleet(n, rounds, Path(tmp), args.seed)
            except Exception:
                log = Path(tmp) / "coordinator.log"
                print(log.read_text()[-4000:] if log.exists() else "(no coordinator log)")
                raise
        rows += per_round
        summaries.append(summary)
        print_table(per_round, ["agents", "round", "round_wall_s", "coordinator_cpu_s", "coordinator_rss_max_mb",
                                "updates_accepted", "updates_lost", "broker_publish_in_msgs", "broker_bytes_in",
                                "broker_publish_out_msgs", "broker_bytes_out", "broker_dropped_msgs"])
    print_table(summaries, ["agents", "rounds_complete", "run_wall_s", "coordinator_cpu_s",
                            "coordinator_rss_before_round1_mb", "coordinator_peak_rss_mb", "coordinator_peak_growth_mb",
                            "all_updates_in_memory_mb", "updates_lost"])
    meta: dict[str, Any] = {"sizes": sizes, "rounds": rounds, "model": "small_cnn xray-cxr-28 (56,034 params)",
                            "codec": "raw", "strategy": "fedavg (streaming)",
                            "agents_per_process": AGENTS_PER_PROCESS, "nofile_limit": hard,
                            "load_avg_at_start": load_at_start}
    by_n = {s["agents"]: s for s in summaries}
    if 100 in by_n and 1000 in by_n:
        meta["peak_rss_ratio_1000_vs_100"] = round(by_n[1000]["coordinator_peak_rss_mb"]
                                                   / by_n[100]["coordinator_peak_rss_mb"], 3)
        meta["target"] = "coordinator peak RSS at 1000 agents within 2x of 100 agents; 0 updates lost"
    path = write_rows("load", rows + summaries, quick=args.quick, meta=meta)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

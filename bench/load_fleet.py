"""Simulated agents for ``bench/load.py``: many real MQTT clients in one process.

Each simulated agent is what the coordinator sees of a box: its own client id (= agent id, enrolled
by the bench), a persistent session (``clean_session=False``), a retained ``online`` status with an
``offline`` Last Will, its ``tasks`` topic, and the real upload path (:class:`edge_agent.uploader.Uploader`:
chunks, a window in flight, resend until acknowledged end to end). Each agent has its own
:class:`protocol.transport.MqttTransport` (a paho network thread and a dispatcher thread each).

What is simulated: training. An agent answers a task with ``base + small seeded noise`` encoded
with the task's codec (:func:`protocol.frame.encode_update`), so the coordinator decodes, checks,
stores and aggregates real frames while the 2 CPU cores are not spent on 1,000 local trainings.
The base weights are read from the coordinator's model repository on disk (once per version per
process): the downlink is not part of this bench's figures (issue 19 item 7 measures it).

Run as ``python bench/load_fleet.py --host H --port P --state S --ids a,b,... --out stats.json``;
SIGTERM (or SIGINT) stops it, and it writes its counts to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.model_repo import ModelRepository
from edge_agent.uploader import Uploader
from protocol.codec import Tensors
from protocol.errors import FedscanError, MalformedMessage
from protocol.frame import encode_update
from protocol.messages import Status, Task, parse_message
from protocol.topics import Topics
from protocol.transport import MqttTransport

log = logging.getLogger("fedscan.bench.load_fleet")


class Bases:
    """Model weights by version, read once per process from the coordinator's repository."""

    def __init__(self, repo: ModelRepository) -> None:
        self.repo = repo
        self._cache: dict[str, Tensors] = {}
        self._lock = threading.Lock()

    def get(self, version: str) -> Tensors:
        """The weights of ``version``."""
        with self._lock:
            if version not in self._cache:
                self._cache[version] = self.repo.tensors(version)
                while len(self._cache) > 3:
                    self._cache.pop(next(iter(self._cache)))
            return self._cache[version]


class SimAgent:
    """One simulated box: connection, presence, tasks in, updates out."""

    def __init__(self, agent_id: str, host: str, port: int, topics: Topics, work: queue.Queue[tuple[SimAgent, Task]],
                 seed: int, ack_timeout_s: float = 30.0) -> None:
        self.agent_id, self.topics, self.work = agent_id, topics, work
        offline = Status(state="offline", profile="xray-cxr-28").to_bytes()
        self.transport = MqttTransport(agent_id, host, port, will=(topics.status(agent_id), offline),
                                       clean_session=False, keepalive=60, connect_attempts=10)
        self.uploader = Uploader(agent_id, self.transport, topics, ack_timeout_s=ack_timeout_s)
        self.rng = np.random.default_rng(seed)
        self.samples = int(self.rng.integers(50, 150))
        self.rounds_taken: set[int] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Connect, subscribe to tasks and acks, announce ``online`` (retained)."""
        self.transport.connect()
        self.uploader.attach()
        self.transport.subscribe(self.topics.tasks(self.agent_id), self.on_task)
        self.transport.publish(self.topics.status(self.agent_id),
                               Status(state="online", profile="xray-cxr-28").to_bytes(), retain=True)

    def on_task(self, topic: str, payload: bytes) -> None:
        """Dispatcher thread: queue a round's task once (re-announcements of it are ignored)."""
        try:
            task = parse_message(Task, payload)
        except MalformedMessage as exc:
            log.warning("%s: malformed task: %s", self.agent_id, exc)
            return
        with self._lock:
            if task.round_id in self.rounds_taken:
                return
            self.rounds_taken.add(task.round_id)
        self.work.put((self, task))

    def frame_for(self, task: Task, base: Tensors) -> bytes:
        """A 'trained' model: the base plus small seeded noise, encoded as the task asks."""
        tensors = {k: v + self.rng.normal(0.0, 0.01, size=v.shape).astype(np.float32) for k, v in base.items()}
        return encode_update(tensors, agent_id=self.agent_id, round_id=task.round_id, base_version=task.base_version,
                             sample_count=self.samples, codec=task.codec, base=base, seed=task.round_id)


def worker(work: queue.Queue[tuple[SimAgent, Task]], bases: Bases, stop: threading.Event, counts: Counter[str],
           lock: threading.Lock) -> None:
    """Take tasks and upload their updates until stopped."""
    while not stop.is_set():
        try:
            agent, task = work.get(timeout=0.5)
        except queue.Empty:
            continue
        try:
            frame = agent.frame_for(task, bases.get(task.base_version))
            sent_before = agent.transport.traffic.tx_bytes
            ack = agent.uploader.upload(task, frame, stop)
            resent = max(0, agent.transport.traffic.tx_bytes - sent_before - len(frame))
            status = ack.status if ack is not None else "no_ack"
        except (FedscanError, OSError, KeyError) as exc:
            log.warning("%s: round %d failed: %s", agent.agent_id, task.round_id, exc)
            status, frame, resent = "error", b"", 0
        with lock:
            counts[f"uploads_{status}"] += 1
            counts["frame_bytes"] += len(frame)
            counts["resent_bytes_approx"] += resent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--state", type=Path, required=True, help="the coordinator's state folder (its models/)")
    p.add_argument("--ids", required=True, help="comma-separated agent ids")
    p.add_argument("--fleet", default="default")
    p.add_argument("--workers", type=int, default=32, help="upload threads in this process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ack-timeout", type=float, default=30.0, help="seconds an upload waits for its ack before resending")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    topics = Topics(args.fleet)
    work: queue.Queue[tuple[SimAgent, Task]] = queue.Queue()
    ids = [i for i in args.ids.split(",") if i]
    agents = [SimAgent(a, args.host, args.port, topics, work, seed=args.seed * 1_000_003 + n,
                       ack_timeout_s=args.ack_timeout)
              for n, a in enumerate(ids)]
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    bases = Bases(ModelRepository(args.state / "models"))
    threads = [threading.Thread(target=worker, args=(work, bases, stop, counts, lock), daemon=True)
               for _ in range(args.workers)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    for a in agents:
        a.start()
    counts["connect_ms"] = round(1000 * (time.monotonic() - t0))
    print(f"ready: {len(agents)} agents connected", flush=True)
    stop.wait()
    for t in threads:
        t.join(5)
    for a in agents:
        a.uploader.wake()
        a.transport.close(graceful_payload=(topics.status(a.agent_id),
                                            Status(state="offline", profile="xray-cxr-28").to_bytes()))
    summary: dict[str, Any] = {"agents": len(agents), **counts}
    args.out.write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run coordinator and agents as separate processes for integration tests."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from jobproc import spawn_fedscan

from coordinator.keys import ensure_signing_key, trust_path
from coordinator.store import RoundRecord, Store, open_store
from fedscan.broker import stop_processes
from tools import forkserver


def stratified_parts(labels: np.ndarray, sizes: list[int], seed: int) -> list[np.ndarray]:
    """Disjoint random subsets of the given sizes, each with the overall class mix."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    out, start = [], 0
    for n in sizes:
        out.append(np.sort(order[start : start + n]))
        start += n
    return out


@dataclass
class Federation:
    root: Path
    port: int
    data: Path
    sizes: list[int]
    rounds: int = 2
    seed: int = 0
    lr: float = 0.02
    local_epochs: int = 1
    extra_coordinator_args: list[str] = field(default_factory=list)
    broker: str | None = None  # a --broker value (e.g. a cluster's node list); default 127.0.0.1:{port}
    forked: bool = True  # processes forked from a pre-imported interpreter (tools/forkserver.py); False: plain ones
    coordinator: subprocess.Popen[bytes] | None = None
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def state(self) -> Path:
        return self.root / "coordinator"

    @property
    def trust(self) -> Path:
        """The coordinator's trust store (written by ``prepare``), given to every agent with ``--trust``."""
        return trust_path(self.state)

    @property
    def broker_address(self) -> str:
        """The ``--broker`` value every process gets."""
        return self.broker or f"127.0.0.1:{self.port}"

    @property
    def sites(self) -> list[str]:
        return [f"site-{i + 1}" for i in range(len(self.sizes))]

    def prepare(self, labels: np.ndarray) -> Store:
        self.state.mkdir(parents=True, exist_ok=True)
        ensure_signing_key(self.state)  # the coordinator signs with this key; agents trust keys/trust.json
        store = open_store(f"sqlite:///{self.state / 'state.db'}")
        for name, idx in zip(self.sites, stratified_parts(labels, self.sizes, self.seed), strict=True):
            (self.root / name).mkdir(parents=True, exist_ok=True)
            np.save(self.root / name / "indices.npy", idx)
            store.enroll_agent(name, "xray-cxr-28", ["test"])
        return store

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        return spawn_fedscan(args, log, forked=self.forked)

    def start_coordinator(self) -> None:
        self.coordinator = self._spawn(
            ["coordinator", "--state", str(self.state), "--broker", self.broker_address,
             "--val-data", str(self.data), "--rounds", str(self.rounds), "--min-clients", str(len(self.sizes)),
             "--local-epochs", str(self.local_epochs), "--lr", str(self.lr), "--loss", "balanced_ce",
             "--seed", str(self.seed), "--threads", "1",
             # these tests follow each round's model onto the boxes; serving the best validated
             # model instead is tested in tests/test_served_model_selection.py
             "--select-metric", "latest",
             *self.extra_coordinator_args],
            self.state / "coordinator.log",
        )

    def start_agent(self, name: str) -> None:
        self.agents[name] = self._spawn(
            ["agent", "--id", name, "--broker", self.broker_address, "--state", str(self.root / name / "state"),
             "--data", str(self.data), "--indices", str(self.root / name / "indices.npy"), "--threads", "1", "--no-resource-gates",
             "--trust", str(self.trust)],
            self.root / name / "agent.log",
        )

    def start_all(self) -> None:
        self.start_coordinator()
        for name in self.sites:
            self.start_agent(name)

    def kill_coordinator(self) -> None:
        assert self.coordinator is not None
        forkserver.send_signal(self.coordinator, signal.SIGKILL)  # the process itself, at once
        self.coordinator.wait(10)

    def stop(self) -> None:
        stop_processes([p for p in [self.coordinator, *self.agents.values()] if p is not None])

    def logs(self) -> str:
        parts = []
        for log in [self.state / "coordinator.log", *(self.root / n / "agent.log" for n in self.sites)]:
            if log.exists():
                parts.append(f"===== {log}\n" + log.read_text(errors="replace")[-3000:])
        return "\n".join(parts)


def _stored_round(fed: Federation, round_id: int) -> RoundRecord | None:
    """The coordinator's record of ``round_id``, or None (read through a short-lived store connection)."""
    store = open_store(f"sqlite:///{fed.state / 'state.db'}")
    try:
        return store.get_round(round_id)
    finally:
        store.close()


def round_opened(fed: Federation, round_id: int) -> bool:
    """Whether the coordinator has recorded ``round_id`` (it records a round as it opens it)."""
    return _stored_round(fed, round_id) is not None


def round_complete(fed: Federation, round_id: int) -> bool:
    """Whether round ``round_id`` is complete in the coordinator's store."""
    r = _stored_round(fed, round_id)
    return r is not None and r.status == "complete"


def wait_for(cond: Callable[[], bool], timeout: float, what: str, fed: Federation | None = None,
             poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n" + (fed.logs() if fed else ""))

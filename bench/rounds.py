"""Overhead of the real deployment shape (issue 3): R rounds over a real broker with one process
per agent, against the same training in one process with the same total torch threads.

Both arms do the same work per round: every site trains one local epoch from the global model
(same seeds), FedAvg, evaluation on the validation split. The distributed arm's time is taken
from the coordinator's own round records (first round created → last round complete), plus
the whole wall time including process start-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, print_table, write_rows

from coordinator.store import open_store
from fedscan import experiments
from fedscan.broker import local_broker, stop_processes
from fedscan.compose import evaluator_for, model_spec_for
from learning.data_path import find_data_file, warn_generated
from learning.datasets import load_medmnist
from protocol.messages import TrainingConfig
from protocol.profile import find_profile


def distributed(root: Path, data: Path, parts: list[np.ndarray], rounds: int, lr: float) -> dict[str, float]:
    state = root / "coordinator"
    state.mkdir(parents=True)
    store = open_store(f"sqlite:///{state / 'state.db'}")
    sites = [f"site-{i + 1}" for i in range(len(parts))]
    for name, idx in zip(sites, parts, strict=True):
        (root / name).mkdir()
        np.save(root / name / "indices.npy", idx)
        store.enroll_agent(name, "xray-cxr-28", [])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    py = [sys.executable, "-m", "fedscan"]
    t0 = time.perf_counter()
    with local_broker(root / "broker") as broker:
        addr = f"127.0.0.1:{broker.port}"
        procs = [subprocess.Popen([*py, "coordinator", "--state", str(state), "--broker", addr, "--val-data", str(data),
                                   "--rounds", str(rounds), "--min-clients", str(len(sites)), "--lr", str(lr),
                                   "--threads", "1", "--exit-when-done", "--no-export"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=open(state / "log", "wb"))]  # noqa: SIM115
        for name in sites:
            procs.append(subprocess.Popen([*py, "agent", "--id", name, "--broker", addr, "--data", str(data),
                                           "--indices", str(root / name / "indices.npy"), "--threads", "1", "--no-resource-gates",
                                           "--state", str(root / name / "state")], env=env,
                                          stdout=subprocess.DEVNULL, stderr=open(root / name / "log", "wb")))  # noqa: SIM115
        try:
            procs[0].wait(timeout=3600)
        finally:
            stop_processes(procs)
    wall = time.perf_counter() - t0
    first, last = store.get_round(1), store.get_round(rounds)
    overhead = []  # round duration minus the slowest agent's training time, rounds 2..R
    for rid in range(2, rounds + 1):
        r = store.get_round(rid)
        ups = store.list_updates(rid)
        if r is not None and ups:
            overhead.append((r.updated_at - r.created_at) - max(u.metrics.get("seconds", 0.0) for u in ups))
    store.close()
    if procs[0].returncode != 0 or first is None or last is None or last.status != "complete":
        raise RuntimeError(f"distributed run failed; see {state / 'log'}")
    return {"wall_s": wall, "rounds_s": last.updated_at - first.created_at,
            "overhead_s": float(np.median(overhead)) if overhead else float("nan"),
            "round1_s": first.updated_at - first.created_at}


def in_process(data: Path, parts: list[np.ndarray], rounds: int, lr: float, threads: int) -> float:
    spec = model_spec_for(find_profile("xray-cxr-28"))
    train, val = load_medmnist(data, "train"), load_medmnist(data, "val")
    evaluate = evaluator_for(spec, val)
    training = TrainingConfig(local_epochs=1, batch_size=32, lr=lr)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    experiments.federated(spec, train, parts, val, rounds=rounds, training=training, threads=threads,
                          on_round=lambda w: evaluate(w))
    return time.perf_counter() - t0


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--per-site", type=int, default=600)
    args = p.parse_args()
    if args.quick:
        args.rounds, args.per_site = 2, 100
    data = find_data_file("pneumoniamnist.npz")
    if data is None:
        warn_generated("bench/rounds.py")
        raise SystemExit("bench/rounds.py needs the real npz for its agent processes (set FEDSCAN_DATA)")
    labels = load_medmnist(data, "train").labels
    order = np.random.default_rng(0).permutation(len(labels))
    parts = [np.sort(order[i * args.per_site:(i + 1) * args.per_site]) for i in range(args.sites)]
    lr = 0.05
    with tempfile.TemporaryDirectory() as tmp:
        dist = distributed(Path(tmp), data, parts, args.rounds, lr)
    single = in_process(data, parts, args.rounds, lr, threads=args.sites)
    single_1t = in_process(data, parts, args.rounds, lr, threads=1)
    rows: list[dict[str, Any]] = [
        {"arm": "one process per agent, real broker (rounds only)", "seconds": dist["rounds_s"],
         "ratio": dist["rounds_s"] / single},
        {"arm": "one process per agent, real broker (incl. start-up)", "seconds": dist["wall_s"],
         "ratio": dist["wall_s"] / single},
        {"arm": f"single process, {args.sites} torch threads (the reference)", "seconds": single, "ratio": 1.0},
        {"arm": "single process, 1 torch thread (for context)", "seconds": single_1t, "ratio": single_1t / single},
        {"arm": "distributed: round 1 (process start-up, first model download)", "seconds": dist["round1_s"]},
        {"arm": "distributed: median per-round time outside training (protocol overhead)",
         "seconds": dist["overhead_s"]},
    ]
    print_table(rows, ["arm", "seconds", "ratio"])
    print(f"{args.rounds} rounds, {args.sites} sites x {args.per_site} images; target ratio <= 1.10")
    print(f"rows: {write_rows('rounds', rows, quick=args.quick, meta={'rounds': args.rounds, 'sites': args.sites})}")


if __name__ == "__main__":
    main()

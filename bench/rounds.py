"""Overhead of the real deployment shape (issue 3): R rounds over a real broker with one process
per agent, against the same training in one process with the same total torch threads.

Both arms do the same work per round: every site trains one local epoch from the global model
(same seeds), FedAvg, and the coordinator's validation pass (metrics and temperature, one forward
pass). The distributed arm's times come from the coordinator's own round records.

The headline ratio is the steady state, rounds 2..R: round 1 of the distributed arm also holds
the agents' process start-up and first model download, which the in-process reference never
pays; it is reported on its own row, with the whole wall time. Every arm runs ``--repeats``
times, interleaved, and the fastest run of each counts (all runs are kept in ``meta.runs``).
Every process runs with ``OMP_WAIT_POLICY=PASSIVE``; the reference runs in a fresh interpreter.
"""

from __future__ import annotations

import argparse
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

from coordinator.keys import ensure_signing_key, trust_path
from coordinator.store import open_store
from fedscan import experiments
from fedscan.broker import local_broker, stop_processes
from fedscan.compose import ValidationPass, model_spec_for
from firmware.profile import find_profile
from learning.data_path import find_data_file, warn_generated
from learning.datasets import load_medmnist
from protocol.codec import Tensors
from protocol.messages import TrainingConfig


def distributed(root: Path, data: Path, parts: list[np.ndarray], rounds: int, lr: float) -> dict[str, float]:
    state = root / "coordinator"
    state.mkdir(parents=True)
    store = open_store(f"sqlite:///{state / 'state.db'}")
    ensure_signing_key(state)  # agents verify every model against keys/trust.json
    sites = [f"site-{i + 1}" for i in range(len(parts))]
    for name, idx in zip(sites, parts, strict=True):
        (root / name).mkdir()
        np.save(root / name / "indices.npy", idx)
        store.enroll_agent(name, "xray-cxr-28", [])
    # Agents train with one torch thread each; the coordinator's validation pass runs while they wait
    # for the next model, so it gets as many threads as there are agents (the reference evaluates
    # with the same total). PASSIVE: idle OpenMP threads sleep instead of spinning on the cores.
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    py = [sys.executable, "-m", "fedscan"]
    t0 = time.perf_counter()
    with local_broker(root / "broker") as broker:
        addr = f"127.0.0.1:{broker.port}"
        procs = [subprocess.Popen([*py, "coordinator", "--state", str(state), "--broker", addr, "--val-data", str(data),
                                   "--rounds", str(rounds), "--min-clients", str(len(sites)), "--lr", str(lr),
                                   "--threads", str(len(sites)), "--exit-when-done", "--no-export"],
                                  env=dict(env, OMP_NUM_THREADS=str(len(sites))), stdout=subprocess.DEVNULL, stderr=open(state / "log", "wb"))]  # noqa: SIM115
        for name in sites:
            procs.append(subprocess.Popen([*py, "agent", "--id", name, "--broker", addr, "--data", str(data),
                                           "--indices", str(root / name / "indices.npy"), "--threads", "1", "--no-resource-gates",
                                           "--state", str(root / name / "state"), "--trust", str(trust_path(state))], env=dict(env, OMP_NUM_THREADS="1"),
                                          stdout=subprocess.DEVNULL, stderr=open(root / name / "log", "wb")))  # noqa: SIM115
        try:
            procs[0].wait(timeout=3600)
        finally:
            stop_processes(procs)
    wall = time.perf_counter() - t0
    first, last = store.get_round(1), store.get_round(rounds)
    second = store.get_round(2) if rounds > 1 else None
    overhead = []  # round duration minus the slowest agent's training time, rounds 2..R
    phases: dict[str, list[float]] = {}  # the coordinator's own post-collection phases
    for rid in range(2, rounds + 1):
        r = store.get_round(rid)
        ups = store.list_updates(rid)
        if r is not None and ups:
            overhead.append((r.updated_at - r.created_at) - max(u.metrics.get("seconds", 0.0) for u in ups))
            for k, ms in ((r.detail or {}).get("phases_ms") or {}).items():
                phases.setdefault(k, []).append(float(ms) / 1000)
    store.close()
    if procs[0].returncode != 0 or first is None or last is None or last.status != "complete":
        raise RuntimeError(f"distributed run failed; see {state / 'log'}")
    return {"wall_s": wall, "rounds_s": last.updated_at - first.created_at,
            "steady_s": last.updated_at - (second.created_at if second is not None else first.created_at),
            "overhead_s": float(np.median(overhead)) if overhead else float("nan"),
            "round1_s": first.updated_at - first.created_at,
            **{f"coordinator_{k}_s": float(np.median(v)) for k, v in phases.items()}}


def in_process(data: Path, parts: list[np.ndarray], rounds: int, lr: float, threads: int) -> list[float]:
    """The reference: the same rounds in this process with ``threads`` torch threads: every site trains
    in turn, FedAvg, then the coordinator's single validation pass (metrics and temperature).
    Returns the time at which each round ended, from the start of round 1."""
    spec = model_spec_for(find_profile("xray-cxr-28"))
    train, val = load_medmnist(data, "train"), load_medmnist(data, "val")
    validation = ValidationPass(spec, val)
    training = TrainingConfig(local_epochs=1, batch_size=32, lr=lr)
    torch.set_num_threads(threads)
    ends: list[float] = []

    def coordinator_work(w: Tensors) -> None:
        validation.metrics(w)
        validation.calibration(w)
        ends.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    experiments.federated(spec, train, parts, None, rounds=rounds, training=training, threads=threads,
                          on_round=coordinator_work)
    return ends


def reference(data: Path, parts: list[np.ndarray], rounds: int, lr: float, threads: int, root: Path) -> list[float]:
    """:func:`in_process` in a fresh interpreter with ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads
    sleep instead of spinning, which made the 2-thread reference swing from 9 s to 80 s on this box."""
    idx = root / f"parts-{threads}.npz"
    np.savez(idx, *parts)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, __file__, "--reference-worker", str(threads), "--data", str(data),
                          "--parts", str(idx), "--rounds", str(rounds), "--lr", str(lr)],
                         env=env, check=True, capture_output=True, text=True)
    return [float(x) for x in out.stdout.strip().splitlines()[-1].split(",")]


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--per-site", type=int, default=1200)
    p.add_argument("--repeats", type=int, default=3, help="runs of each arm; the fastest counts")
    p.add_argument("--reference-worker", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--parts", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, default=0.05, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reference_worker:
        with np.load(args.parts) as z:
            worker_parts = [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]
        ends = in_process(args.data, worker_parts, args.rounds, args.lr, args.reference_worker)
        print(",".join(f"{t:.6f}" for t in ends))
        return
    if args.quick:
        args.rounds, args.per_site, args.repeats = 2, 100, 1
    data = find_data_file("pneumoniamnist.npz")
    if data is None:
        warn_generated("bench/rounds.py")
        raise SystemExit("bench/rounds.py needs the real npz for its agent processes (set FEDSCAN_DATA)")
    labels = load_medmnist(data, "train").labels
    order = np.random.default_rng(0).permutation(len(labels))
    parts = [np.sort(order[i * args.per_site:(i + 1) * args.per_site]) for i in range(args.sites)]
    dists: list[dict[str, float]] = []
    refs: dict[int, list[list[float]]] = {args.sites: [], 1: []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):  # interleaved, so slow phases of the box hit every arm
            dists.append(distributed(Path(tmp) / f"run-{rep}", data, parts, args.rounds, args.lr))
            for threads in refs:
                refs[threads].append(reference(data, parts, args.rounds, args.lr, threads, Path(tmp)))
    dist = min(dists, key=lambda d: d["steady_s"])
    steady = {t: min(e[-1] - e[0] for e in runs) for t, runs in refs.items()}
    whole = {t: min(e[-1] for e in runs) for t, runs in refs.items()}
    ref = steady[args.sites]
    n = args.sites
    rows: list[dict[str, Any]] = [
        {"arm": f"one process per agent, real broker: rounds 2..{args.rounds}", "seconds": dist["steady_s"],
         "ratio": dist["steady_s"] / ref, "target_ratio": 1.10, "meets_target": dist["steady_s"] / ref <= 1.10},
        {"arm": f"single process, {n} torch threads (the reference): rounds 2..{args.rounds}", "seconds": ref,
         "ratio": 1.0},
        {"arm": f"single process, 1 torch thread (context): rounds 2..{args.rounds}", "seconds": steady[1],
         "ratio": steady[1] / ref},
        {"arm": f"one process per agent, real broker: rounds 1..{args.rounds}", "seconds": dist["rounds_s"],
         "ratio": dist["rounds_s"] / whole[n]},
        {"arm": f"single process, {n} torch threads: rounds 1..{args.rounds}", "seconds": whole[n], "ratio": 1.0},
        {"arm": "one process per agent, incl. process start-up", "seconds": dist["wall_s"],
         "ratio": dist["wall_s"] / whole[n]},
        {"arm": "distributed: round 1 (agent start-up, first model download)", "seconds": dist["round1_s"]},
        {"arm": "distributed: median per-round time outside the slowest agent's training", "seconds": dist["overhead_s"]},
        *({"arm": f"distributed: of which coordinator {k[len('coordinator_'):-2]} (median)", "seconds": v}
          for k, v in dist.items() if k.startswith("coordinator_")),
    ]
    print_table(rows, ["arm", "seconds", "ratio"])
    print(f"{args.rounds} rounds, {n} sites x {args.per_site} images, fastest of {args.repeats} runs per arm; "
          "target ratio <= 1.10 (steady state)")
    all_runs = {"distributed_steady_s": [d["steady_s"] for d in dists],
                **{f"reference_{t}t_steady_s": [e[-1] - e[0] for e in runs] for t, runs in refs.items()}}
    print(f"every run: {all_runs}")
    meta = {"rounds": args.rounds, "sites": n, "per_site": args.per_site, "repeats": args.repeats, "runs": all_runs}
    print(f"rows: {write_rows('rounds', rows, quick=args.quick, meta=meta)}")


if __name__ == "__main__":
    main()

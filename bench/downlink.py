"""The downlink (issue 19 item 7): bytes each box receives and sends per round, and accuracy.

Two parts.

**wire** -- the real coordinator (rounds, ONNX FP32/INT8 export, signed manifests, rollout auto)
and N real edge agents (training, upload, model install, artifact fetch) in one process over
the in-memory broker; every agent has its own transport, whose payload counters give the bytes
it received (down) and sent (up); topic names and MQTT framing are not counted. The uplink codec
is the demo's ``delta|topk:0.05|ef|q:2|zstd``. Arms: the exact downlink (``xor|zstd``: each box
asks for an XOR delta of the float32 bit patterns) and compressed steps (each version is the
coordinator's compressed step from its parent, broadcast once on ``models/{v}/chunks``). Agents
rebuild the ONNX FP32 artifact from the weights they installed and take it when it is
byte-identical to the signed one; a control arm (the chosen step codec) downloads artifacts as
patches against the served version's instead. Only artifacts the profile's engine order can use
are fetched (ONNX FP32 here). Rows are per agent per round in the steady state (rounds 2..R:
round 1 also holds the first whole download of ``v0`` and its artifacts, reported on its own),
with the ratio to the float32 model.

**accuracy** -- the same federation in-process (``fedscan.experiments.federated``, the same
trainer, strategy and step encoder as the coordinator), mean of 3 seeds on the test split, with
the validation accuracy the step codec is chosen on; baselines: centralized, each site alone,
and the majority-class floor.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_workers, parser, pool, print_table, write_rows

from coordinator.model_repo import ModelRepository
from coordinator.rounds import Coordinator, RoundSettings
from coordinator.store import BlobStore, open_store
from coordinator.strategies import build_strategy
from edge_agent.agent import AgentSettings, EdgeAgent
from fedscan import experiments
from fedscan.compose import ValidationPass, exporter_for, initial_weights, model_spec_for, validation_batch_for
from firmware.profile import find_profile
from learning.datasets import ArrayDataset, load_demo_splits
from learning.partition import dirichlet_label_skew
from protocol.dispatch import topic_matches
from protocol.messages import TrainingConfig
from protocol.signing import SigningKey, TrustStore
from protocol.topics import Topics
from protocol.transport import MemoryBroker, MemoryTransport

UPLINK = "delta|topk:0.05|ef|q:2|zstd"
EXACT = "xor|zstd"
# ef after q feeds back the whole step error (deterministic rounding); ef after topk only what top-k dropped
STEPS = ["delta|topk:0.05|q:8|ef|zstd", "delta|topk:0.1|q:4|ef|zstd", "delta|topk:0.1|q:8|ef|zstd"]
TRAINING = TrainingConfig(local_epochs=1, batch_size=32, lr=0.003, momentum=0.9, loss="balanced_ce")
TARGET = 0.1  # downlink per agent per round <= 1/10 of the float32 model


class CountingTransport(MemoryTransport):
    """The in-memory transport, also counting received payload bytes per kind of topic."""

    def __init__(self, broker: MemoryBroker, client_id: str) -> None:
        super().__init__(broker, client_id)
        self.by_kind: Counter[str] = Counter()

    def _deliver(self, topic: str, payload: bytes) -> None:
        if any(topic_matches(f, topic) for f in self._dispatch.filters()):
            self.by_kind[_kind(topic)] += len(payload)
        super()._deliver(topic, payload)


def _kind(topic: str) -> str:
    parts = topic.split("/")[3:]  # fedscan/v1/{fleet}/...
    if parts and parts[0] == "agents":
        return "/".join(parts[2:3])
    return "/".join([parts[0], *parts[2:]]) if parts else topic


def _wait(cond: Any, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def wire(root: Path, downlink: str, splits: dict[str, ArrayDataset], parts: list[np.ndarray], rounds: int,
         seed: int, *, rebuild: bool = True) -> dict[str, Any]:
    """One federation over the in-memory broker; per-agent bytes between consecutive round completions.

    ``rebuild``: agents rebuild the ONNX FP32 artifact from the installed weights when that is
    byte-identical to the signed one (the default); ``False`` downloads every artifact as a patch.
    """
    profile = find_profile("xray-cxr-28")
    spec = model_spec_for(profile)
    val, train = splits["val"], splits["train"]
    key = SigningKey.generate()
    trust = TrustStore()
    trust.trust(key.public_raw)
    broker, topics = MemoryBroker(), Topics()
    store = open_store(f"sqlite:///{root / 'state.db'}")
    names = [f"site-{i + 1}" for i in range(len(parts))]
    for n in names:
        store.enroll_agent(n, profile.name, [])
    ct = MemoryTransport(broker, "coordinator")
    ct.connect()
    vpass = ValidationPass(spec, val)
    marks: list[tuple[int, dict[str, tuple[int, int]]]] = []
    transports: dict[str, CountingTransport] = {}

    def snapshot() -> dict[str, tuple[int, int]]:
        return {n: (t.traffic.rx_bytes, t.traffic.tx_bytes) for n, t in transports.items()}

    coord = Coordinator(
        store=store, blobs=BlobStore(root / "blobs"), repo=ModelRepository(root / "models"), transport=ct,
        topics=topics, strategy=build_strategy("fedavg"),
        settings=RoundSettings(rounds=rounds, min_clients=len(names), deadline_s=900, reannounce_s=10,
                               training=TRAINING, codec=UPLINK, seed=seed,
                               downlink_codec=None if downlink == EXACT else downlink),
        model_spec=spec, initial_tensors=initial_weights(spec, seed), evaluator=vpass.metrics,
        calibrator=vpass.calibration, exporter=exporter_for(spec, val, profile), signer=key,
        validation_batch=validation_batch_for(val, seed),
        on_round=lambda r, v, m: marks.append((r, snapshot())),
    )
    stop = threading.Event()
    threads = []
    agents = []
    for n, idx in zip(names, parts, strict=True):
        t = CountingTransport(broker, n)
        t.connect()
        transports[n] = t
        agent = EdgeAgent(AgentSettings(n, profile, root / n, threads=1, trust=trust, model_timeout_s=60,
                                        rebuild_artifacts=rebuild), t, train.subset(idx))
        agent.start()
        agents.append(agent)
        threads.append(threading.Thread(target=agent.run, args=(stop,), daemon=True))
    start = snapshot()
    coord.start()
    threads.append(threading.Thread(target=coord.run, args=(stop,), daemon=True))
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    try:
        _wait(lambda: len(marks) >= rounds, 300 * rounds, f"{rounds} rounds")
        final = f"v{rounds}"
        _wait(lambda: all(store.get_agent(n).reported_version == final for n in names), 300,  # type: ignore[union-attr]
              f"every agent serving {final}")
        time.sleep(1.0)  # the last reports' own bytes
        end = snapshot()
    finally:
        stop.set()
        for th in threads:
            th.join(10)
    seconds = time.perf_counter() - t0
    # interval i: from the previous mark to round i's completion; the final interval fetches v_R
    points = [start, *[m for _, m in marks], end]
    per_interval = [{n: (b[n][0] - a[n][0], b[n][1] - a[n][1]) for n in names} for a, b in itertools.pairwise(points)]
    test_acc = experiments.split_metrics(spec, coord.repo.tensors(final), splits["test"])["accuracy"]
    store.close()
    by_kind = sum((t.by_kind for t in transports.values()), Counter())
    return {"intervals": per_interval, "seconds": seconds, "test_accuracy": test_acc,
            "down_by_topic": {k: v / len(names) / (rounds + 1) for k, v in sorted(by_kind.items())},
            "coordinator_tx": ct.traffic.tx_bytes, "coordinator_rx": ct.traffic.rx_bytes, "rebuild": rebuild,
            "artifacts_rebuilt": sum(a.fetcher.rebuilder.rebuilt for a in agents)}


def wire_rows(runs: dict[tuple[str, bool], dict[str, Any]], float32: int, agents: int, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for (arm, _), run in runs.items():
        iv = run["intervals"]
        # round 1 also holds the first whole download of v0 and its artifacts; the interval after
        # the last round only the download of v_R: each steady interval holds one of everything
        steady = iv[1:rounds]
        down = [d for it in steady for d, _ in it.values()]
        up = [u for it in steady for _, u in it.values()]
        first_down = float(np.mean([d for d, _ in iv[0].values()]))
        rows.append({
            "part": "wire", "downlink": arm, "uplink": UPLINK, "agents": agents, "rounds": rounds,
            "artifacts": "rebuilt on the box" if run["rebuild"] else "downloaded as patches",
            "artifacts_rebuilt": run["artifacts_rebuilt"],
            "down_bytes_per_agent_round": float(np.mean(down)), "up_bytes_per_agent_round": float(np.mean(up)),
            "down_ratio_to_float32": float(np.mean(down)) / float32,
            "up_ratio_to_float32": float(np.mean(up)) / float32,
            "first_round_down_bytes_per_agent": first_down,
            "coordinator_tx_bytes": run["coordinator_tx"], "coordinator_rx_bytes": run["coordinator_rx"],
            "float32_bytes": float32, "test_accuracy_seed0": run["test_accuracy"], "seconds": run["seconds"],
            "meets_target": bool(np.mean(down) <= TARGET * float32),
            **{f"down_bytes_{k.replace('/', '_')}_per_agent_round_incl_first": v
               for k, v in run["down_by_topic"].items()},
        })
    return rows


def accuracy_rows(splits: dict[str, ArrayDataset], arms: list[str], rounds: int, seeds: int, agents: int,
                  baselines: bool = True, workers: int = 2) -> list[dict[str, Any]]:
    spec = model_spec_for(find_profile("xray-cxr-28"))
    train, val, test = splits["train"], splits["val"], splits["test"]
    jobs: dict[tuple[str, int], Any] = {}
    with pool(workers) as ex:
        for seed in range(seeds):
            parts = dirichlet_label_skew(train.labels, agents, 0.5, seed=seed)
            for arm in arms:
                jobs[(arm, seed)] = ex.submit(experiments.federated, spec, train, parts, test, rounds=rounds,
                                              training=TRAINING, seed=seed, threads=1, codec=UPLINK,
                                              downlink=None if arm == EXACT else arm, val=val)
            if not baselines:
                continue
            jobs[("centralized", seed)] = ex.submit(experiments.centralized, spec, train, parts, test, rounds=rounds,
                                                    training=TRAINING, seed=seed, threads=1)
            for i, idx in enumerate(parts if rounds > 1 else []):  # --quick: centralized only
                jobs[(f"site-{i + 1} alone", seed)] = ex.submit(experiments.single_site, spec, train, idx,
                                                                f"site-{i + 1}", test, rounds=rounds,
                                                                training=TRAINING, seed=seed, threads=1)
        results = {k: f.result() for k, f in jobs.items()}
    exact = float(np.mean([results[(EXACT, s)].final["accuracy"] for s in range(seeds)]))
    rows: list[dict[str, Any]] = []
    for arm in sorted({a for a, _ in results}, key=lambda a: (a not in arms, a)):
        runs = [results[(arm, s)] for s in range(seeds)]
        acc = float(np.mean([r.final["accuracy"] for r in runs]))
        row: dict[str, Any] = {"part": "accuracy", "arm": arm, "rounds": rounds, "seeds": seeds,
                               "accuracy": acc, "accuracy_std": float(np.std([r.final["accuracy"] for r in runs])),
                               "balanced_accuracy": float(np.mean([r.final["balanced_accuracy"] for r in runs])),
                               "auc": float(np.mean([r.final["auc"] for r in runs]))}
        if arm in arms:
            row["downlink"] = arm
            row["val_accuracy"] = float(np.mean([r.val_per_round[-1]["accuracy"] for r in runs]))
            row["accuracy_points_vs_exact"] = 100 * (acc - exact)
            if runs[0].downlink:
                row["step_bytes"] = float(np.mean([d["bytes"] for r in runs for d in r.downlink]))
        rows.append(row)
    majority = float(np.max(np.bincount(test.labels)) / len(test))
    rows.append({"part": "accuracy", "arm": "floor: majority class", "accuracy": majority})
    return rows


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--part", choices=["wire", "accuracy", "both"], default="both")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated step codecs to compare with exact")
    p.add_argument("--no-baselines", action="store_true", help="accuracy part: federated arms only (the same task's "
                   "centralized and single-site baselines are in bench/results/federated.json)")
    args = p.parse_args()
    torch.set_num_threads(1)
    steps = [s for s in args.steps.split(",") if s]
    splits = load_demo_splits()
    if args.quick:
        args.rounds, args.seeds, args.agents, steps = 2, 1, 2, steps[:1]  # accuracy part: 1 round
        rng = np.random.default_rng(0)
        splits = {"train": splits["train"].subset(rng.permutation(len(splits["train"]))[:300]),
                  "val": splits["val"].subset(rng.permutation(len(splits["val"]))[:400]),
                  "test": splits["test"]}
    spec = model_spec_for(find_profile("xray-cxr-28"))
    float32 = 4 * sum(int(v.size) for v in initial_weights(spec, 0)().values())
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    chosen = steps[0]
    if args.part in ("accuracy", "both"):
        acc = accuracy_rows(splits, [EXACT, *steps], 1 if args.quick else args.rounds, args.seeds, args.agents,
                            baselines=not args.no_baselines, workers=default_workers(args.quick))
        rows += acc
        print_table(acc, ["arm", "accuracy", "accuracy_std", "val_accuracy", "accuracy_points_vs_exact", "auc",
                          "step_bytes"])
        # the step codec the wire part runs: best validation accuracy (ties: fewer bytes); never the test split
        cands = [r for r in acc if r.get("downlink") in steps]
        chosen = max(cands, key=lambda r: (round(r["val_accuracy"], 3), -r.get("step_bytes", 0)))["downlink"]
        rows.append({"part": "choice", "downlink": chosen, "chosen_on": "validation accuracy, then step bytes"})
    if args.part in ("wire", "both"):
        parts = dirichlet_label_skew(splits["train"].labels, args.agents, 0.5, seed=0)
        runs: dict[tuple[str, bool], dict[str, Any]] = {}
        # the exact downlink and the chosen step codec on the real components; the control downloads
        # the artifacts instead of rebuilding them on the box
        for arm, rebuild in [(EXACT, True), (chosen, True), (chosen, False)]:
            with tempfile.TemporaryDirectory() as d:
                runs[(arm, rebuild)] = wire(Path(d), arm, splits, parts, args.rounds, seed=0, rebuild=rebuild)
            print(f"wire {arm} rebuild={rebuild}: {runs[(arm, rebuild)]['seconds']:.0f}s", flush=True)
        rows += wire_rows(runs, float32, args.agents, args.rounds)
        print_table([r for r in rows if r["part"] == "wire"],
                    ["downlink", "artifacts", "down_bytes_per_agent_round", "down_ratio_to_float32", "up_bytes_per_agent_round",
                     "first_round_down_bytes_per_agent", "test_accuracy_seed0", "meets_target"])
    print(f"small CNN ({float32:,} B float32), {args.agents} sites, Dirichlet 0.5, {args.rounds} rounds; "
          f"{time.perf_counter() - t0:.0f}s")
    print(f"rows: {write_rows('downlink', rows, quick=args.quick, meta={'uplink': UPLINK, 'steps': steps})}")


if __name__ == "__main__":
    main()

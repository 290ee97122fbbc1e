"""Asynchronous rounds pay off (issue 19 item 3): time to a target test accuracy, sync vs async (FedBuff).

An event-driven simulation in simulated time over the coordinator's real code: real local training
(``learning.trainer.train_local`` on each box's shard, the agents' per-round seeds), the real
strategy (``build_strategy("fedavg")``, aggregated as the round closer does) and FedBuff's staleness
discount (``coordinator.aggregate.staleness_discounted``), with the admission rules of
``coordinator.rounds.admission`` and the task rules of ``coordinator.rounds.tasks``:

* **sync**: every box gets the round's task; the round closes when all boxes' updates are in or
  at the deadline; later updates are refused (``round_closed``) and the box starts the next task.
* **async** (``--mode async``): every idle box gets the open round's task and keeps the one it
  is training; the buffer closes after K updates; an update trained ``s`` rounds back counts,
  discounted by ``(1 + s) ** -0.5``, if ``s <= max_staleness`` (else refused ``too_stale``, and the
  box takes the current task); a box whose update is in the open buffer waits for the next round.

Fleet: 12 boxes (PneumoniaMNIST, the small CNN at width 8, 40 sync rounds' compute: what fits 2 shared CPU cores), a Dirichlet(1.0)
label skew over the train split; a local training is 5 SGD
steps; it takes one time unit T on a normal box and 5 T on a third of them (x lognormal(0, 0.1)
jitter), and a fifth of the boxes is offline once for 20-40 T (training pauses, tasks wait).
Time is counted in T (on a real fleet, one local training on a normal box). Every sync round's
model is evaluated; async models at most once per T (a sync round lasts several T), which can
only make async look up to 1 T slower.

Same total compute: both arms stop once the boxes have trained for the same box-time (``budget``
sync rounds' worth, counting work that was refused or cut off by a deadline). Target: 95 % of the
centralized baseline's test accuracy (same total steps on the union of the data), mean of 3 seeds.
The buffer size K is chosen on the validation split (seed 0; time to 95 % of centralized
validation accuracy) before any test figure is looked at. Baselines: centralized, each box alone
(6 boxes, seeded choice, each for the compute it has in the sync arm), majority-class floor.
``--quick``: 6 boxes, 1 seed, a few rounds.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, pool, print_table, write_rows

from coordinator.aggregate import staleness_discounted
from coordinator.rounds import ModelSpec, round_training
from coordinator.strategies import ClientResult, build_strategy
from fedscan.compose import model_spec_for
from firmware.profile import find_profile
from learning.data_path import find_data_file
from learning.datasets import ArrayDataset, load_medmnist
from learning.local_update import site_seed
from learning.models import build_model
from learning.partition import dirichlet_label_skew
from learning.state import get_tensors, set_tensors
from learning.trainer import train_local
from protocol.codec import Tensors
from protocol.messages import TrainingConfig

# 5 steps per task; class-balanced CE over each box's own labels, as the federation tests train skewed sites
TRAINING = TrainingConfig(lr=0.05, batch_size=32, max_steps=5, local_epochs=100, momentum=0.9, loss="balanced_ce")
SLOW_FACTOR = 5.0
STALENESS_EXPONENT = 0.5  # RoundSettings' default
EVAL_EVERY_T = 1.0  # async models are evaluated at most once per T (a sync round lasts longer): costs async <= 1 T


@dataclasses.dataclass(frozen=True)
class Fleet:
    """Who the boxes are: data shards, speed factors, offline windows (all seeded)."""

    parts: list[np.ndarray]
    speed: list[float]
    offline: list[tuple[float, float]]  # [start, end) in T; (inf, inf) for boxes that stay online

    def finish(self, i: int, start: float, work: float) -> float:
        """When box ``i`` finishes ``work`` T of training started at ``start`` (training pauses while offline)."""
        a, b = self.offline[i]
        if a <= start < b:
            start = b
        end = start + work
        return end + (b - a) if start < a < end else end

    def active(self, i: int, start: float, stop: float) -> float:
        """Training time box ``i`` spent between ``start`` and ``stop``."""
        a, b = self.offline[i]
        return max(0.0, stop - start) - max(0.0, min(stop, b) - max(start, a))

    def available(self, i: int, t: float) -> float:
        """When box ``i`` can start a task given at ``t``."""
        a, b = self.offline[i]
        return b if a <= t < b else t


def make_fleet(labels: np.ndarray, boxes: int, seed: int) -> Fleet:
    rng = np.random.default_rng(seed)
    parts = dirichlet_label_skew(labels, boxes, alpha=1.0, seed=seed, min_size=20)
    slow = set(rng.choice(boxes, size=boxes // 3, replace=False).tolist())
    away = set(rng.choice(boxes, size=max(1, boxes // 5), replace=False).tolist())
    offline = [(float(rng.uniform(0, 30)), 0.0) if i in away else (float("inf"), float("inf")) for i in range(boxes)]
    offline = [(a, a + float(rng.uniform(20, 40))) if b == 0.0 else (a, b) for a, b in offline]
    return Fleet(parts, [SLOW_FACTOR if i in slow else 1.0 for i in range(boxes)], offline)


class Sim:
    """The shared pieces of both arms: data, model, training, evaluation, the curve."""

    def __init__(self, spec: ModelSpec, train: ArrayDataset, evaluate_on: ArrayDataset, fleet: Fleet, seed: int):
        self.spec, self.train, self.eval_data, self.fleet, self.seed = spec, train, evaluate_on, fleet, seed
        self.rng = np.random.default_rng(seed + 7)
        self.strategy = build_strategy("fedavg")
        torch.manual_seed(seed)
        self.model = build_model(spec.architecture, **spec.kwargs)
        self.curve: list[dict[str, float]] = []
        self.spent = 0.0
        self.refused = 0
        self.aggregations = 0
        self.staleness: list[int] = []  # of every accepted update

    def work(self, i: int) -> float:
        return self.fleet.speed[i] * float(self.rng.lognormal(0.0, 0.1))

    def local(self, i: int, base: Tensors, round_id: int) -> Tensors:
        cfg = round_training(TRAINING, self.strategy, self.seed, round_id)
        set_tensors(self.model, base)
        train_local(self.model, self.train.subset(self.fleet.parts[i]),
                    cfg.model_copy(update={"seed": site_seed(cfg.seed, f"box-{i}")}), threads=1)
        return get_tensors(self.model)

    def aggregate(self, round_id: int, base: Tensors, results: list[ClientResult]) -> Tensors:
        self.aggregations += 1
        self.staleness += [r.staleness for r in results]
        new, _ = self.strategy.aggregate(round_id, base, sorted(results, key=lambda r: r.agent_id))
        return new

    def record(self, t: float, round_id: int, weights: Tensors) -> None:
        from learning.metrics import evaluate

        set_tensors(self.model, weights)
        acc = float(evaluate(self.model, self.eval_data)["accuracy"])
        self.curve.append({"t": t, "round": round_id, "accuracy": acc, "compute": self.spent})


def run_sync(sim: Sim, initial: Tensors, budget: float, deadline: float) -> Sim:
    """Synchronous rounds: all boxes, close when all are in or at ``deadline`` T after the round opened."""
    fleet, boxes, t, weights, r = sim.fleet, len(sim.fleet.parts), 0.0, initial, 0
    while sim.spent < budget:
        r += 1
        starts = [fleet.available(i, t) for i in range(boxes)]
        finish = [fleet.finish(i, starts[i], sim.work(i)) for i in range(boxes)]
        close = min(max(finish), t + deadline)
        arrived = [i for i in range(boxes) if finish[i] <= close]
        sim.spent += sum(fleet.active(i, starts[i], min(finish[i], close)) for i in range(boxes) if starts[i] < close)
        sim.refused += boxes - len(arrived)
        results = [ClientResult(f"box-{i:03d}", sim.local(i, weights, r), len(fleet.parts[i])) for i in arrived]
        if results:
            weights = sim.aggregate(r, weights, results)
        t = close
        sim.record(t, r, weights)
    return sim


def run_async(sim: Sim, initial: Tensors, budget: float, k: int, max_staleness: int) -> Sim:
    """Buffered asynchronous rounds (FedBuff), as the coordinator's AsyncAdmission and TaskAnnouncer run them."""
    fleet, boxes = sim.fleet, len(sim.fleet.parts)
    r, t = 1, 0.0
    models: dict[int, Tensors] = {1: initial}  # round -> its base
    events: list[tuple[float, int, int, float]] = []  # (finish, box, task round, work)
    buffer: list[ClientResult] = []
    waiting: list[int] = []  # boxes whose update is in the open buffer

    def give_task(i: int, now: float) -> None:
        start = fleet.available(i, now)
        w = sim.work(i)
        heapq.heappush(events, (fleet.finish(i, start, w), i, r, w))

    for i in range(boxes):
        give_task(i, 0.0)
    while sim.spent < budget and events:
        t, i, q, w = heapq.heappop(events)
        sim.spent += w
        staleness = r - q
        if staleness > max_staleness:  # AsyncAdmission: too_stale; the box takes the current task
            sim.refused += 1
            give_task(i, t)
            continue
        client = sim.local(i, models[q], q)
        buffer.append(ClientResult(f"box-{i:03d}", staleness_discounted(client, models[q], models[r], staleness,
                                                                        STALENESS_EXPONENT),
                                   len(fleet.parts[i]), {}, staleness))
        waiting.append(i)
        if len(buffer) >= k:
            models[r + 1] = sim.aggregate(r, models[r], buffer)
            r += 1
            models.pop(r - max_staleness - 2, None)
            buffer = []
            if not sim.curve or t >= sim.curve[-1]["t"] + EVAL_EVERY_T:
                sim.record(t, r - 1, models[r])
            for j in waiting:
                give_task(j, t)
            waiting = []
    return sim


def centralized(spec: ModelSpec, train: ArrayDataset, idx: np.ndarray, steps: int, evals: list[ArrayDataset],
                seed: int) -> list[float]:
    from learning.metrics import evaluate

    torch.manual_seed(seed)
    model = build_model(spec.architecture, **spec.kwargs)
    train_local(model, train.subset(idx), TRAINING.model_copy(update={"max_steps": steps, "seed": seed}), threads=1)
    return [float(evaluate(model, d)["accuracy"]) for d in evals]


def job(kind: str, seed: int, boxes: int, budget_rounds: int, split: str, k: int, max_staleness: int,
        deadline: float, width: int) -> dict[str, Any]:
    """One arm and seed, in its own process (one torch thread)."""
    torch.set_num_threads(1)
    spec, train, evals = _data(width)
    fleet = make_fleet(train.labels, boxes, seed)
    budget = budget_rounds * sum(fleet.speed)  # box-time of that many rounds if nobody were offline
    if kind == "centralized":
        union = np.sort(np.concatenate(fleet.parts))
        steps = int(budget_rounds * boxes * TRAINING.max_steps)  # type: ignore[operator]
        val, test = centralized(spec, train, union, steps, [evals["val"], evals["test"]], seed)
        return {"kind": kind, "seed": seed, "val_accuracy": val, "test_accuracy": test}
    if kind == "alone":
        rng = np.random.default_rng(seed)
        chosen = rng.choice(boxes, size=min(6, boxes), replace=False)
        accs = [centralized(spec, train, fleet.parts[i], budget_rounds * TRAINING.max_steps,  # type: ignore[operator]
                            [evals[split]], seed)[0] for i in chosen]
        return {"kind": kind, "seed": seed, "accuracy": float(np.mean(accs)), "per_box": accs}
    print(f"async bench: {kind} seed {seed} k {k} on {split}", flush=True)
    torch.manual_seed(seed)
    initial = get_tensors(build_model(spec.architecture, **spec.kwargs))
    sim = Sim(spec, train, evals[split], fleet, seed)
    if kind == "sync":
        run_sync(sim, initial, budget, deadline)
    else:
        run_async(sim, initial, budget, k, max_staleness)
    return {"kind": kind, "seed": seed, "split": split, "k": k, "curve": sim.curve, "refused": sim.refused,
            "compute": sim.spent, "aggregations": sim.aggregations,
            "staleness_mean": float(np.mean(sim.staleness)) if sim.staleness else 0.0,
            "staleness_max": max(sim.staleness, default=0)}


_CACHE: dict[int, tuple[ModelSpec, ArrayDataset, dict[str, ArrayDataset]]] = {}


def _data(width: int) -> tuple[ModelSpec, ArrayDataset, dict[str, ArrayDataset]]:
    if width not in _CACHE:
        spec = model_spec_for(find_profile("xray-cxr-28"))
        spec = dataclasses.replace(spec, kwargs={**spec.kwargs, "width": width})
        path = find_data_file("pneumoniamnist.npz")
        if path is None:
            raise SystemExit("bench/async.py needs pneumoniamnist.npz (../shared/data or FEDSCAN_DATA)")
        _CACHE[width] = (spec, load_medmnist(path, "train"),
                         {s: load_medmnist(path, s) for s in ("val", "test")})
    return _CACHE[width]


def time_to(curve: list[dict[str, float]], target: float) -> float | None:
    return next((p["t"] for p in curve if p["accuracy"] >= target), None)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--boxes", type=int, default=None)
    args = p.parse_args()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    boxes = args.boxes or (6 if args.quick else 12)
    budget_rounds = 2 if args.quick else 40
    seeds = [0] if args.quick else [0, 1, 2]
    ks = [3] if args.quick else [boxes // 4, boxes // 2]
    max_staleness, deadline, width = 10, 8.0, 8
    common: dict[str, Any] = {"boxes": boxes, "budget_rounds": budget_rounds, "max_staleness": max_staleness,
              "deadline": deadline, "width": width}
    with pool(1 if args.quick else args.workers) as ex:
        central = [ex.submit(job, "centralized", s, split="test", k=0, **common) for s in seeds]
        tune = {k: ex.submit(job, "async", 0, split="val", k=k, **common) for k in ks}
        alone = [ex.submit(job, "alone", s, split="test", k=0, **common) for s in seeds]
        sync = [ex.submit(job, "sync", s, split="test", k=0, **common) for s in seeds]
        cen = [f.result() for f in central]
        val_target = 0.95 * float(np.mean([c["val_accuracy"] for c in cen]))
        target = 0.95 * float(np.mean([c["test_accuracy"] for c in cen]))
        tuned = {k: time_to(f.result()["curve"], val_target) for k, f in tune.items()}
        k_best = min(ks, key=lambda k: (tuned[k] is None, tuned[k] or 0.0))
        asyn = [ex.submit(job, "async", s, split="test", k=k_best, **common) for s in seeds]
        sync_r, async_r, alone_r = [f.result() for f in sync], [f.result() for f in asyn], [f.result() for f in alone]
    rows: list[dict[str, Any]] = []
    for name, runs in (("sync", sync_r), ("async", async_r)):
        times = [time_to(r["curve"], target) for r in runs]
        reached = [x for x in times if x is not None]
        rows.append({"arm": name, "k": runs[0]["k"] or boxes, "seeds": len(runs), "target_accuracy": round(target, 4),
                     "reached_seeds": len(reached),
                     "time_to_target_T": round(float(np.mean(reached)), 2) if len(reached) == len(runs) else None,
                     "time_to_target_T_per_seed": times,
                     "final_accuracy": round(float(np.mean([r["curve"][-1]["accuracy"] for r in runs])), 4),
                     "best_accuracy": round(float(np.mean([max(p["accuracy"] for p in r["curve"]) for r in runs])), 4),
                     "aggregations": round(float(np.mean([r["aggregations"] for r in runs])), 1),
                     "evaluations": round(float(np.mean([len(r["curve"]) for r in runs])), 1),
                     "staleness_mean": round(float(np.mean([r["staleness_mean"] for r in runs])), 2),
                     "staleness_max": max(r["staleness_max"] for r in runs),
                     "compute_T": round(float(np.mean([r["compute"] for r in runs])), 1),
                     "refused_updates": round(float(np.mean([r["refused"] for r in runs])), 1),
                     "sim_time_T": round(float(np.mean([r["curve"][-1]["t"] for r in runs])), 1)})
    s, a = rows[0]["time_to_target_T"], rows[1]["time_to_target_T"]
    speedup = round(s / a, 2) if s and a else None
    rows.append({"arm": "centralized", "test_accuracy": round(float(np.mean([c["test_accuracy"] for c in cen])), 4)})
    rows.append({"arm": "each box alone (mean of 6)", "test_accuracy":
                 round(float(np.mean([r["accuracy"] for r in alone_r])), 4)})
    test = _data(width)[2]["test"]
    rows.append({"arm": "floor (majority class)",
                 "test_accuracy": round(float(np.bincount(test.labels).max() / len(test.labels)), 4)})
    print_table(rows, ["arm", "k", "target_accuracy", "reached_seeds", "time_to_target_T", "final_accuracy",
                       "best_accuracy", "aggregations", "staleness_mean", "compute_T", "refused_updates", "test_accuracy"])
    print(f"speed-up async vs sync (time to target): {speedup}  (K chosen on validation: {k_best}, {tuned})")
    meta = {"load_avg_at_start": load_at_start, "boxes": boxes,
            "budget_sync_rounds": budget_rounds, "seeds": seeds, "slow_fraction": "1/3", "slow_factor": SLOW_FACTOR,
            "offline": "1/5 of boxes once for U(20,40) T, starting U(0,30) T", "sync_deadline_T": deadline,
            "max_staleness": max_staleness, "staleness_exponent": STALENESS_EXPONENT, "k_candidates": ks,
            "k_chosen_on_validation": k_best, "val_time_to_target_by_k": tuned, "val_target": round(val_target, 4),
            "target": "95% of centralized test accuracy (mean of seeds)", "speedup_time_to_target": speedup,
            "speedup_goal": ">= 3x (FedBuff reports 3.3-3.8x)", "model": f"small_cnn width {width}",
            "training": TRAINING.model_dump(), "curves": {f"{r['kind']}-{r['seed']}": r["curve"]
                                                          for r in sync_r + async_r}}
    print(f"wrote {write_rows('async', rows, quick=args.quick, meta=meta)}")


if __name__ == "__main__":
    main()

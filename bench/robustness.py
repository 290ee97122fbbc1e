"""Byzantine robustness on PneumoniaMNIST (issue 9): one of 5 agents attacks, which aggregators hold?

Setup: 5 agents, Dirichlet(α=0.5) label skew over the 4708 training images, the demo task
(small CNN width 32 GroupNorm, 1 local epoch per round, batch 32, lr 0.003, momentum 0.9,
class-balanced CE), in-process federation (``experiments.federated``: the real strategies,
trainer and seeds) with the attack hook (``fedscan.attacks``) applied to the attacker's update
before aggregation:

- ``clean``: no attack;
- ``scale-10``: the attacker sends ``base − 10·Δ`` (its honest delta scaled by −10);
- ``noise10x``: the attacker sends ``base + g``, Gaussian ``g`` with ``‖g‖ = 10·‖Δ‖``.

Aggregators: FedAvg (sample-weighted), coordinate median, trimmed mean (β = 0.2: one value cut
at each end of 5), Krum (f = 1; n = 5 = 2f + 3 is the smallest n Krum allows).

Which agent attacks: the one whose data share is the median of the five (the 3rd largest), so the
attacker is a typical site — neither a 1 % site (whose update FedAvg would weight to nothing) nor
the largest (whose loss alone would cost the robust aggregators most). Its share is in every row.

Metric (the accuracy at the 0.5 threshold jumps by several points between rounds under α = 0.5):
every figure is the mean over the last 3 rounds of a run, then the mean over ``--seeds`` seeds
(the seed changes the partition, the initial weights, the attacker and the training order).
The default is one seed: 12 runs × 10 rounds of the full set already take ~13 CPU-minutes, and
the whole ``make bench`` must stay under an hour on 2 cores; ``--seeds 3`` for a firmer figure.
Balanced accuracy and AUC are reported next to accuracy.

Targets (issue 9), from the measured means, never adjusted: FedAvg under attack falls by more
than 10 accuracy points below clean FedAvg; median / trimmed mean / Krum under attack are no
more than 2 points below clean FedAvg (above is fine). Each verdict row has ``meets_target``.

Rows go to ``bench/results/robustness.json`` (a bench of its own: it has nothing to do with ε;
``bench/privacy.py`` holds the DP rows).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, print_table, write_rows

from fedscan import experiments
from fedscan.attacks import AttackFn, NoiseAttack, ScaleAttack
from fedscan.compose import model_spec_for
from learning.datasets import ArrayDataset, load_demo_splits
from learning.partition import dirichlet_label_skew
from protocol.messages import TrainingConfig
from protocol.profile import find_profile

STRATEGIES = ("fedavg", "median", "trimmed_mean", "krum", "weighted_median", "weighted_trimmed_mean")
ATTACKS = ("clean", "scale-10", "noise10x")
METRICS = experiments.METRICS
FEDAVG_DROP_POINTS = 10.0
ROBUST_TOLERANCE_POINTS = 2.0


def median_share_site(parts: list[np.ndarray]) -> str:
    """The site whose size is the median of all sites (ties: the lower index)."""
    order = np.argsort([len(p) for p in parts], kind="stable")
    return f"site-{int(order[len(parts) // 2]) + 1}"


def make_attack(kind: str, attacker: str, seed: int) -> AttackFn | None:
    if kind == "clean":
        return None
    if kind == "scale-10":
        return ScaleAttack(attacker, -10.0)
    if kind == "noise10x":
        return NoiseAttack(attacker, 10.0, seed=seed)
    raise ValueError(f"unknown attack {kind!r}")


def tail_mean(per_round: list[dict[str, float]], last: int) -> dict[str, float]:
    """Mean of each metric over the last ``last`` rounds (NaN-aware: a diverged model has no AUC)."""
    tail = per_round[-last:]
    out = {}
    for k in METRICS:
        vals = np.asarray([m[k] for m in tail], dtype=np.float64)
        out[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return out


def verdicts(summary: dict[tuple[str, str], dict[str, float]], strategies: tuple[str, ...]) -> list[dict[str, Any]]:
    """Target checks from the mean rows: points = 100 × accuracy difference to clean FedAvg."""
    clean = summary[("fedavg", "clean")]["accuracy"]
    out: list[dict[str, Any]] = []
    for attack in ATTACKS[1:]:
        for strategy in strategies:
            acc = summary[(strategy, attack)]["accuracy"]
            diff = 100 * (acc - clean)
            if strategy == "fedavg":
                target, meets = f"falls > {FEDAVG_DROP_POINTS:g} points", diff < -FEDAVG_DROP_POINTS
            else:
                target, meets = f"at most {ROBUST_TOLERANCE_POINTS:g} points below", diff >= -ROBUST_TOLERANCE_POINTS
            out.append({"seed": "verdict", "strategy": strategy, "attack": attack,
                        "accuracy": acc, "clean_fedavg_accuracy": clean,
                        "accuracy_points_vs_clean_fedavg": diff, "target": target, "meets_target": bool(meets)})
    return out


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--agents", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--last", type=int, default=3, help="rounds averaged at the end of each run")
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--strategies", default=None, help="comma-separated subset (fedavg is always run)")
    args = p.parse_args()
    strategies = tuple(dict.fromkeys(["fedavg", *args.strategies.split(",")])) if args.strategies else STRATEGIES
    train, test = _data(args.quick)
    if args.quick:
        args.rounds, args.seeds, args.last = 2, 1, 1
    spec = model_spec_for(find_profile("xray-cxr-28"))
    training = TrainingConfig(local_epochs=1, batch_size=32, lr=args.lr, momentum=0.9, loss="balanced_ce")
    t0 = time.perf_counter()
    jobs: dict[tuple[int, str, str], Future[experiments.ArmResult]] = {}
    attackers: dict[int, tuple[str, float]] = {}
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2, mp_context=mp.get_context("spawn")) as ex:
        for seed in range(args.seeds):
            parts = dirichlet_label_skew(train.labels, args.agents, args.alpha, seed=seed)
            attacker = median_share_site(parts)
            attackers[seed] = (attacker, len(parts[int(attacker.split("-")[1]) - 1]) / len(train))
            for attack in ATTACKS:
                for strategy in strategies:
                    jobs[(seed, strategy, attack)] = ex.submit(
                        experiments.federated, spec, train, parts, test, rounds=args.rounds, training=training,
                        strategy=strategy, seed=seed, threads=1, attack=make_attack(attack, attacker, seed))
        results = {k: f.result() for k, f in jobs.items()}
    rows: list[dict[str, Any]] = []
    for (seed, strategy, attack), res in results.items():
        attacker, share = attackers[seed]
        rows.append({"seed": seed, "strategy": strategy, "attack": attack, "attacker": attacker,
                     "attacker_share": share, "rounds": args.rounds, "last_rounds_averaged": args.last,
                     **tail_mean(res.per_round, args.last),
                     "final_round_accuracy": res.final["accuracy"], "seconds": res.seconds})
    summary: dict[tuple[str, str], dict[str, float]] = {}
    mean_rows: list[dict[str, Any]] = []
    for attack in ATTACKS:
        for strategy in strategies:
            sel = [r for r in rows if r["strategy"] == strategy and r["attack"] == attack]
            m = {k: float(np.nanmean([r[k] for r in sel])) for k in METRICS}
            summary[(strategy, attack)] = m
            mean_rows.append({"seed": "mean", "strategy": strategy, "attack": attack, "rounds": args.rounds,
                              "last_rounds_averaged": args.last, "seeds": args.seeds, **m})
    checks = verdicts(summary, strategies)
    seconds = time.perf_counter() - t0
    print_table(rows + mean_rows, ["seed", "strategy", "attack", "attacker", "attacker_share", "accuracy",
                                   "balanced_accuracy", "auc", "final_round_accuracy"])
    print_table(checks, ["strategy", "attack", "accuracy", "accuracy_points_vs_clean_fedavg", "target",
                         "meets_target"])
    print(f"{len(results)} runs in {seconds:.0f}s")
    path = write_rows("robustness" if args.strategies is None else "robustness-subset", rows + mean_rows + checks, quick=args.quick,
                      meta={"agents": args.agents, "alpha": args.alpha, "lr": args.lr, "loss": "balanced_ce",
                            "model": "small_cnn width 32 GroupNorm", "local_epochs_per_round": 1,
                            "trimmed_mean_beta": 0.2, "krum_f": 1, "attacker_rule": "median data share",
                            "metric": f"mean of the last {args.last} rounds, then mean over {args.seeds} seeds",
                            "train_images": len(train), "test_images": len(test), "seconds": seconds})
    print(f"rows: {path}")


def _data(quick: bool) -> tuple[ArrayDataset, ArrayDataset]:
    splits = load_demo_splits()
    train, test = splits["train"], splits["test"]
    if quick:
        train = train.subset(np.sort(np.random.default_rng(0).permutation(len(train))[:600]))
        test = test.subset(np.arange(0, len(test), 3))
    return train, test


if __name__ == "__main__":
    main()

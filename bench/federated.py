"""Federated vs centralized vs single-site on PneumoniaMNIST (issue 3).

4 sites, Dirichlet(α=0.5) label skew, equal local epochs in every arm (one round = one local
epoch), mean over 3 seeds of test accuracy, balanced accuracy and AUC. The federated arm runs
in-process with the same strategy, trainer and seeds as the real agents (``bench/rounds.py``
measures what the broker and processes add). Reference: MedMNIST v2 centralized ResNet-18 (28)
ACC 0.854 / AUC 0.944.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_workers, parser, pool, print_table, write_rows

from fedscan import experiments
from fedscan.compose import model_spec_for
from firmware.profile import find_profile
from learning.datasets import load_demo_splits
from learning.partition import dirichlet_label_skew
from protocol.messages import TrainingConfig

MEDMNIST_RESNET18_28 = {"accuracy": 0.854, "auc": 0.944}


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--strategy", default="fedavg")
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--loss", default="balanced_ce")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.seeds = 2, 1
    spec = model_spec_for(find_profile("xray-cxr-28"))
    splits = load_demo_splits()
    train, test = splits["train"], splits["test"]
    if args.quick:
        train = train.subset(np.random.default_rng(0).permutation(len(train))[:800])
    training = TrainingConfig(local_epochs=1, batch_size=32, lr=args.lr, momentum=0.9, loss=args.loss)
    t0 = time.perf_counter()
    jobs: dict[tuple[int, str], Any] = {}
    with pool(default_workers(args.quick)) as ex:
        for seed in range(args.seeds):
            parts = dirichlet_label_skew(train.labels, args.sites, args.alpha, seed=seed)
            kw: dict[str, Any] = {"rounds": args.rounds, "training": training, "seed": seed, "threads": 1}
            jobs[(seed, "federated")] = ex.submit(experiments.federated, spec, train, parts, test,
                                                  strategy=args.strategy, **kw)
            jobs[(seed, "centralized")] = ex.submit(experiments.centralized, spec, train, parts, test, **kw)
            for i, idx in enumerate(parts):
                jobs[(seed, f"site-{i + 1}")] = ex.submit(experiments.single_site, spec, train, idx, f"site-{i + 1}",
                                                          test, **kw)
        results = {k: f.result() for k, f in jobs.items()}
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        fed, cen = results[(seed, "federated")].final, results[(seed, "centralized")].final
        sites = [results[(seed, f"site-{i + 1}")] for i in range(args.sites)]
        local = experiments.mean_curve(sites)[-1]
        for arm, m in (("federated", fed), ("centralized", cen), ("single_site_mean", local)):
            rows.append({"seed": seed, "arm": arm, "rounds": args.rounds, "accuracy": m["accuracy"],
                         "balanced_accuracy": m["balanced_accuracy"], "auc": m["auc"]})
    summary = []
    for arm in ("federated", "centralized", "single_site_mean"):
        sel = [r for r in rows if r["arm"] == arm]
        summary.append({"seed": "mean", "arm": arm, "rounds": args.rounds,
                        **{k: float(np.mean([r[k] for r in sel])) for k in ("accuracy", "balanced_accuracy", "auc")}})
    fed_m, cen_m, loc_m = summary
    verdict = {
        "seed": "mean", "arm": "verdict",
        "fed_minus_centralized_accuracy_points": 100 * (fed_m["accuracy"] - cen_m["accuracy"]),
        "fed_minus_single_site_accuracy_points": 100 * (fed_m["accuracy"] - loc_m["accuracy"]),
        "fed_minus_medmnist_resnet18_accuracy_points": 100 * (fed_m["accuracy"] - MEDMNIST_RESNET18_28["accuracy"]),
        # the target: federated no more than 2 points below centralized (better is fine)
        "at_most_2_points_below_centralized": fed_m["accuracy"] >= cen_m["accuracy"] - 0.02,
        "above_single_site_mean": fed_m["accuracy"] > loc_m["accuracy"],
    }
    all_rows = rows + summary + [verdict]
    print_table(rows + summary, ["seed", "arm", "rounds", "accuracy", "balanced_accuracy", "auc"])
    print({k: v for k, v in verdict.items() if k not in ("seed", "arm")})
    print(f"MedMNIST v2 centralized ResNet-18 (28): ACC {MEDMNIST_RESNET18_28['accuracy']}, "
          f"AUC {MEDMNIST_RESNET18_28['auc']}; this run {time.perf_counter() - t0:.0f}s")
    path = write_rows("federated", all_rows, quick=args.quick,
                      meta={"sites": args.sites, "alpha": args.alpha, "strategy": args.strategy, "lr": args.lr,
                            "loss": args.loss, "model": "small_cnn width 32 GroupNorm", "local_epochs_per_round": 1})
    print(f"rows: {path}")


if __name__ == "__main__":
    main()

"""Accuracy against ε on PneumoniaMNIST (issue 9): client DP-SGD and central DP with adaptive clipping.

Both arms at δ = 1e-5 and ε ∈ {∞, 8, 4, 2}; ε = ∞ is the same pipeline (same clipping) with noise
multiplier 0, so the ∞ row isolates what the noise costs. One seed (0); test metrics of the final
model and the mean over the last 3 rounds (accuracy at the 0.5 threshold jumps between rounds).
Demo model: small CNN width 32 GroupNorm (opacus refuses BatchNorm).

**Client DP-SGD** (``learning.dp``: opacus, record-level DP per site): 4 sites, Dirichlet(α=0.5)
label skew (as ``bench/federated.py``), FedAvg; every round each site trains one local epoch of
DP-SGD (Poisson sampling, rate ``q = 1 / ceil(n_site / 32)``, per-sample clipping at
``--dp-clip``, lr ``--dp-lr``, momentum 0.9). Each site's noise multiplier comes from opacus'
``get_noise_multiplier`` for the target ε over *all* its steps of *all* rounds
(``rounds · ceil(n_site / 32)``); the ε column is the largest ε any site spent, recomputed with
``coordinator.privacy.RdpAccountant`` over the planned steps. Loss: plain cross-entropy — the
demo's class-balanced CE normalises by the batch's total class weight (coupling the samples of a
batch, which per-sample clipping assumes they are not) and takes its weights from the site's
private label counts, which no accountant covers.

**Central DP** (``coordinator.strategies.central_dp.CentralDP``: Andrew et al. 2021 adaptive
clipping, user-level DP for the simulated clients): the 4 sites are cut into ``--shards`` IID
shards each (4 × 25 = 100 clients of ~47 images by default), in-process. Each round every client
is drawn with probability ``--sample-rate`` (Poisson; the noised sum is divided by the expected
count, as the paper does), trains one local epoch (batch 32, lr ``--client-lr``, plain CE) and
sends its delta; the strategy clips (target quantile 0.5, initial clip 0.1, clip lr 0.2, count
noise std max(m/20, 2z)), adds noise and hands the mean to FedAvgM (server lr 1, momentum 0.9). The noise
multiplier is the smallest that keeps ``rounds`` rounds within a ``PrivacyBudget`` of the target ε
(``coordinator.privacy.noise_multiplier_for_epsilon``); the budget guard runs every round.
The default sample rate is 1 (every client every round): with 100 clients, sampling buys less
amplification than it costs in averaging (at ε = 8, 15 rounds: q = 1 → noise norm ≈ 5.9 C on
the mean, q = 0.5 → ≈ 9.3 C, with d = 56k parameters). Expect central DP with this few clients
to be near chance at finite ε: the noise on the mean shrinks as 1 / clients per round, and
deployments that train well with it have thousands (``--shards`` raises the population).

Rows: ``bench/results/privacy.json``. Robustness rows are in ``bench/results/robustness.json``
(``bench/robustness.py``): a separate question, separate runs.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, print_table, write_rows

from coordinator.privacy import PrivacyBudget, RdpAccountant, noise_multiplier_for_epsilon
from coordinator.rounds import ModelSpec, round_training
from coordinator.strategies import ClientResult
from coordinator.strategies.central_dp import CentralDP
from coordinator.strategies.fedavg import FedAvg, FedAvgM
from edge_agent.agent import agent_seed
from fedscan import experiments
from fedscan.compose import model_spec_for
from learning.datasets import ArrayDataset, load_demo_splits
from learning.dp import make_private, noise_multiplier_for
from learning.models import build_model
from learning.partition import dirichlet_label_skew, iid
from learning.state import get_tensors, set_tensors
from learning.trainer import poisson_batches, sgd_optimizer, train_local
from protocol.codec import Tensors
from protocol.messages import TrainingConfig
from protocol.profile import find_profile

DELTA = 1e-5
EPSILONS = (math.inf, 8.0, 4.0, 2.0)
METRICS = experiments.METRICS


def _quiet() -> None:
    # dp-accounting logs a warning for every RDP order whose series does not converge (it then
    # leaves that order out, which keeps ε an upper bound); opacus warns about its hooks
    logging.getLogger("absl").setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    warnings.filterwarnings("ignore", message=".*Optimal order.*")


def _summary(per_round: list[dict[str, float]], last: int) -> dict[str, float]:
    tail = per_round[-last:]
    out = {k: float(per_round[-1][k]) for k in METRICS}
    out.update({f"{k}_last{last}_mean": float(np.nanmean([m[k] for m in tail])) for k in METRICS})
    return out


def dp_sgd_arm(spec: ModelSpec, train: ArrayDataset, parts: list[np.ndarray], test: ArrayDataset, *,
               epsilon: float, rounds: int, training: TrainingConfig, clip: float, seed: int,
               last: int) -> dict[str, Any]:
    """FedAvg over sites that each train with DP-SGD; one row."""
    _quiet()
    t0 = time.perf_counter()
    names = [f"site-{i + 1}" for i in range(len(parts))]
    steps = {n: math.ceil(len(p) / training.batch_size) for n, p in zip(names, parts, strict=True)}
    z = {n: 0.0 if math.isinf(epsilon) else noise_multiplier_for(epsilon, DELTA, 1.0 / s, rounds * s)
         for n, s in steps.items()}
    accountants = {n: RdpAccountant() for n in names}
    weights = experiments.initial(spec, seed)
    strategy = FedAvg()
    per_round: list[dict[str, float]] = []
    for r in range(1, rounds + 1):
        round_cfg = round_training(training, strategy, seed, r)
        results = []
        for name, idx in zip(names, parts, strict=True):
            cfg = round_cfg.model_copy(update={"seed": agent_seed(round_cfg.seed, name)})
            data = train.subset(idx)
            model = build_model(spec.architecture, **spec.kwargs)
            set_tensors(model, weights)
            loader = DataLoader(data.to_tensor_dataset(), batch_size=cfg.batch_size)
            pt = make_private(model, sgd_optimizer(model, cfg), loader, noise_multiplier=z[name],
                              max_grad_norm=clip, seed=cfg.seed)
            dp_optimizer = pt.optimizer

            def use_dp_optimizer(_m: torch.nn.Module, _c: TrainingConfig,
                                 o: torch.optim.Optimizer = dp_optimizer) -> torch.optim.Optimizer:
                return o

            train_local(pt.model, data, cfg, threads=1, optimizer_factory=use_dp_optimizer,
                        batch_plan=poisson_batches(pt.sample_rate), loss_fn=F.cross_entropy)
            accountants[name].compose(z[name], pt.sample_rate, steps[name])  # planned steps: conservative
            results.append(ClientResult(name, get_tensors(pt.unwrap()), len(idx)))
        weights, _ = strategy.aggregate(r, weights, results)
        per_round.append(experiments.split_metrics(spec, weights, test))
    spent = max(a.epsilon(DELTA) for a in accountants.values())
    return {"arm": "client_dp_sgd", "target_epsilon": epsilon, "epsilon": spent, "delta": DELTA,
            "clients": len(parts), "clients_per_round": len(parts), "rounds": rounds,
            "noise_multiplier_min": min(z.values()), "noise_multiplier_max": max(z.values()),
            "clip_norm": clip, "lr": training.lr, **_summary(per_round, last),
            "per_round_accuracy": [m["accuracy"] for m in per_round], "seconds": time.perf_counter() - t0}


def central_dp_arm(spec: ModelSpec, train: ArrayDataset, shards: list[np.ndarray], test: ArrayDataset, *,
                   epsilon: float, rounds: int, training: TrainingConfig, sample_rate: float, seed: int,
                   last: int) -> dict[str, Any]:
    """Simulated clients (one per shard) under CentralDP; one row."""
    _quiet()
    t0 = time.perf_counter()
    population = len(shards)
    expected = max(1, round(sample_rate * population))
    z = 0.0 if math.isinf(epsilon) else noise_multiplier_for_epsilon(epsilon, DELTA, sample_rate, rounds)
    budget = None if math.isinf(epsilon) else PrivacyBudget(epsilon, DELTA)
    # count noise: Andrew et al.'s m/20, raised to 2z where that is smaller, so that the update
    # noise σ_Δ = (z^-2 − (2σ_b)^-2)^-1/2 stays within 3.3 % of z (m/20 alone would give σ_Δ ≫ z
    # when z approaches m/10, as at ε = 2 with 100 clients)
    count_std = max(expected / 20, 2 * z)
    strategy = CentralDP(z, clients_per_round=expected, population=population, budget=budget, seed=seed,
                         count_stddev=count_std,
                         inner=FedAvgM(server_lr=1.0, momentum=0.9))
    weights = experiments.initial(spec, seed)
    names = [f"client-{i + 1:04d}" for i in range(population)]
    per_round: list[dict[str, float]] = []
    drawn: list[int] = []
    clip: list[float] = []
    for r in range(1, rounds + 1):
        round_cfg = round_training(training, strategy, seed, r)  # runs the budget guard
        rng = np.random.default_rng([seed, r, 7])
        chosen = [i for i in range(population) if sample_rate >= 1.0 or rng.random() < sample_rate]
        drawn.append(len(chosen))
        results = []
        for i in chosen:
            cfg = round_cfg.model_copy(update={"seed": agent_seed(round_cfg.seed, names[i])})
            results.append(ClientResult(names[i], _train_plain(spec, weights, train.subset(shards[i]), cfg),
                                        len(shards[i])))
        if not results:  # nobody drawn: nothing released, nothing spent
            per_round.append(per_round[-1] if per_round else experiments.split_metrics(spec, weights, test))
            continue
        clip.append(strategy.clip_norm)
        weights, _ = strategy.aggregate(r, weights, results)
        per_round.append(experiments.split_metrics(spec, weights, test))
    spent = budget.spent if budget is not None else math.inf
    return {"arm": "central_dp_adaptive_clip", "target_epsilon": epsilon, "epsilon": spent, "delta": DELTA,
            "clients": population, "clients_per_round": float(np.mean(drawn)), "sample_rate": sample_rate,
            "rounds": rounds, "noise_multiplier_min": z, "noise_multiplier_max": z,
            "count_stddev": count_std, "update_noise_multiplier": strategy.sigma_update,
            "clip_norm_first": clip[0] if clip else float("nan"), "clip_norm": strategy.clip_norm,
            "lr": training.lr, **_summary(per_round, last),
            "per_round_accuracy": [m["accuracy"] for m in per_round], "seconds": time.perf_counter() - t0}


def _train_plain(spec: ModelSpec, start: Tensors, data: ArrayDataset, cfg: TrainingConfig) -> Tensors:
    model = build_model(spec.architecture, **spec.kwargs)
    set_tensors(model, start)
    train_local(model, data, cfg, threads=1, loss_fn=F.cross_entropy)
    return get_tensors(model)


def shard_sites(parts: list[np.ndarray], shards_per_site: int, seed: int) -> list[np.ndarray]:
    """Cut each site's indices into ``shards_per_site`` IID shards (a site's patients as clients)."""
    out: list[np.ndarray] = []
    for i, p in enumerate(parts):
        out.extend(p[s] for s in iid(len(p), shards_per_site, seed=seed * 1000 + i))
    return out


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--dp-rounds", type=int, default=10)
    p.add_argument("--dp-lr", type=float, default=0.01)
    p.add_argument("--dp-clip", type=float, default=1.0)
    p.add_argument("--central-rounds", type=int, default=20)
    p.add_argument("--shards", type=int, default=25, help="clients per site in the central-DP arm")
    p.add_argument("--sample-rate", type=float, default=1.0)
    p.add_argument("--client-lr", type=float, default=0.02)
    p.add_argument("--last", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    _quiet()
    torch.set_num_threads(1)
    splits = load_demo_splits()
    train, test = splits["train"], splits["test"]
    epsilons: tuple[float, ...] = EPSILONS
    if args.quick:
        train = train.subset(np.sort(np.random.default_rng(0).permutation(len(train))[:600]))
        test = test.subset(np.arange(0, len(test), 3))
        args.dp_rounds, args.central_rounds, args.last, args.sample_rate, args.shards = 2, 2, 1, 0.5, 4
        epsilons = (math.inf, 2.0)
    spec = model_spec_for(find_profile("xray-cxr-28"))
    parts = dirichlet_label_skew(train.labels, args.sites, args.alpha, seed=args.seed)
    shards = shard_sites(parts, args.shards, args.seed)
    base = TrainingConfig(local_epochs=1, batch_size=32, lr=args.dp_lr, momentum=0.9, loss="ce")
    t0 = time.perf_counter()
    jobs: list[Future[dict[str, Any]]] = []
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2, mp_context=mp.get_context("spawn")) as ex:
        for eps in epsilons:
            jobs.append(ex.submit(central_dp_arm, spec, train, shards, test, epsilon=eps,
                                  rounds=args.central_rounds, training=base.model_copy(update={"lr": args.client_lr}),
                                  sample_rate=args.sample_rate, seed=args.seed, last=args.last))
            jobs.append(ex.submit(dp_sgd_arm, spec, train, parts, test, epsilon=eps, rounds=args.dp_rounds,
                                  training=base, clip=args.dp_clip, seed=args.seed, last=args.last))
        rows = [f.result() for f in jobs]
    rows.sort(key=lambda r: (r["arm"], -r["target_epsilon"]))
    for arm in ("client_dp_sgd", "central_dp_adaptive_clip"):
        ref = next(r for r in rows if r["arm"] == arm and math.isinf(r["target_epsilon"]))
        for r in rows:
            if r["arm"] == arm:
                key = f"accuracy_last{args.last}_mean"
                r["accuracy_points_vs_eps_inf"] = 100 * (r[key] - ref[key])
                r["within_budget"] = bool(r["epsilon"] <= r["target_epsilon"] * (1 + 1e-6))
    seconds = time.perf_counter() - t0
    print_table(rows, ["arm", "target_epsilon", "epsilon", "noise_multiplier_max", "clients", "clients_per_round",
                       "accuracy", f"accuracy_last{args.last}_mean", "balanced_accuracy", "auc",
                       "accuracy_points_vs_eps_inf", "seconds"])
    print(f"{len(rows)} runs in {seconds:.0f}s")
    for r in rows:
        r["target_epsilon"] = "inf" if math.isinf(r["target_epsilon"]) else r["target_epsilon"]
        r["epsilon"] = "inf" if math.isinf(r["epsilon"]) else r["epsilon"]
    path = write_rows("privacy", rows, quick=args.quick,
                      meta={"sites": args.sites, "alpha": args.alpha, "delta": DELTA, "seed": args.seed,
                            "model": "small_cnn width 32 GroupNorm", "shards_per_site": args.shards,
                            "train_images": len(train), "test_images": len(test), "seconds": seconds,
                            "epsilon_inf": "noise multiplier 0, same clipping"})
    print(f"rows: {path}")


if __name__ == "__main__":
    main()

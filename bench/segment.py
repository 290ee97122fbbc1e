"""Federated lesion segmentation across two modalities with per-site adaptive DP (issue 18).

Dermoscopy (PH2, clinicians' masks) and brain FLAIR (masks from an automatic model, DLWMLS —
not drawn by hand: every MRI figure here is agreement with that model) in one MONAI U-Net, two
sites per modality (``learning.segmentation``). Lesion Dice on the test split per site (the model
the site serves: under FedBN the shared weights plus the site's own norm layers) and per modality
(mean over its sites), mean over seeds; PH2 Dice per image, MRI Dice per subject volume.

Arms: ``federated`` with ``fedavg`` (everything shared) and ``fedbn`` (norm layers local); each
site ``alone``; ``centralized`` (one model on the union, as many steps as the federation in
total). At ε = ∞ and, with per-site DP-SGD (record-level ε per site, δ = 1e-5, noise calibrated
to the site's own ε over all planned rounds), at ε = 8 and 4 with ``adaptive`` (quantile-based,
Andrew et al. 2021, target quantile 0.1, from C₀) and ``fixed`` (C₀) clipping; the DP arms train with
their own optimizer (``dp_optimizer``/``dp_lr``, chosen by ``--dp-tune`` on the validation split). Floor: predicting every
pixel as lesion (``floor_all_lesion``).

Settings (chosen on the validation split, seed 0; see ``SETTINGS``): 64×64 grey input (3-channel
RGB/replicated FLAIR was no better on validation, and costs more), U-Net widths 8-16-32-64 with
instance norm (affine), Adam lr 2e-3, batch 8, 10 steps per round at every site, 40 rounds,
FedAvg of the shared tensors with one vote per site (weighting by images let the MRI sites,
8× more slices, swamp dermoscopy: validation Dice 0.65 vs 0.85), C₀ = 1 (the median per-image
gradient norm at initialisation is 1.3–1.9). DP arms (``--dp-tune``, ``--clip-tune``, validation, ε = 4):
SGD momentum 0.9 at lr 0.01 (Adam diverged), fixed C = 1 (of 0.5 / 1 / 2), adaptive quantile 0.1 with
η = 0.05 (of quantiles 0.9 / 0.5 / 0.2 / 0.1 and η 0.2 / 0.05; the step scaled by C₀ / C, ``adaptive-lr``,
did worse at every quantile). The DP grid runs at ``--dp-seeds`` seeds (1 by default:
three take ~25 min here).

``--quick`` (``make test``): tiny subsets, 32×32, 2 rounds, 1 seed — checks the bench runs, says
nothing about accuracy. Timings on this shared 2-core machine are noisy.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, pool, print_table, write_rows

from fedscan.segment_arms import RunResult, run_centralized, run_federated, run_single
from learning.data_path import data_dir
from learning.segmentation.client import SegTrainConfig
from learning.segmentation.data import MASKS_NOTE, MRI, PH2, PH2_NOTE, SegSplits, build_splits
from learning.segmentation.model import SegModelConfig, dice_scores
from learning.segmentation.privacy import SitePrivacy
from learning.segmentation.sharing import ShareRule

EPSILONS = (8.0, 4.0)


@dataclass(frozen=True)
class Settings:
    """Everything that fixes one bench run (recorded in the results' meta)."""

    size: int = 64
    channels: int = 1
    widths: tuple[int, ...] = (8, 16, 32, 64)
    rounds: int = 40
    steps: int = 10
    batch_size: int = 8
    lr: float = 2e-3
    weighting: str = "equal"
    initial_clip: float = 1.0  # adaptive clipping starts here
    target_quantile: float = 0.1  # adaptive: the quantile of per-image gradient norms C follows (--clip-tune)
    clip_lr: float = 0.05  # adaptive: η of the geometric update (``--clip-tune``: 0.05 over 0.2 on validation)
    fixed_clip: float = 1.0  # fixed clipping's C
    lr_per_clip: bool = False  # adaptive: learning rate × initial_clip / C at each step (``SitePrivacy``)
    #: the DP arms' optimizer (``--dp-tune`` chose it on validation: Adam diverges under DP noise)
    dp_optimizer: str = "sgd"
    dp_lr: float = 0.01
    dp_momentum: float = 0.9
    delta: float = 1e-5
    split_seed: int = 0
    limits: tuple[int, int, int, int, int, int] | None = None  # ph2 n/val/test, mri n/val/test (quick)


SETTINGS = Settings()
QUICK = Settings(size=32, rounds=2, steps=2, batch_size=4, limits=(24, 4, 4, 8, 1, 1))


@dataclass(frozen=True)
class Job:
    """One arm at one seed (``site`` for the single-site arm)."""

    arm: str
    share: str
    epsilon: float
    clipping: str
    seed: int
    site: str = ""


_SPLITS: dict[tuple[Any, ...], SegSplits] = {}


def load(s: Settings) -> SegSplits:
    """Both modalities' sites and held-out splits (cached per process and input settings)."""
    key = (s.size, s.channels, s.split_seed, s.limits)
    if key not in _SPLITS:
        kw: dict[str, Any] = {}
        if s.limits is not None:
            pn, pv, pt, mn, mv, mt = s.limits
            kw = {"ph2_limit": pn, "ph2_val": pv, "ph2_test": pt, "mri_limit": mn, "mri_val": mv, "mri_test": mt}
        _SPLITS[key] = build_splits(data_dir(), size=s.size, channels=s.channels, seed=s.split_seed, **kw)
    return _SPLITS[key]


def run_job(job: Job, s: Settings, eval_split: str = "test") -> tuple[Job, RunResult]:
    """Run one job in this (single-threaded) process."""
    import torch

    torch.set_num_threads(1)
    splits = load(s)
    mc = SegModelConfig(in_channels=s.channels, channels=s.widths)
    cfg = SegTrainConfig(steps=s.steps, batch_size=s.batch_size, lr=s.lr, share=ShareRule(job.share))
    if not np.isinf(job.epsilon):
        cfg = replace(cfg, optimizer=s.dp_optimizer, lr=s.dp_lr, momentum=s.dp_momentum)  # type: ignore[arg-type]
    priv = None if np.isinf(job.epsilon) else SitePrivacy(
        epsilon=job.epsilon, delta=s.delta, planned_rounds=s.rounds, clipping=job.clipping,  # type: ignore[arg-type]
        initial_clip=s.fixed_clip if job.clipping == "fixed" else s.initial_clip,
        target_quantile=s.target_quantile, clip_lr=s.clip_lr, lr_per_clip=s.lr_per_clip)
    noise_seed = 10_000 + job.seed
    if job.arm == "federated":
        res = run_federated(splits, mc, cfg, rounds=s.rounds, seed=job.seed, weighting=s.weighting,  # type: ignore[arg-type]
                            privacy={x.name: priv for x in splits.sites}, noise_seed=noise_seed,
                            eval_split=eval_split)
    elif job.arm == "alone":
        res = run_single(splits, job.site, mc, cfg, rounds=s.rounds, seed=job.seed, privacy=priv,
                         noise_seed=noise_seed, eval_split=eval_split)
    else:
        res = run_centralized(splits, mc, cfg, rounds=s.rounds, seed=job.seed, privacy=priv, noise_seed=noise_seed,
                              eval_split=eval_split)
    return job, res


def plan_jobs(seeds: int, dp_seeds: int, sites: list[str]) -> list[Job]:
    """Every arm: ε = ∞ at ``seeds`` seeds, the DP arms at ``dp_seeds`` seeds (costliest first)."""
    out: list[Job] = []
    for seed in range(seeds):
        out += [Job("federated", share, np.inf, "none", seed) for share in ("fedbn", "fedavg")]
        out += [Job("centralized", "fedavg", np.inf, "none", seed)]
        out += [Job("alone", "fedavg", np.inf, "none", seed, site) for site in sites]
    for seed in range(dp_seeds):
        for eps in EPSILONS:
            for clip in ("adaptive", "fixed"):
                out += [Job("federated", share, eps, clip, seed) for share in ("fedbn", "fedavg")]
                out += [Job("centralized", "fedavg", eps, clip, seed)]
                out += [Job("alone", "fedavg", eps, clip, seed, site) for site in sites]
    cost = {"federated": 4.0, "centralized": 4.0, "alone": 1.0}
    return sorted(out, key=lambda j: -(cost[j.arm] * (1.0 if np.isinf(j.epsilon) else 1.5)))


def _label(job: Job) -> dict[str, Any]:
    return {"arm": job.arm, "share": job.share if job.arm == "federated" else "",
            "epsilon": "inf" if np.isinf(job.epsilon) else job.epsilon, "clipping": job.clipping}


def aggregate(results: list[tuple[Job, RunResult]], splits: SegSplits) -> list[dict[str, Any]]:
    """Flat rows: mean Dice over seeds per (arm, ε, clipping) and scope (site or modality)."""
    groups: dict[tuple[Any, ...], list[tuple[Job, RunResult]]] = {}
    for job, res in results:
        key = (*_label(job).values(), job.site)
        groups.setdefault(key, []).append((job, res))
    modality_of = {s.name: s.modality for s in splits.sites}
    rows: list[dict[str, Any]] = []
    for runs in groups.values():
        job = runs[0][0]
        scopes = [(k, "site") for k in runs[0][1].site_dice] + [(m, "modality") for m in runs[0][1].modality_dice]
        for scope, kind in scopes:
            vals = [(r.site_dice if kind == "site" else r.modality_dice)[scope] for _, r in runs]
            modality = modality_of[scope] if kind == "site" else scope
            row = {**_label(job), "scope": scope, "modality": modality, "dice": float(np.mean(vals)),
                   "dice_std": float(np.std(vals)), "seeds": len(vals), "dice_per_seed": [round(v, 4) for v in vals],
                   "seconds_mean": float(np.mean([r.seconds for _, r in runs]))}
            if kind == "site":
                priv = [r.privacy.get(scope) or r.privacy.get("central") for _, r in runs]
                if priv[0]:
                    row.update({"epsilon_spent": float(np.max([p["dp_epsilon"] for p in priv if p])),
                                "noise_multiplier": float(np.mean([p["dp_noise_multiplier"] for p in priv if p])),
                                "final_clip": float(np.mean([p["dp_clip"] for p in priv if p]))})
            row["masks"] = MASKS_NOTE if modality == MRI else PH2_NOTE
            rows.append(row)
    return rows


def floor_rows(splits: SegSplits) -> list[dict[str, Any]]:
    """The sanity floor: every pixel called lesion, per modality (test split)."""
    rows = []
    for modality, data in splits.test.items():
        d = dice_scores(np.ones_like(data.masks), data.masks, data.cases)
        rows.append({"arm": "floor_all_lesion", "share": "", "epsilon": "inf", "clipping": "none", "scope": modality,
                     "modality": modality, "dice": float(np.nanmean(list(d.values()))), "dice_std": 0.0, "seeds": 0,
                     "masks": MASKS_NOTE if modality == MRI else PH2_NOTE})
    return rows


def _dice(rows: list[dict[str, Any]], **match: Any) -> float | None:
    hit = [r["dice"] for r in rows if all(r.get(k) == v for k, v in match.items())]
    return hit[0] if hit else None


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's two targets, per modality, from the rows."""
    out: dict[str, Any] = {}
    for m in (PH2, MRI):
        alone = [r["dice"] for r in rows if r["arm"] == "alone" and r["epsilon"] == "inf" and r["modality"] == m
                 and r["scope"] != m]
        mean_alone = float(np.mean(alone)) if alone else None
        for share in ("fedavg", "fedbn"):
            fed = _dice(rows, arm="federated", share=share, epsilon="inf", scope=m)
            out[f"{m}/{share}_inf_ge_mean_alone"] = None if fed is None or mean_alone is None else {
                "federated": round(fed, 4), "mean_alone": round(mean_alone, 4), "met": fed >= mean_alone}
            ada = _dice(rows, arm="federated", share=share, epsilon=4.0, clipping="adaptive", scope=m)
            fix = _dice(rows, arm="federated", share=share, epsilon=4.0, clipping="fixed", scope=m)
            floor = _dice(rows, arm="floor_all_lesion", scope=m)
            degenerate = ada is not None and fix is not None and floor is not None and max(ada, fix) <= floor
            out[f"{m}/{share}_eps4_adaptive_ge_fixed"] = None if ada is None or fix is None else {
                "adaptive": round(ada, 4), "fixed": round(fix, 4),
                # both at or below the floor: neither learnt anything, so no comparison to win
                "met": None if degenerate else ada >= fix}
    return out


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _on_validation(jobs: list[tuple[Settings, Job]], workers: int,
                   describe: Any) -> list[dict[str, Any]]:
    """Run ``(settings, job)`` pairs on the validation split; a row per modality, ``describe(settings, job)`` added."""
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        futures = [(s, ex.submit(run_job, j, s, "val")) for s, j in jobs]
        for s, f in futures:
            job, res = f.result()
            for scope, dice in res.modality_dice.items():
                rows.append({**_label(job), **describe(s, job), "scope": scope, "val_dice": dice,
                             "seconds": res.seconds})
            print(rows[-1], flush=True)
    return rows


def _validation_meta(split: str, t0: float, **extra: Any) -> dict[str, Any]:
    return {"commit": _commit(), "split": split, **extra,
            "load_avg_1m_5m_15m": [round(v, 2) for v in os.getloadavg()],
            "wall_seconds": round(time.perf_counter() - t0), "masks_note_mri": MASKS_NOTE}


def budget_check(candidates: list[tuple[int, int]], workers: int) -> None:
    """Validation Dice (seed 0, ε = ∞) of smaller budgets against the validated one: how the bench was fitted
    into 20 minutes without looking at the test split. Rows in ``bench/results/segment_budget.json``."""
    t0 = time.perf_counter()
    site_names = [x.name for x in load(SETTINGS).sites]
    jobs = [(replace(SETTINGS, size=size, rounds=rounds), j) for size, rounds in candidates
            for j in [Job("federated", "fedbn", np.inf, "none", 0), Job("federated", "fedavg", np.inf, "none", 0),
                      *[Job("alone", "fedavg", np.inf, "none", 0, site) for site in site_names]]]
    rows = _on_validation(jobs, workers, lambda s, j: {"site": j.site, "input_size": s.size, "rounds": s.rounds})
    print_table(rows, ["input_size", "rounds", "arm", "share", "site", "scope", "val_dice", "seconds"])
    write_rows("segment_budget", rows, quick=False, meta=_validation_meta(
        "validation only, seed 0, epsilon inf", t0, candidates=candidates))


def dp_tune(candidates: list[tuple[str, float]], workers: int) -> None:
    """Validation Dice (seed 0, ε = 4, federated FedBN, adaptive and fixed clipping) of the DP arms'
    optimizer candidates; the choice is the best mean over both clippings and both modalities, so
    neither clipping is favoured. Rows in ``bench/results/segment_dp_tuning.json``."""
    t0 = time.perf_counter()
    jobs = [(replace(SETTINGS, dp_optimizer=opt, dp_lr=lr), Job("federated", "fedbn", 4.0, clip, 0))
            for opt, lr in candidates for clip in ("adaptive", "fixed")]
    rows = _on_validation(jobs, workers, lambda s, j: {"optimizer": s.dp_optimizer, "lr": s.dp_lr})
    score = {c: float(np.mean([r["val_dice"] for r in rows if (r["optimizer"], r["lr"]) == c])) for c in candidates}
    best = max(score, key=lambda c: score[c])
    rows += [{"optimizer": o, "lr": lr, "mean_val_dice": v, "chosen": (o, lr) == best} for (o, lr), v in score.items()]
    print_table(rows, ["optimizer", "lr", "clipping", "scope", "val_dice", "mean_val_dice", "chosen"])
    write_rows("segment_dp_tuning", rows, quick=False, meta=_validation_meta(
        "validation only, seed 0, epsilon 4, federated fedbn", t0, candidates=candidates, rounds=SETTINGS.rounds,
        momentum=SETTINGS.dp_momentum))


def clip_tune(candidates: list[str], workers: int) -> None:
    """Validation Dice (seed 0, ε = 4, federated FedBN, the DP optimizer) of clipping candidates,
    ``fixed:C`` or ``adaptive:QUANTILE:ETA``: each clipping method is then run at its own best (mean
    over both modalities), so the comparison is of methods at their validated settings. Rows in
    ``bench/results/segment_clip_tuning.json``."""
    t0 = time.perf_counter()
    jobs = []
    for c in candidates:
        kind, *v = c.split(":")
        s = replace(SETTINGS, fixed_clip=float(v[0])) if kind == "fixed" else replace(
            SETTINGS, target_quantile=float(v[0]), clip_lr=float(v[1]), lr_per_clip=kind == "adaptive-lr")
        jobs.append((s, Job("federated", "fedbn", 4.0, "fixed" if kind == "fixed" else "adaptive", 0)))
    rows = _on_validation(jobs, workers, lambda s, j: {"candidate": (
        f"fixed:{s.fixed_clip:g}" if j.clipping == "fixed" else
        f"{'adaptive-lr' if s.lr_per_clip else 'adaptive'}:{s.target_quantile:g}:{s.clip_lr:g}")})
    score = {c: float(np.mean([r["val_dice"] for r in rows if r["candidate"] == c])) for c in {r["candidate"] for r in rows}}
    for kind in ("fixed", "adaptive"):
        mine = {c: v for c, v in score.items() if c.startswith(kind)}
        if mine:
            best = max(mine, key=lambda c: mine[c])
            rows += [{"clipping": kind, "candidate": c, "mean_val_dice": v, "chosen": c == best} for c, v in mine.items()]
    print_table(rows, ["candidate", "clipping", "scope", "val_dice", "mean_val_dice", "chosen"])
    write_rows("segment_clip_tuning", rows, quick=False, meta=_validation_meta(
        "validation only, seed 0, epsilon 4, federated fedbn", t0, candidates=candidates, rounds=SETTINGS.rounds,
        optimizer=SETTINGS.dp_optimizer, lr=SETTINGS.dp_lr))


def main() -> None:
    """Run the jobs on ``--workers`` single-threaded processes and write the rows."""
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds of the ε = ∞ arms")
    p.add_argument("--dp-seeds", type=int, default=1, help="seeds of the DP arms")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, help="override the validated rounds (a reduced run: written to "
                   "segment-reduced.json, never segment.json)")
    p.add_argument("--size", type=int, help="override the validated input side (a reduced run, as --rounds)")
    p.add_argument("--budget-check", default=None, help="SIZExROUNDS,... : validation Dice of smaller budgets "
                   "(seed 0, ε = ∞), e.g. 64x40,32x20,48x20")
    p.add_argument("--dp-tune", default=None, help="OPT:LR,... : validation Dice of the DP arms' optimizer "
                   "candidates (seed 0, ε = 4), e.g. adam:0.0005,sgd:0.05,sgd:0.01")
    p.add_argument("--clip-tune", default=None, help="fixed:C,...,adaptive[-lr]:QUANTILE:ETA,... : validation Dice of "
                   "clipping settings (seed 0, ε = 4), each method's best is chosen")
    args = p.parse_args()
    if args.clip_tune:
        clip_tune(args.clip_tune.split(","), args.workers)
        return
    if args.dp_tune:
        dp_tune([(o, float(lr)) for o, lr in (c.split(":") for c in args.dp_tune.split(","))], args.workers)
        return
    if args.budget_check:
        budget_check([(int(a), int(b)) for a, b in (c.split("x") for c in args.budget_check.split(","))], args.workers)
        return
    s = QUICK if args.quick else SETTINGS
    reduced = not args.quick and (args.rounds is not None or args.size is not None)
    if reduced:
        s = replace(s, rounds=args.rounds or s.rounds, size=args.size or s.size)
    seeds, dp_seeds = (1, 1) if args.quick else (args.seeds, args.dp_seeds)
    t0 = time.perf_counter()
    splits = load(s)
    jobs = plan_jobs(seeds, dp_seeds, [x.name for x in splits.sites])
    print(f"{len(jobs)} jobs on {args.workers} workers; {MASKS_NOTE} (brain FLAIR)", flush=True)
    results: list[tuple[Job, RunResult]] = []
    with pool(1 if args.quick else args.workers) as ex:
        futures = [ex.submit(run_job, j, s) for j in jobs]
        for f in futures:
            job, res = f.result()
            results.append((job, res))
            print(f"  {job.arm:<11} {job.share:<6} ε={job.epsilon:<4} {job.clipping:<8} seed {job.seed} {job.site:<7} "
                  f"{ {k: round(v, 3) for k, v in res.modality_dice.items()} } {res.seconds:.0f}s", flush=True)
    rows = floor_rows(splits) + aggregate(results, splits)
    meta = {"commit": _commit(), "quick": args.quick, "settings": {**asdict(replace(s)), "widths": list(s.widths)},
            "seeds_inf": seeds, "seeds_dp": dp_seeds, "split": "test", "masks_note_mri": MASKS_NOTE,
            "masks_note_ph2": PH2_NOTE, "load_avg_1m_5m_15m": [round(v, 2) for v in os.getloadavg()],
            "sites": {x.name: {"modality": x.modality, "images": len(x.train), "cases": len(set(x.train.cases))}
                      for x in splits.sites},
            "test_cases": {m: len(set(d.cases)) for m, d in splits.test.items()},
            "targets": targets(rows), "wall_seconds": round(time.perf_counter() - t0, 1),
            "privacy_unit": "record-level per site: one PH2 image / one MRI slice (not one subject)"}
    if reduced:
        meta["reduced"] = (f"NOT the validated settings: rounds {s.rounds} (validated {SETTINGS.rounds}), size {s.size} "
                           f"(validated {SETTINGS.size}); a smaller run for a machine that could not fit the full one")
    path = write_rows("segment-reduced" if reduced else "segment", rows, quick=args.quick, meta=meta)
    print_table([r for r in rows if r["scope"] in (PH2, MRI)],
                ["arm", "share", "epsilon", "clipping", "scope", "dice", "dice_std", "seeds"])
    print("targets:", meta["targets"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

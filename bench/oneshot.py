"""One-shot FL (FedISCA) vs FedAvg after 1, 5 and 20 rounds vs each site alone (issue 17).

Every arm starts from the same seeded initial model and gives every site the same local compute,
``--steps`` optimizer steps of the default recipe (``learning/recipe.py``: SGD, cosine schedule,
class-balanced loss); the arms differ only in how often they talk:

* **site alone**: each site trains its ``--steps`` steps on its own data and serves that model;
* **one-shot**: the same site models, each uploaded once; the coordinator synthesizes images
  from them and distills their ensemble into the global model (``learning/oneshot``), no real data;
* **ensemble (teacher)** (reference): the equal-weight mean of the site models' logits, the teacher
  one-shot distills from, served as it is (every site model at once: sites × the inference cost).
  Distillation rarely ends above its teacher, so where this arm is below a single site one-shot is
  not expected to beat that site either;
* **FedAvg@1**: the same site models, averaged once (FedAvg weights by sample count, the runtime's
  strategy) — exactly the bytes one-shot sends;
* **FedAvg@5 / @20**: 5 or 20 rounds of ``steps / rounds`` local steps per site;
* **centralized** (reference): one model on the union of the sites, ``sites × steps`` steps;
* **floor**: the majority class of the training data (accuracy = its share of the test split, AUC 0.5).

All networks are the small CNN with BatchNorm (the one-shot method inverts BatchNorm statistics;
the FedAvg arms use the same model so the comparison is of the protocol, not the norm layer).
Bytes per site are the raw fp32 update frames as the transport chunks them (``protocol.frame``,
``protocol.chunks``): FedAvg sends one model up and receives one down per round; one-shot sends
one up and needs none down before training (sites start from the seeded initialization). The
final model every arm serves is downloaded once by every site in all arms and is not counted.

Data: PneumoniaMNIST (28×28, 4 sites by Dirichlet(α=0.5) label skew, seeded per seed) and ISIC
UDA-1 (32×32 RGB, the fixed test split ``learning/splits/isic_uda1_test.txt``, sites by acquisition
device, ``learning.isic.device_sites``). Test accuracy, balanced accuracy and AUC of the final model
of every arm (no per-round selection in any arm), mean of 3 seeds. The one-shot settings were
chosen on the validation splits only (``--tune``, rows in ``bench/results/oneshot_tuning.json``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, pool, print_table, write_rows

from coordinator.rounds import ModelSpec
from coordinator.strategies import ClientResult, build_strategy
from fedscan import experiments
from fedscan.baselines import model_probs, report
from fedscan.oneshot_job import DEFAULT
from learning import isic, recipe
from learning.datasets import DEFAULT_NORMALIZE, ArrayDataset, load_demo_splits
from learning.metrics import predict_proba
from learning.models import build_model
from learning.oneshot.ensemble import Ensemble
from learning.oneshot.fedisca import OneShotConfig, one_shot
from learning.partition import dirichlet_label_skew
from learning.state import get_tensors, set_tensors
from learning.trainer import train_local
from protocol.chunks import split
from protocol.codec import Tensors
from protocol.frame import encode_update
from protocol.manifest import InputSpec
from protocol.messages import TrainingConfig

METRICS = ("auc", "balanced_accuracy", "accuracy")
FEDAVG_ROUNDS = (5, 20)
CHUNK_BYTES = 256 * 1024
PIXEL_RANGE = (-2.0, 2.0)  # pixels 0 and 255 after the profiles' normalization (x/255 - 0.5) / 0.25

# One setting for both datasets, chosen on the validation splits (bench/results/oneshot_tuning.json); the job
# over the broker uses the same (fedscan/oneshot_job.py).
ONESHOT = DEFAULT


# ------------------------------------------------------------------------------------------------ data
def load_dataset(name: str, quick: bool) -> tuple[dict[str, ArrayDataset], list[str], Any]:
    """Return the splits, the site names and how to make the sites of a seed (a callable)."""
    if name == "pneumoniamnist":
        splits = load_demo_splits(allow_generated=False)
        if quick:
            rng = np.random.default_rng(0)
            splits = {k: v.subset(np.sort(rng.permutation(len(v))[: 400 if k == "train" else 100]))
                      for k, v in splits.items()}
        names = [f"site-{i + 1}" for i in range(4)]
        return splits, names, ("dirichlet", 4, 0.5)
    if name == "isic":
        splits = isic.load_splits(16 if quick else 32)
        sites = isic.device_sites(splits["train"], min_size=40)
        return splits, sites.names, ("fixed", sites.parts)
    raise ValueError(f"unknown dataset {name!r}")


def site_parts(how: Any, labels: np.ndarray, seed: int) -> list[np.ndarray]:
    """Return the sites of ``seed``: a seeded Dirichlet label skew, or the fixed device sites."""
    if how[0] == "dirichlet":
        return dirichlet_label_skew(labels, how[1], how[2], seed=seed, min_size=20)
    return list(how[1])


def spec_for(data: ArrayDataset, width: int) -> ModelSpec:
    """Return the small CNN with BatchNorm for ``data``'s input."""
    h, w = data.image_size
    return ModelSpec(architecture="small_cnn",
                     kwargs={"in_channels": data.channels, "num_classes": data.num_classes, "width": width,
                             "norm": "batch"},
                     classes=list(data.classes), input=InputSpec(channels=data.channels, height=h, width=w))


# ------------------------------------------------------------------------------------------------ arms
def train_from(spec: ModelSpec, start: Tensors, data: ArrayDataset, cfg: TrainingConfig) -> Tensors:
    """Return the weights after one local training call from ``start`` (one thread)."""
    model = build_model(spec.architecture, **spec.kwargs)
    set_tensors(model, start)
    train_local(model, data, cfg, threads=1)
    return get_tensors(model)


def frame_bytes(tensors: Tensors) -> int:
    """Return the bytes of one raw fp32 model frame as the transport chunks it."""
    frame = encode_update(tensors, agent_id="site", round_id=1, base_version="v0", sample_count=1, codec="raw")
    return sum(len(c) for c in split(frame, "bytes", CHUNK_BYTES))


def metrics_of(spec: ModelSpec, tensors: Tensors, data: ArrayDataset) -> dict[str, float]:
    """Return AUC, balanced accuracy and accuracy of a model on ``data``."""
    return _scores(data, model_probs(spec, tensors, data))


def _scores(data: ArrayDataset, probs: np.ndarray) -> dict[str, float]:
    r = report(data.labels, probs)
    return {k: float(r[k]) for k in METRICS}


def site_models(spec: ModelSpec, site_tensors: Sequence[Tensors]) -> list[torch.nn.Module]:
    """Return the site models built from their weights."""
    models = []
    for t in site_tensors:
        m = build_model(spec.architecture, **spec.kwargs)
        set_tensors(m, t)
        models.append(m)
    return models


def ensemble_metrics(spec: ModelSpec, site_tensors: Sequence[Tensors], data: ArrayDataset) -> dict[str, float]:
    """Return AUC, balanced accuracy and accuracy of the one-shot teacher (equal-weight ensemble) on ``data``."""
    return _scores(data, predict_proba(Ensemble(site_models(spec, site_tensors)), data, normalize=DEFAULT_NORMALIZE)[1])


def run_oneshot(spec: ModelSpec, site_tensors: Sequence[Tensors], cfg: OneShotConfig, seed: int) -> Tensors:
    """Return the global model distilled from the site models (coordinator side, one thread)."""
    torch.set_num_threads(1)
    models = site_models(spec, site_tensors)
    torch.manual_seed(seed)
    student = build_model(spec.architecture, **spec.kwargs)
    shape = (spec.input.channels, spec.input.height, spec.input.width)
    one_shot(models, student, shape, cfg, seed=seed)
    return get_tensors(student)


@dataclass
class Federation:
    """One dataset and seed: the splits, the sites, the model and the site models after local training."""

    dataset: str
    seed: int
    splits: dict[str, ArrayDataset]
    names: list[str]
    parts: list[np.ndarray]
    spec: ModelSpec
    start: Tensors
    site_tensors: list[Tensors]
    site_seconds: float


def federation(dataset: str, seed: int, steps: int, width: int, quick: bool) -> Federation:
    """Load the data and train the site models: ``steps`` local steps each from the common start (seeded per site)."""
    torch.set_num_threads(1)
    splits, names, how = load_dataset(dataset, quick)
    train = splits["train"]
    parts = site_parts(how, train.labels, seed)
    spec = spec_for(train, width)
    w0 = experiments.initial(spec, seed)
    t0 = time.perf_counter()
    cfg1 = recipe.default_training(1, steps)
    site_tensors = [train_from(spec, w0, train.subset(idx), cfg1.model_copy(update={"seed": seed * 1009 + i}))
                    for i, idx in enumerate(parts)]
    return Federation(dataset, seed, splits, list(names), parts, spec, w0, site_tensors, time.perf_counter() - t0)


def run_seed(dataset: str, seed: int, steps: int, width: int, quick: bool, cfg: OneShotConfig) -> list[dict[str, Any]]:
    """Run every arm of one seed on one dataset; return one row per arm (test metrics, bytes, seconds)."""
    fed = federation(dataset, seed, steps, width, quick)
    train, test, spec, names, parts, w0 = fed.splits["train"], fed.splits["test"], fed.spec, fed.names, fed.parts, fed.start
    site_tensors, site_s = fed.site_tensors, fed.site_seconds
    strat = build_strategy("fedavg")
    model_bytes = frame_bytes(w0)
    rows: list[dict[str, Any]] = []

    def row(arm: str, scores: dict[str, float], seconds: float, up: int, down: int, rounds: int) -> None:
        rows.append({"dataset": dataset, "seed": seed, "arm": arm, **scores,
                     "rounds": rounds, "uplink_bytes_per_site": up * model_bytes,
                     "downlink_bytes_per_site": down * model_bytes, "seconds": round(seconds, 1)})

    def add(arm: str, tensors: Tensors, seconds: float, up: int, down: int, rounds: int) -> None:
        row(arm, metrics_of(spec, tensors, test), seconds, up, down, rounds)

    for name, t in zip(names, site_tensors, strict=True):
        add(f"site {name}", t, site_s / len(names), 0, 0, 1)
    fedavg1, _ = strat.aggregate(1, w0, [ClientResult(n, t, len(idx)) for n, t, idx in
                                         zip(names, site_tensors, parts, strict=True)])
    add("fedavg@1", fedavg1, site_s, 1, 1, 1)
    t1 = time.perf_counter()
    distilled = run_oneshot(spec, site_tensors, cfg, seed)
    add("oneshot", distilled, site_s + time.perf_counter() - t1, 1, 0, 1)
    row("ensemble (teacher)", ensemble_metrics(spec, site_tensors, test), site_s, 1, 0, 1)
    last: dict[int, Tensors] = {}
    for rounds in FEDAVG_ROUNDS:
        t1 = time.perf_counter()
        experiments.federated(spec, train, parts, None, rounds=rounds,
                              training=recipe.default_training(rounds, max(1, steps // rounds)), seed=seed,
                              threads=1, site_names=names, on_round=partial(last.__setitem__, rounds))
        add(f"fedavg@{rounds}", last[rounds], time.perf_counter() - t1, rounds, rounds, rounds)
    t1 = time.perf_counter()
    union = train.subset(np.sort(np.concatenate(parts)))
    cen = train_from(spec, w0, union, recipe.default_training(1, steps * len(parts)).model_copy(update={"seed": seed}))
    add("centralized", cen, time.perf_counter() - t1, 0, 0, 1)
    majority = int(np.argmax(train.class_counts()))
    rows.append({"dataset": dataset, "seed": seed, "arm": "floor (majority class)", "auc": 0.5,
                 "balanced_accuracy": 1.0 / train.num_classes, "accuracy": float(np.mean(test.labels == majority)),
                 "rounds": 0, "uplink_bytes_per_site": 0, "downlink_bytes_per_site": 0, "seconds": 0.0})
    return rows


# ------------------------------------------------------------------------------------------------ tuning
def candidates(base: OneShotConfig) -> dict[str, OneShotConfig]:
    """Return the one-shot settings compared on the validation splits (``--tune``).

    The BatchNorm-statistics weight and the number of epochs around the default, and the two ablations
    (no client-model adaptation, no replay). History: the first search (0c6615b) compared only adaptation and
    replay at weight 1 and 4 epochs, where ISIC stayed near chance (validation AUC 0.53-0.61); the second (4afccb1)
    chose weight 30 at 12 epochs over 4 epochs (mean AUC 0.845 vs 0.831).
    """
    d, s = base.distill, base.synthesis
    out = {"default": base}
    for w in (1.0, 10.0, 100.0):
        out[f"bn_weight_{w:g}"] = base.model_copy(update={"synthesis": s.model_copy(update={"bn_weight": w})})
    out["epochs_12"] = base.model_copy(update={"epochs": 12})
    out["no_adaptation"] = base.model_copy(update={"distill": d.model_copy(update={"adapt": False})})
    out["no_replay"] = base.model_copy(update={"distill": d.model_copy(update={"replay_steps": 0})})
    return out


def tune(dataset: str, steps: int, width: int, quick: bool, cfgs: dict[str, OneShotConfig]) -> list[dict[str, Any]]:
    """Return validation metrics (seed 0) of every candidate one-shot setting on one dataset."""
    fed = federation(dataset, 0, steps, width, quick)
    val = fed.splits["val"]
    rows = []
    for name, cfg in cfgs.items():
        t0 = time.perf_counter()
        tensors = run_oneshot(fed.spec, fed.site_tensors, cfg, 0)
        rows.append({"dataset": dataset, "candidate": name, **{f"val_{k}": v for k, v in
                     metrics_of(fed.spec, tensors, val).items()}, "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ report
def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the mean (and std) over seeds of every (dataset, arm)."""
    out = []
    keys = sorted({(r["dataset"], r["arm"]) for r in rows}, key=lambda k: (k[0], _order(k[1])))
    for dataset, arm in keys:
        sel = [r for r in rows if r["dataset"] == dataset and r["arm"] == arm]
        s: dict[str, Any] = {"dataset": dataset, "seed": "mean", "arm": arm, "seeds": len(sel)}
        for k in (*METRICS, "uplink_bytes_per_site", "downlink_bytes_per_site", "seconds"):
            s[k] = float(np.mean([r[k] for r in sel]))
        for k in METRICS:
            s[f"{k}_std"] = float(np.std([r[k] for r in sel]))
        out.append(s)
    return out


def _order(arm: str) -> tuple[int, str]:
    first = ["oneshot", "ensemble (teacher)", "fedavg@1", "fedavg@5", "fedavg@20", "centralized"]
    return (first.index(arm), arm) if arm in first else (len(first) + (arm.startswith("floor")), arm)


def verdicts(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return, per dataset, whether one-shot beats FedAvg@1 and every single site; its gap to FedAvg@20 and to its
    teacher; whether the teacher itself beats every site; bytes."""
    out = []
    for dataset in sorted({s["dataset"] for s in summary}):
        by = {s["arm"]: s for s in summary if s["dataset"] == dataset}
        one, f1, f20, teacher = by["oneshot"], by["fedavg@1"], by["fedavg@20"], by["ensemble (teacher)"]
        sites = [a for a in by if a.startswith("site ")]
        up20 = f20["uplink_bytes_per_site"] + f20["downlink_bytes_per_site"]
        up1 = one["uplink_bytes_per_site"] + one["downlink_bytes_per_site"]
        out.append({
            "dataset": dataset, "seed": "mean", "arm": "verdict",
            "oneshot_beats_fedavg1_auc": one["auc"] > f1["auc"],
            "oneshot_beats_fedavg1_accuracy": one["accuracy"] > f1["accuracy"],
            "oneshot_beats_every_site_auc": all(one["auc"] > by[a]["auc"] for a in sites),
            "oneshot_beats_every_site_accuracy": all(one["accuracy"] > by[a]["accuracy"] for a in sites),
            "teacher_beats_every_site_auc": all(teacher["auc"] > by[a]["auc"] for a in sites),
            "gap_to_teacher_auc_points": 100 * (one["auc"] - teacher["auc"]),
            "oneshot_above_floor_accuracy": one["accuracy"] > by["floor (majority class)"]["accuracy"],
            "gap_to_fedavg20_auc_points": 100 * (one["auc"] - f20["auc"]),
            "gap_to_fedavg20_accuracy_points": 100 * (one["accuracy"] - f20["accuracy"]),
            "oneshot_bytes_per_site": up1, "fedavg20_bytes_per_site": up20,
            "bytes_saved_per_site_vs_fedavg20": up20 - up1, "bytes_ratio_fedavg20_to_oneshot": up20 / max(up1, 1),
        })
    return out


def main() -> None:
    """Run the comparison (or, with ``--tune``, the validation-split search) and write the rows."""
    p = parser(__doc__ or "")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=100, help="local optimizer steps per site, every arm")
    p.add_argument("--width", type=int, default=16, help="small CNN width")
    p.add_argument("--datasets", default="pneumoniamnist,isic")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--tune", action="store_true", help="compare one-shot settings on the validation splits")
    args = p.parse_args()
    cfg = ONESHOT
    if args.quick:
        args.seeds, args.steps, args.width = 1, 10, 4
        cfg = cfg.model_copy(update={"epochs": 1, "synthesis": cfg.synthesis.model_copy(
            update={"iterations": 4, "batch_size": 8})})
    datasets = args.datasets.split(",")
    t0 = time.perf_counter()
    if args.tune:
        cands = candidates(cfg)
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(tune, d, args.steps, args.width, args.quick, cands) for d in datasets]
            trows = [r for f in futs for r in f.result()]
        means: list[dict[str, Any]] = [
            {"dataset": "mean", "candidate": c, **{k: float(np.mean([r[k] for r in trows if r["candidate"] == c]))
                                                 for k in ("val_auc", "val_balanced_accuracy", "val_accuracy")}}
            for c in cands]
        best = max(means, key=lambda m: float(m["val_auc"]))
        print_table(trows + means, ["dataset", "candidate", "val_auc", "val_balanced_accuracy", "val_accuracy"])
        print(f"best on validation (mean AUC over datasets): {best['candidate']}")
        write_rows("oneshot_tuning", trows + means, quick=args.quick, meta={
            "split": "validation, seed 0", "steps_per_site": args.steps,
            "width": args.width, "best": best["candidate"], "candidates": {c: v.model_dump() for c, v in cands.items()},
            "wall_seconds": round(time.perf_counter() - t0, 1)})
        return
    jobs: dict[tuple[str, int], Future[list[dict[str, Any]]]] = {}
    with pool(1 if args.quick else args.workers) as ex:
        for dataset in datasets:
            for seed in range(args.seeds):
                jobs[(dataset, seed)] = ex.submit(run_seed, dataset, seed, args.steps, args.width, args.quick, cfg)
        rows = [r for k in sorted(jobs) for r in jobs[k].result()]
    summary = summarize(rows)
    verdict = verdicts(summary)
    print_table(summary, ["dataset", "arm", "auc", "balanced_accuracy", "accuracy", "uplink_bytes_per_site",
                          "downlink_bytes_per_site", "seconds"])
    for v in verdict:
        print({k: (round(x, 2) if isinstance(x, float) else x) for k, x in v.items()})
    path = write_rows("oneshot", rows + summary + verdict, quick=args.quick, meta={
        "seeds": args.seeds,
        "steps_per_site": args.steps, "fedavg_rounds": [1, *FEDAVG_ROUNDS], "width": args.width,
        "model": "small_cnn, BatchNorm", "oneshot": cfg.model_dump(), "datasets": datasets,
        "bytes": "raw fp32 frames as chunked by the transport; the served model's final download not counted",
        "selection": "final model of every arm; one-shot settings chosen on validation (oneshot_tuning.json)",
        "wall_seconds": round(time.perf_counter() - t0, 1), "note": "timings noisy: shared 2-core machine"})
    print(f"rows: {path}")


if __name__ == "__main__":
    main()

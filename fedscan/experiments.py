"""The arms the demo and benchmarks compare, with equal local epochs:

* federated, in one process (the same strategy, trainer and seeds as the real agents; used by
  ``bench/federated.py`` and as the single-process reference in ``bench/rounds.py``);
* centralized: one model trained on the union of the sites' data;
* single-site: each site alone on its own partition.

One "round" of the baselines is ``local_epochs`` epochs, so after R rounds every arm has seen
its data for the same number of epochs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from coordinator.rounds import ModelSpec, round_training
from coordinator.strategies import ClientResult, build_strategy
from edge_agent.agent import agent_seed
from learning.datasets import ArrayDataset
from learning.metrics import evaluate
from learning.models import build_model
from learning.state import get_tensors, set_tensors
from learning.trainer import train_local
from protocol.codec import Tensors
from protocol.messages import TrainingConfig

METRICS = ("accuracy", "balanced_accuracy", "auc")


@dataclass
class ArmResult:
    name: str
    per_round: list[dict[str, float]] = field(default_factory=list)  # test metrics after each round
    seconds: float = 0.0
    uplink: list[dict[str, float]] = field(default_factory=list)  # per update, when a codec is used

    @property
    def final(self) -> dict[str, float]:
        return self.per_round[-1] if self.per_round else {}


def split_metrics(spec: ModelSpec, tensors: Tensors, test: ArrayDataset) -> dict[str, float]:
    model = build_model(spec.architecture, **spec.kwargs)
    set_tensors(model, tensors)
    r = evaluate(model, test)
    return {k: float(r[k]) if r[k] is not None else float("nan") for k in METRICS}


def initial(spec: ModelSpec, seed: int) -> Tensors:
    torch.manual_seed(seed)
    return get_tensors(build_model(spec.architecture, **spec.kwargs))


def _train(spec: ModelSpec, start: Tensors, data: ArrayDataset, cfg: TrainingConfig, threads: int | None,
           global_tensors: Tensors | None = None) -> Tensors:
    model = build_model(spec.architecture, **spec.kwargs)
    set_tensors(model, start)
    train_local(model, data, cfg, global_tensors=global_tensors, threads=threads)
    return get_tensors(model)


def federated(
    spec: ModelSpec, train: ArrayDataset, parts: Sequence[np.ndarray], test: ArrayDataset | None, *, rounds: int,
    training: TrainingConfig, strategy: str = "fedavg", seed: int = 0, threads: int | None = None,
    site_names: Sequence[str] | None = None, progress: Callable[[str], None] | None = None,
    on_round: Callable[[Tensors], object] | None = None,
    codec: str | None = None, chunk_bytes: int = 256 * 1024,
    attack: Callable[[str, Tensors, Tensors], Tensors] | None = None,
) -> ArmResult:
    """In-process federation. With ``codec``, every update goes through the real frame encoder and
    decoder (error-feedback state kept per site) and ``out.uplink`` records the chunked payload
    bytes per update, as the transport counts them. With ``attack`` (``fedscan.attacks``), every
    trained update is replaced by ``attack(site, update, global weights)`` before it is encoded and
    aggregated (an attack changes only its attacker's update). ``test=None`` skips the per-round test
    metrics (timing references that evaluate through ``on_round`` instead)."""
    from protocol.chunks import split
    from protocol.codec import ErrorFeedbackState
    from protocol.frame import decode_update, encode_update, specs_of

    t0 = time.perf_counter()
    names = list(site_names or [f"site-{i + 1}" for i in range(len(parts))])
    strat = build_strategy(strategy)
    weights = initial(spec, seed)
    out = ArmResult("federated")
    ef_states = {name: ErrorFeedbackState() for name in names}
    for r in range(1, rounds + 1):
        round_cfg = round_training(training, strat, seed, r)
        results = []
        for name, idx in sorted(zip(names, parts, strict=True)):
            cfg = round_cfg.model_copy(update={"seed": agent_seed(round_cfg.seed, name)})
            tensors = _train(spec, weights, train.subset(idx), cfg, threads, global_tensors=weights)
            if attack is not None:
                tensors = attack(name, tensors, weights)
            if codec is not None:
                c0 = time.perf_counter()
                frame = encode_update(tensors, agent_id=name, round_id=r, base_version=f"v{r - 1}",
                                      sample_count=len(idx), codec=codec, base=weights, state=ef_states[name],
                                      seed=cfg.seed)
                c1 = time.perf_counter()
                tensors = decode_update(frame, expected=specs_of(weights), base=weights).tensors
                out.uplink.append({"bytes": sum(len(c) for c in split(frame, f"{name}-{r}", chunk_bytes)),
                                   "encode_s": c1 - c0, "decode_s": time.perf_counter() - c1})
            results.append(ClientResult(name, tensors, len(idx)))
        weights, _ = strat.aggregate(r, weights, results)
        if on_round is not None:
            on_round(weights)
        if test is None:  # timing references: ``on_round`` does the coordinator's evaluation
            continue
        out.per_round.append(split_metrics(spec, weights, test))
        if progress:
            progress(f"federated round {r}/{rounds}: test acc {out.per_round[-1]['accuracy']:.3f}")
    out.seconds = time.perf_counter() - t0
    return out


def centralized(
    spec: ModelSpec, train: ArrayDataset, parts: Sequence[np.ndarray], test: ArrayDataset, *, rounds: int,
    training: TrainingConfig, seed: int = 0, threads: int | None = None,
) -> ArmResult:
    t0 = time.perf_counter()
    union = train.subset(np.sort(np.concatenate(list(parts))))
    weights = initial(spec, seed)
    out = ArmResult("centralized")
    for r in range(1, rounds + 1):
        cfg = training.model_copy(update={"seed": seed * 100_003 + r, "prox_mu": 0.0})
        weights = _train(spec, weights, union, cfg, threads)
        out.per_round.append(split_metrics(spec, weights, test))
    out.seconds = time.perf_counter() - t0
    return out


def single_site(
    spec: ModelSpec, train: ArrayDataset, idx: np.ndarray, name: str, test: ArrayDataset, *, rounds: int,
    training: TrainingConfig, seed: int = 0, threads: int | None = None,
) -> ArmResult:
    t0 = time.perf_counter()
    weights = initial(spec, seed)
    arm = ArmResult(name)
    for r in range(1, rounds + 1):
        cfg = training.model_copy(update={"seed": agent_seed(seed * 100_003 + r, name), "prox_mu": 0.0})
        weights = _train(spec, weights, train.subset(idx), cfg, threads)
        arm.per_round.append(split_metrics(spec, weights, test))
    arm.seconds = time.perf_counter() - t0
    return arm


def baselines_parallel(
    spec: ModelSpec, train: ArrayDataset, parts: Sequence[np.ndarray], test: ArrayDataset, *, rounds: int,
    training: TrainingConfig, seed: int = 0, workers: int | None = None,
) -> tuple[ArmResult, list[ArmResult]]:
    """Centralized and every single-site arm, one single-threaded process each, ``workers`` at a time
    (one thread per process: on this class of box two torch threads in one process ran 5x slower)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    kw: dict[str, Any] = {"rounds": rounds, "training": training, "seed": seed, "threads": 1}
    with ProcessPoolExecutor(max_workers=workers or (os.cpu_count() or 2), mp_context=mp.get_context("spawn")) as ex:
        central = ex.submit(centralized, spec, train, parts, test, **kw)
        singles = [ex.submit(single_site, spec, train, idx, f"site-{i + 1}", test, **kw) for i, idx in enumerate(parts)]
        return central.result(), [f.result() for f in singles]


def mean_curve(arms: Sequence[ArmResult]) -> list[dict[str, float]]:
    """Per-round mean of several arms' metrics (the single-site mean)."""
    rounds = len(arms[0].per_round)
    return [{k: float(np.nanmean([a.per_round[r][k] for a in arms])) for k in METRICS} for r in range(rounds)]

"""The arms the demo and benchmarks compare, with equal local epochs.

* federated, in one process (the same strategy, round config, local update
  (:func:`learning.local_update.local_update`, which the agents' training job calls) and seeds as
  the real agents; used by ``bench/federated.py`` and as the single-process reference in
  ``bench/rounds.py``; ``tests/test_sim_equals_runtime.py`` shows it aggregates the same weights
  as agent processes over a real broker);
* centralized: one model trained on the union of the sites' data;
* single-site: each site alone on its own partition.

One "round" of the baselines is ``local_epochs`` epochs, so after R rounds every arm has seen
its data for the same number of epochs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from coordinator.rounds import ModelSpec, round_training
from coordinator.strategies import ClientResult, build_strategy
from learning.augment import Augment
from learning.datasets import ArrayDataset
from learning.local_update import local_update, site_seed
from learning.metrics import evaluate
from learning.models import build_model
from learning.state import get_tensors, set_tensors
from learning.trainer import train_local
from protocol.chunks import split
from protocol.codec import ErrorFeedbackState, Tensors
from protocol.frame import decode_update, encode_model_step, encode_update, specs_of
from protocol.messages import TrainingConfig

METRICS = ("accuracy", "balanced_accuracy", "auc")


@dataclass
class ArmResult:
    """One arm's test metrics after each round, its wall time and (with a codec) its uplink bytes."""
    name: str
    per_round: list[dict[str, float]] = field(default_factory=list)  # test metrics after each round
    seconds: float = 0.0
    uplink: list[dict[str, float]] = field(default_factory=list)  # per update, when a codec is used
    downlink: list[dict[str, float]] = field(default_factory=list)  # per round, with a downlink step codec
    val_per_round: list[dict[str, float]] = field(default_factory=list)  # when a validation split is given

    @property
    def final(self) -> dict[str, float]:
        """The metrics after the last round (empty before any)."""
        return self.per_round[-1] if self.per_round else {}


def split_metrics(spec: ModelSpec, tensors: Tensors, test: ArrayDataset) -> dict[str, float]:
    """Accuracy, balanced accuracy and AUC of ``tensors`` on a split (NaN where undefined)."""
    model = build_model(spec.architecture, **spec.kwargs)
    set_tensors(model, tensors)
    r = evaluate(model, test)
    return {k: float(r[k]) if r[k] is not None else float("nan") for k in METRICS}


def initial(spec: ModelSpec, seed: int) -> Tensors:
    """The seeded initial weights every arm starts from (as the coordinator's ``v0``)."""
    torch.manual_seed(seed)
    return get_tensors(build_model(spec.architecture, **spec.kwargs))


def _model(spec: ModelSpec, start: Tensors) -> torch.nn.Module:
    model = build_model(spec.architecture, **spec.kwargs)
    set_tensors(model, start)
    return model


def _train(spec: ModelSpec, start: Tensors, data: ArrayDataset, cfg: TrainingConfig, threads: int | None) -> Tensors:
    """Plain training from ``start`` with ``cfg`` as given (the centralized arm: no site, no round)."""
    model = _model(spec, start)
    train_local(model, data, cfg, threads=threads)
    return get_tensors(model)


def _site_update(spec: ModelSpec, start: Tensors, data: ArrayDataset, round_cfg: TrainingConfig, site: str,
                 threads: int | None, augment: Augment | None = None) -> Tensors:
    """``site``'s local update from ``start``, through the function the agents' training job calls."""
    return local_update(_model(spec, start), start, data, round_cfg, site, threads=threads, augment=augment).tensors


def federated(
    spec: ModelSpec, train: ArrayDataset, parts: Sequence[np.ndarray], test: ArrayDataset | None, *, rounds: int,
    training: TrainingConfig, strategy: str = "fedavg", seed: int = 0, threads: int | None = None,
    site_names: Sequence[str] | None = None, progress: Callable[[str], None] | None = None,
    on_round: Callable[[Tensors], object] | None = None,
    codec: str | None = None, chunk_bytes: int = 256 * 1024,
    attack: Callable[[str, Tensors, Tensors], Tensors] | None = None,
    augment: Augment | None = None,
    downlink: str | None = None, val: ArrayDataset | None = None, strategy_args: Mapping[str, Any] | None = None,
) -> ArmResult:
    """In-process federation.

    With ``codec``, every update goes through the real frame encoder and decoder (error-feedback state kept
    per site) and ``out.uplink`` records the chunked payload bytes per update, as the transport counts them.
    With ``attack`` (``fedscan.attacks``), every trained update is replaced by ``attack(site, update, global
    weights)`` before it is encoded and aggregated (an attack changes only its attacker's update).
    ``test=None`` skips the per-round test metrics (timing references that evaluate through ``on_round``
    instead). ``augment`` is the device profile's training augmentation (applied when ``training.augment``),
    as the agents run it. With ``downlink`` (a delta pipeline), each round's model is the compressed step
    from the previous one, as the coordinator publishes it (``ModelPublisher.step``), and ``out.downlink``
    records the step's chunked bytes. ``val`` adds validation metrics per round (settings are chosen on
    those). ``strategy_args`` are the strategy's keyword arguments (the coordinator's ``strategy_args``).
    """
    t0 = time.perf_counter()
    names = list(site_names or [f"site-{i + 1}" for i in range(len(parts))])
    strat = build_strategy(strategy, **dict(strategy_args or {}))
    weights = initial(spec, seed)
    out = ArmResult("federated")
    ef_states = {name: ErrorFeedbackState() for name in names}
    server_ef = ErrorFeedbackState()  # the coordinator's downlink residual
    for r in range(1, rounds + 1):
        round_cfg = round_training(training, strat, seed, r)
        results = []
        for name, idx in sorted(zip(names, parts, strict=True)):
            tensors = _site_update(spec, weights, train.subset(idx), round_cfg, name, threads, augment)
            if attack is not None:
                tensors = attack(name, tensors, weights)
            if codec is not None:
                c0 = time.perf_counter()
                frame = encode_update(tensors, agent_id=name, round_id=r, base_version=f"v{r - 1}",
                                      sample_count=len(idx), codec=codec, base=weights, state=ef_states[name],
                                      seed=site_seed(round_cfg.seed, name))
                c1 = time.perf_counter()
                tensors = decode_update(frame, expected=specs_of(weights), base=weights).tensors
                out.uplink.append({"bytes": sum(len(c) for c in split(frame, f"{name}-{r}", chunk_bytes)),
                                   "encode_s": c1 - c0, "decode_s": time.perf_counter() - c1})
            results.append(ClientResult(name, tensors, len(idx)))
        previous = weights
        weights, _ = strat.aggregate(r, weights, results)
        if downlink is not None:
            c0 = time.perf_counter()
            step, weights = encode_model_step(weights, version=f"v{r}", round_id=r, base=previous,
                                              base_version=f"v{r - 1}", codec=downlink, state=server_ef,
                                              seed=seed * 100_003 + r)
            out.downlink.append({"bytes": sum(len(c) for c in split(step, f"model-v{r}", chunk_bytes)),
                                 "encode_s": time.perf_counter() - c0})
        if val is not None:
            out.val_per_round.append(split_metrics(spec, weights, val))
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
    """One model trained on the union of the sites' data, ``local_epochs`` epochs per round."""
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
    """Site ``name`` alone on its partition, through the same local update as the agents."""
    t0 = time.perf_counter()
    weights = initial(spec, seed)
    arm = ArmResult(name)
    for r in range(1, rounds + 1):
        cfg = training.model_copy(update={"seed": seed * 100_003 + r, "prox_mu": 0.0})
        weights = _site_update(spec, weights, train.subset(idx), cfg, name, threads)
        arm.per_round.append(split_metrics(spec, weights, test))
    arm.seconds = time.perf_counter() - t0
    return arm


def baselines_parallel(
    spec: ModelSpec, train: ArrayDataset, parts: Sequence[np.ndarray], test: ArrayDataset, *, rounds: int,
    training: TrainingConfig, seed: int = 0, workers: int | None = None,
) -> tuple[ArmResult, list[ArmResult]]:
    """Centralized and every single-site arm, one single-threaded process each, ``workers`` at a time (one thread per process: on this class of box two torch threads in one process ran 5x slower)."""
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

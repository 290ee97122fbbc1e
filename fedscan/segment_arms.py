"""In-process runs of the segmentation job and its baselines, built from the job's own steps.

The composition side of ``learning.segmentation`` (``learning`` may not import the coordinator):
:func:`coordinator_aggregate` hands the job's server step a ``coordinator.strategies`` strategy.

- :func:`run_federated`: every round, each site runs :func:`~learning.segmentation.client.train_site`
  from the global shared tensors and its own state, then
  :func:`~learning.segmentation.server.server_step` aggregates — the same two functions the agent
  and the coordinator run;
- :func:`run_single`: one site alone for the same rounds × steps it trains in the federation;
- :func:`run_centralized`: one model on the union of the sites' images, for rounds × steps × sites
  steps (the federation's total local work).

Each returns per-site Dice on the chosen split of the site's modality (under FedBN / a local head,
site ``s`` is scored with the shared model plus ``s``'s local tensors: the model ``s`` serves) and
per-modality means. ``fedscan.experiments`` is not used: it is bound to classification
(``ArrayDataset`` labels, ``learning.models`` architectures, accuracy/AUC metrics).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from coordinator.strategies import ClientResult, Strategy, build_strategy
from learning.segmentation.client import SegTrainConfig, SiteState, SiteUpdate, train_site
from learning.segmentation.data import SegSet, SegSplits, SiteData
from learning.segmentation.model import SegModelConfig, build_unet, evaluate_dice
from learning.segmentation.privacy import SitePrivacy
from learning.segmentation.server import Aggregate, Contribution, Weighting, server_step
from learning.segmentation.sharing import ShareRule, get_named, set_named, shared_names
from protocol.codec import Tensors


def coordinator_aggregate(strategy: Strategy) -> Aggregate:
    """The server step's aggregation rule from a coordinator strategy (FedAvg, FedAvgM, …)."""

    def aggregate(round_id: int, base: Tensors, contributions: list[Contribution]) -> Tensors:
        results = [ClientResult(c.agent_id, c.tensors, c.sample_count, c.metrics) for c in contributions]
        new, _report = strategy.aggregate(round_id, base, results)
        return new

    return aggregate


@dataclass
class RunResult:
    """Dice per site (on its modality's split) and per modality, privacy per site, wall time."""

    name: str
    site_dice: dict[str, float] = field(default_factory=dict)
    modality_dice: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _score(model_cfg: SegModelConfig, tensors: Tensors, local: Tensors, data: SegSet) -> float:
    model = build_unet(model_cfg, seed=0)
    set_named(model, tensors)
    if local:
        set_named(model, local)
    return float(evaluate_dice(model, data)["dice"])


def _modality_means(site_dice: Mapping[str, float], modality_of: Mapping[str, str]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for site, d in site_dice.items():
        out.setdefault(modality_of[site], []).append(d)
    return {m: float(np.mean(v)) for m, v in out.items()}


def run_federated(splits: SegSplits, model_cfg: SegModelConfig, cfg: SegTrainConfig, *, rounds: int, seed: int,
                  privacy: Mapping[str, SitePrivacy | None] | None = None, weighting: Weighting = "samples",
                  eval_split: str = "test", noise_seed: int | None = None, name: str | None = None,
                  strategy: str = "fedavg", strategy_kwargs: Mapping[str, Any] | None = None,
                  progress: Callable[[str], None] | None = None) -> RunResult:
    """Federated training over ``splits.sites`` (rule ``cfg.share``); privacy per site name (None: none)."""
    t0 = time.perf_counter()
    cfg = replace(cfg, seed=seed)
    model = build_unet(model_cfg, seed=seed)
    shared = shared_names(model, cfg.share)
    weights = get_named(model, shared)
    states = {s.name: SiteState() for s in splits.sites}
    out = RunResult(name or f"federated-{cfg.share}")
    aggregate = coordinator_aggregate(build_strategy(strategy, **dict(strategy_kwargs or {})))
    for r in range(1, rounds + 1):
        updates: list[tuple[str, SiteUpdate]] = []
        for site in splits.sites:
            m = build_unet(model_cfg, seed=seed)  # same initial local tensors at every site
            u = train_site(m, site, cfg, global_tensors=weights, state=states[site.name], round_id=r,
                           privacy=(privacy or {}).get(site.name), noise_seed=noise_seed)
            states[site.name] = u.state
            updates.append((site.name, u))
        weights, report = server_step(weights, updates, round_id=r, weighting=weighting, aggregate=aggregate)
        out.rounds.append(report)
        if progress:
            progress(f"{out.name} round {r}/{rounds}: loss " +
                     ", ".join(f"{s} {u.metrics['train_loss']:.3f}" for s, u in updates))
    evals = splits.test if eval_split == "test" else splits.val
    for site in splits.sites:
        out.site_dice[site.name] = _score(model_cfg, weights, states[site.name].local, evals[site.modality])
        last = out.rounds[-1].get("privacy", {}).get(site.name)
        if last:
            out.privacy[site.name] = last
    out.modality_dice = _modality_means(out.site_dice, {s.name: s.modality for s in splits.sites})
    out.seconds = time.perf_counter() - t0
    return out


def _train_alone(site: SiteData, model_cfg: SegModelConfig, cfg: SegTrainConfig, *, rounds: int, seed: int,
                 privacy: SitePrivacy | None, noise_seed: int | None) -> tuple[Tensors, dict[str, float]]:
    cfg = replace(cfg, seed=seed, share=ShareRule.FEDAVG)
    model = build_unet(model_cfg, seed=seed)
    weights = get_named(model, shared_names(model, cfg.share))
    state, metrics = SiteState(), {}
    for r in range(1, rounds + 1):
        u = train_site(model, site, cfg, global_tensors=weights, state=state, round_id=r, privacy=privacy,
                       noise_seed=noise_seed)
        weights, state, metrics = u.tensors, u.state, u.metrics
    return weights, {k: v for k, v in metrics.items() if k.startswith("dp_")}


def run_single(splits: SegSplits, site_name: str, model_cfg: SegModelConfig, cfg: SegTrainConfig, *, rounds: int,
               seed: int, privacy: SitePrivacy | None = None, eval_split: str = "test",
               noise_seed: int | None = None) -> RunResult:
    """One site alone: the same rounds × steps as in the federation, no sharing."""
    t0 = time.perf_counter()
    site = next(s for s in splits.sites if s.name == site_name)
    weights, dp = _train_alone(site, model_cfg, cfg, rounds=rounds, seed=seed, privacy=privacy, noise_seed=noise_seed)
    evals = splits.test if eval_split == "test" else splits.val
    out = RunResult(f"single-{site_name}")
    out.site_dice[site_name] = _score(model_cfg, weights, {}, evals[site.modality])
    out.modality_dice = {site.modality: out.site_dice[site_name]}
    if dp:
        out.privacy[site_name] = dp
    out.seconds = time.perf_counter() - t0
    return out


def run_centralized(splits: SegSplits, model_cfg: SegModelConfig, cfg: SegTrainConfig, *, rounds: int, seed: int,
                    privacy: SitePrivacy | None = None, eval_split: str = "test",
                    noise_seed: int | None = None) -> RunResult:
    """One model on the union of every site's images, for the federation's total number of steps."""
    t0 = time.perf_counter()
    union = SiteData("central", "mixed", SegSet.concat([s.train for s in splits.sites]))
    steps = cfg.steps * len(splits.sites)
    weights, dp = _train_alone(union, model_cfg, replace(cfg, steps=steps), rounds=rounds, seed=seed,
                               privacy=privacy, noise_seed=noise_seed)
    evals = splits.test if eval_split == "test" else splits.val
    out = RunResult("centralized")
    out.modality_dice = {m: _score(model_cfg, weights, {}, d) for m, d in evals.items()}
    out.site_dice = {s.name: out.modality_dice[s.modality] for s in splits.sites}
    if dp:
        out.privacy["central"] = dp
    out.seconds = time.perf_counter() - t0
    return out


def set_threads(n: int = 1) -> None:
    """Pin torch to ``n`` threads (benchmarks: 1, so parallel runs do not fight over cores)."""
    torch.set_num_threads(n)



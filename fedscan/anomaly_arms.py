"""In-process runs of the anomaly job and its baselines, built from the job's own steps.

The composition side of ``learning.anomaly`` (``learning`` may not import the coordinator): the
coordinator's FedAvg strategy aggregates what the sites upload.

- :func:`run_federated`: every round each site runs :func:`~learning.anomaly.train.site_round`
  (load the global shared tensors, train on its normal images, upload the shared tensors); the
  strategy averages them (weighted by image count). ``rule=feddis``: only the shape branch
  travels, with FedDis' latent losses; ``rule=all``: the plain FedAvg autoencoder (same network,
  every tensor averaged, L1 only);
- :func:`run_single`: one site alone, for the rounds × steps it trains in the federation;
- :func:`run_intensity`: no learning, the map is the smoothed image (bright = anomalous), the
  sanity floor an autoencoder has to beat on FLAIR;
- :func:`run_centralized`: one plain autoencoder on the union of the sites' normal images, for
  rounds × steps × sites steps (the federation's total local work).

Every arm is scored per site with the model that site serves (FedDis: the shared shape branch +
its own appearance branch), its own threshold (from its held-out normal images) and the test set
seen through its own intensity response (``learning.anomaly.data``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from coordinator.strategies import ClientResult, build_strategy
from learning.anomaly.data import AnomalySplits, EvalSet, Site
from learning.anomaly.metrics import best_dice, dice_at, image_auroc, pixel_auprc, position_matched_auroc
from learning.anomaly.model import AEConfig, DisentangledAE, ShareRule, build_ae, get_named, set_named, shared_names
from learning.anomaly.scoring import (
    ScoreConfig,
    anomaly_maps,
    foreground_masks,
    image_scores,
    reconstruct,
    thresholds_from,
)
from learning.anomaly.train import TrainConfig, make_optimizer, site_round, train_steps


@dataclass
class ArmResult:
    """Per-site metrics of one arm at one seed, and its wall time."""

    name: str
    sites: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def mean(self) -> dict[str, float]:
        """Each metric's mean over the scored sites."""
        keys = sorted({k for m in self.sites.values() for k in m})
        return {k: float(np.mean([m[k] for m in self.sites.values() if k in m])) for k in keys}


Reconstruct = Callable[[np.ndarray], np.ndarray]
"""Images ``(N, H, W)`` → reconstructions of the same shape."""


def model_recon(model: DisentangledAE) -> Reconstruct:
    """The autoencoder as a :data:`Reconstruct` function."""
    return lambda images: reconstruct(model, images)


def zero_recon(images: np.ndarray) -> np.ndarray:
    """Return the intensity baseline's "reconstruction": nothing, so the map is the (smoothed) image.

    Thresholding bright pixels is a strong baseline for FLAIR hyperintensities (Meissen et al. 2021).
    """
    return np.zeros_like(images)


def evaluate_site(recon: Reconstruct, site: Site, evals: EvalSet, score: ScoreConfig) -> dict[str, float]:
    """Score one site's model on the test set seen through the site's intensity response.

    Image AUROC (and, for slices with positions, the position-matched AUROC), the site threshold's
    sensitivity / specificity and, with masks, pixel AUPRC, best Dice (an upper bound: threshold
    picked on the test masks) and Dice at the site's pixel threshold.
    """
    cal_maps = anomaly_maps(site.calib, recon(site.calib), score)
    thr = thresholds_from(image_scores(cal_maps, site.calib, score), cal_maps, site.calib, score)
    ev = evals.seen_by(site.gamma)
    maps = anomaly_maps(ev.images, recon(ev.images), score)
    scores = image_scores(maps, ev.images, score)
    flagged = scores > thr.image
    y = ev.labels.astype(bool)
    out = {"image_auroc": image_auroc(ev.labels, scores),
           "sensitivity_at_site_threshold": float(flagged[y].mean()),
           "specificity_at_site_threshold": float((~flagged[~y]).mean())}
    if ev.position is not None:
        out["image_auroc_position_matched"] = position_matched_auroc(ev.labels, scores, ev.position)
    if ev.masks is not None:
        fg = foreground_masks(ev.images, score)
        out["pixel_auprc"] = pixel_auprc(maps, ev.masks, fg)
        out["best_dice"] = best_dice(maps, ev.masks, fg)[0]
        out["dice_at_site_threshold"] = dice_at(maps, ev.masks, thr.pixel)
    return out


def run_intensity(splits: AnomalySplits, score: ScoreConfig, *, evals: EvalSet | None = None) -> ArmResult:
    """No learning: the map is the smoothed image (see :func:`zero_recon`), thresholds per site."""
    t0 = time.perf_counter()
    out = ArmResult("intensity-baseline", {s.name: evaluate_site(zero_recon, s, evals or splits.test, score)
                                           for s in splits.sites})
    out.seconds = time.perf_counter() - t0
    return out


def _gen(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + salt)


def run_federated(splits: AnomalySplits, ae: AEConfig, cfg: TrainConfig, score: ScoreConfig, *, rule: ShareRule,
                  rounds: int, seed: int, evals: EvalSet | None = None,
                  progress: Callable[[str], None] | None = None) -> ArmResult:
    """Federated training over ``splits.sites`` under ``rule`` (see module doc); scored per site."""
    t0 = time.perf_counter()
    rule = ShareRule(rule)
    local_cfg = cfg if rule is ShareRule.FEDDIS else cfg.plain
    models = {s.name: build_ae(ae, seed=seed) for s in splits.sites}  # same initial weights everywhere
    opts = {n: make_optimizer(m, local_cfg) for n, m in models.items()}
    gens = {s.name: _gen(seed, i) for i, s in enumerate(splits.sites)}
    first = models[splits.sites[0].name]
    weights = get_named(first, shared_names(first, rule))
    strategy = build_strategy("fedavg")
    name = "federated-feddis" if rule is ShareRule.FEDDIS else "federated-fedavg-ae"
    for r in range(1, rounds + 1):
        results = []
        for s in splits.sites:
            tensors, metrics = site_round(models[s.name], opts[s.name], weights, s.train, local_cfg, rule, gens[s.name])
            results.append(ClientResult(s.name, tensors, len(s.train), metrics))
        weights, _report = strategy.aggregate(r, weights, results)
        if progress:
            progress(f"{name} round {r}/{rounds}: " + ", ".join(f"{c.agent_id} {c.metrics['loss']:.4f}" for c in results))
    out = ArmResult(name)
    for s in splits.sites:
        m = models[s.name]
        set_named(m, weights)
        out.sites[s.name] = evaluate_site(model_recon(m), s, evals or splits.test, score)
    out.seconds = time.perf_counter() - t0
    return out


def _train_alone(images: np.ndarray, ae: AEConfig, cfg: TrainConfig, *, steps: int, seed: int) -> DisentangledAE:
    model = build_ae(ae, seed=seed)
    opt = make_optimizer(model, cfg)
    train_steps(model, opt, images, replace(cfg.plain, steps=steps), _gen(seed, 99))
    return model


def run_single(splits: AnomalySplits, site_name: str, ae: AEConfig, cfg: TrainConfig, score: ScoreConfig, *,
               rounds: int, seed: int, evals: EvalSet | None = None) -> ArmResult:
    """One site alone (plain autoencoder): the same rounds × steps as in the federation."""
    t0 = time.perf_counter()
    site = next(s for s in splits.sites if s.name == site_name)
    model = _train_alone(site.train, ae, cfg, steps=rounds * cfg.steps, seed=seed)
    out = ArmResult(f"single-{site_name}", {site_name: evaluate_site(model_recon(model), site, evals or splits.test, score)})
    out.seconds = time.perf_counter() - t0
    return out


def run_centralized(splits: AnomalySplits, ae: AEConfig, cfg: TrainConfig, score: ScoreConfig, *, rounds: int,
                    seed: int, evals: EvalSet | None = None) -> ArmResult:
    """One plain autoencoder on every site's normal images, scored at each site with its threshold."""
    t0 = time.perf_counter()
    union = np.concatenate([s.train for s in splits.sites])
    model = _train_alone(union, ae, cfg, steps=rounds * cfg.steps * len(splits.sites), seed=seed)
    out = ArmResult("centralized", {s.name: evaluate_site(model_recon(model), s, evals or splits.test, score) for s in splits.sites})
    out.seconds = time.perf_counter() - t0
    return out

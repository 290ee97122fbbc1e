"""The arms every accuracy report carries, under one step budget and one model-selection rule.

* **federated**: the in-process federation of ``fedscan/experiments.py`` (the runtime's strategy,
  trainer and seeds), every site ``steps_per_round`` local steps per round;
* **centralized**: the same loop with one site holding the union of the sites' data and
  ``sites × steps_per_round`` steps per round, so it sees as many samples as the federation;
* **single site**: each site alone, ``steps_per_round`` steps per round (its own compute);
* **logistic regression** on the same inputs (normalized pixels, flattened; scikit-learn), whose
  inverse regularization is chosen on the validation split: the centralized network must beat it;
* **floor**: the majority class (AUC 0.5), so that a broken arm cannot hide.

Every network arm evaluates each round's model on the validation split and keeps the best by
``metric`` (:class:`learning.selection.BestSoFar`, AUC by default), as the coordinator serves the
best validated model; the test split only reports the selected model (and, for contrast, the last).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from coordinator.rounds import ModelSpec
from fedscan import experiments
from learning.augment import Augment
from learning.binary_metrics import binary_report
from learning.datasets import DEFAULT_NORMALIZE, ArrayDataset, Normalize
from learning.metrics import classification_metrics, predict_proba
from learning.models import build_model
from learning.recipe import STRATEGY, budget_config, strategy_args_for
from learning.selection import DEFAULT_METRIC, BestSoFar
from learning.state import set_tensors
from protocol.codec import Tensors
from protocol.messages import TrainingConfig


@dataclass(frozen=True)
class Budget:
    """A federation's work: ``rounds`` rounds of ``steps_per_round`` local optimizer steps per site."""

    rounds: int
    steps_per_round: int

    def config(self, base: TrainingConfig, steps_per_round: int | None = None) -> TrainingConfig:
        """Return ``base`` with this budget: the step cap per round and the schedule's span over all rounds."""
        return budget_config(base, self.rounds, steps_per_round or self.steps_per_round)


@dataclass
class Outcome:
    """One arm of one seed: test metrics of the selected model (and of the last), and the selection."""

    name: str
    test: dict[str, float]
    test_last: dict[str, float] = field(default_factory=dict)
    val_curve: list[float] = field(default_factory=list)
    selected_round: int = 0
    seconds: float = 0.0
    steps: int = 0  # optimizer steps over all sites


def report(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Return test metrics: the binary report for two classes, else accuracy, balanced accuracy, macro AUC."""
    if probs.shape[1] == 2:
        return binary_report(y, probs[:, 1])
    m = classification_metrics(y, probs)
    return {k: float(m[k]) for k in ("auc", "balanced_accuracy", "accuracy") if m[k] is not None}


def model_probs(spec: ModelSpec, tensors: Tensors, data: ArrayDataset,
                normalize: Normalize | None = DEFAULT_NORMALIZE) -> np.ndarray:
    """Return the class probabilities ``(N, C)`` of the model with ``tensors`` over ``data``."""
    model = build_model(spec.architecture, **spec.kwargs)
    set_tensors(model, tensors)
    return predict_proba(model, data, normalize=normalize)[1]


@dataclass(frozen=True)
class ArmSettings:
    """What every arm of one report shares: the budget, the round config, augmentation, selection."""

    budget: Budget
    training: TrainingConfig
    augment: Augment | None = None
    metric: str = DEFAULT_METRIC
    strategy: str = STRATEGY  # the federated arm's; one-model arms (centralized, single site) take no server step
    strategy_args: Mapping[str, Any] | None = None  # None: the recipe's for ``strategy`` (``recipe.strategy_args_for``)


def run_arm(name: str, spec: ModelSpec, train: ArrayDataset, parts: Sequence[np.ndarray], val: ArrayDataset,
            test: ArrayDataset, settings: ArmSettings, *, seed: int = 0, steps_per_round: int | None = None,
            site_names: Sequence[str] | None = None) -> Outcome:
    """Run the federation loop over ``parts`` and select its best round on ``val``; test the selected model."""
    t0 = time.perf_counter()
    tracker = BestSoFar(settings.metric)
    seen: dict[str, Tensors] = {}
    curve: list[float] = []

    def on_round(weights: Tensors) -> None:
        m = classification_metrics(val.labels, model_probs(spec, weights, val))
        score = tracker.score(m)
        curve.append(float("nan") if score is None else score)
        if tracker.offer(len(curve), m):
            seen["best"] = {k: v.copy() for k, v in weights.items()}
        seen["last"] = weights

    budget = settings.budget
    steps = steps_per_round or budget.steps_per_round
    args = strategy_args_for(settings.strategy) if settings.strategy_args is None else settings.strategy_args
    experiments.federated(spec, train, parts, None, rounds=budget.rounds, training=budget.config(settings.training,
                          steps), strategy=settings.strategy, strategy_args=args, seed=seed, threads=1,
                          site_names=site_names, on_round=on_round, augment=settings.augment)
    if "best" not in seen:  # no round had a finite validation score: serve the last (selected_round 0 says so)
        seen["best"] = seen["last"]
    return Outcome(
        name=name,
        test=report(test.labels, model_probs(spec, seen["best"], test)),
        test_last=report(test.labels, model_probs(spec, seen["last"], test)),
        val_curve=curve,
        selected_round=int(tracker.best_key or 0),
        seconds=time.perf_counter() - t0,
        steps=budget.rounds * steps * len(parts),
    )


def federated_arm(spec: ModelSpec, train: ArrayDataset, parts: Sequence[np.ndarray], val: ArrayDataset,
                  test: ArrayDataset, settings: ArmSettings, *, seed: int = 0,
                  site_names: Sequence[str] | None = None) -> Outcome:
    """Return the federation over the sites."""
    return run_arm("federated", spec, train, parts, val, test, settings, seed=seed, site_names=site_names)


def centralized_arm(spec: ModelSpec, train: ArrayDataset, parts: Sequence[np.ndarray], val: ArrayDataset,
                    test: ArrayDataset, settings: ArmSettings, *, seed: int = 0) -> Outcome:
    """Return one model trained on the union of the sites, with the federation's total number of samples."""
    union = np.sort(np.concatenate(list(parts)))
    return run_arm("centralized", spec, train, [union], val, test, replace(settings, strategy="fedavg"), seed=seed,
                   steps_per_round=settings.budget.steps_per_round * len(parts), site_names=["centralized"])


def single_site_arm(spec: ModelSpec, train: ArrayDataset, idx: np.ndarray, name: str, val: ArrayDataset,
                    test: ArrayDataset, settings: ArmSettings, *, seed: int = 0) -> Outcome:
    """Return one site trained alone on its own data, with its own share of the compute."""
    return run_arm(name, spec, train, [idx], val, test, replace(settings, strategy="fedavg"), seed=seed,
                   site_names=[name])


def _features(data: ArrayDataset, normalize: Normalize | None) -> np.ndarray:
    x, _ = data.batch(None, normalize)
    return x.reshape(len(data), -1).numpy().astype(np.float64)


def logistic_regression_arm(train: ArrayDataset, val: ArrayDataset, test: ArrayDataset, *,
                            normalize: Normalize | None = DEFAULT_NORMALIZE,
                            cs: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1)) -> Outcome:
    """Class-balanced logistic regression on the flattened normalized pixels; ``C`` chosen on validation AUC."""
    t0 = time.perf_counter()
    xtr, xva, xte = (_features(d, normalize) for d in (train, val, test))
    best: tuple[float, float, LogisticRegression] | None = None
    curve = []
    for c in cs:
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=3000)
        clf.fit(xtr, train.labels)
        pv = clf.predict_proba(xva)
        score = float(roc_auc_score(val.labels, pv[:, 1])) if pv.shape[1] == 2 else \
            float(roc_auc_score(val.labels, pv, multi_class="ovr"))
        curve.append(score)
        if best is None or score > best[0]:
            best = (score, c, clf)
    assert best is not None
    out = Outcome("logistic_regression", report(test.labels, best[2].predict_proba(xte)), val_curve=curve,
                  selected_round=cs.index(best[1]) + 1, seconds=time.perf_counter() - t0)
    out.test["C"] = best[1]
    return out


def majority_floor(train: ArrayDataset, test: ArrayDataset) -> Outcome:
    """Predict the majority class of the training data for every test image (a constant score: AUC 0.5)."""
    majority = int(np.argmax(train.class_counts()))
    probs = np.zeros((len(test), train.num_classes))
    probs[:, majority] = 1.0
    return Outcome("majority_floor", report(test.labels, probs))

"""The report arms: one step budget, selection on validation, logistic regression and the floor (tiny sizes)."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.rounds import ModelSpec
from fedscan.baselines import (
    ArmSettings,
    Budget,
    centralized_arm,
    federated_arm,
    logistic_regression_arm,
    majority_floor,
    single_site_arm,
)
from learning.datasets import make_synthetic
from learning.models import model_kwargs_for
from learning.recipe import budget_config, default_training
from protocol.manifest import InputSpec
from protocol.messages import TrainingConfig

SPEC = ModelSpec("small_cnn", model_kwargs_for("small_cnn", in_channels=1, num_classes=2, height=16, norm="group",
                                               width=4), ["normal", "pneumonia"], InputSpec(channels=1, height=16,
                                                                                           width=16))
TRAIN, VAL, TEST = make_synthetic(96, seed=0, size=16), make_synthetic(40, seed=1, size=16), \
    make_synthetic(40, seed=2, size=16)
PARTS = [np.arange(0, 60), np.arange(60, 96)]
BUDGET = Budget(rounds=3, steps_per_round=2)
CFG = TrainingConfig(batch_size=16, lr=0.05, schedule="cosine", loss="balanced_ce")


def test_budget_and_default_recipe() -> None:
    cfg = BUDGET.config(CFG)
    assert (cfg.max_steps, cfg.total_steps, cfg.local_epochs) == (2, 6, 100)
    d = default_training(rounds=10, steps_per_round=20)
    assert (d.max_steps, d.total_steps, d.warmup_steps, d.schedule, d.augment) == (20, 200, 10, "cosine", True)
    assert budget_config(TrainingConfig(), 4, 5).warmup_steps == 0  # no schedule, no warm-up
    with pytest.raises(ValueError, match="rounds >= 1"):
        budget_config(CFG, 0, 5)


def test_arms_share_the_budget_and_select_on_validation() -> None:
    settings = ArmSettings(BUDGET, CFG)
    fed = federated_arm(SPEC, TRAIN, PARTS, VAL, TEST, settings, site_names=["a", "b"])
    cen = centralized_arm(SPEC, TRAIN, PARTS, VAL, TEST, settings)
    one = single_site_arm(SPEC, TRAIN, PARTS[0], "a", VAL, TEST, settings)
    assert fed.steps == cen.steps == 2 * one.steps == 12  # centralized sees as many samples as the federation
    for arm in (fed, cen, one):
        assert len(arm.val_curve) == 3
        assert arm.selected_round == int(np.nanargmax(arm.val_curve)) + 1  # the best validated round is served
        assert set(arm.test) == {"auc", "balanced_accuracy", "accuracy", "sensitivity_at_90_specificity"}
        assert 0.0 <= arm.test["auc"] <= 1.0


def test_logistic_regression_learns_and_the_floor_is_chance() -> None:
    lr = logistic_regression_arm(TRAIN, VAL, TEST, cs=(0.01, 1.0))
    floor = majority_floor(TRAIN, TEST)
    assert lr.test["C"] in (0.01, 1.0) and len(lr.val_curve) == 2
    assert lr.test["auc"] > 0.75  # the synthetic opacity is visible to a linear model
    assert floor.test["auc"] == 0.5 and floor.test["balanced_accuracy"] == 0.5

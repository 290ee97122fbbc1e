"""Model selection on validation (best so far) and the binary report metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from learning.binary_metrics import binary_report, sensitivity_at_specificity
from learning.selection import BestSoFar


def test_best_so_far_keeps_the_best_validated_not_the_latest() -> None:
    t = BestSoFar("auc")
    assert t.offer(1, {"auc": 0.70}) and t.best_key == 1
    assert t.offer(2, {"auc": 0.80})
    assert not t.offer(3, {"auc": 0.65})  # a swing down: the fleet keeps round 2
    assert not t.offer(4, {"auc": 0.80})  # a tie keeps the earlier model
    assert not t.offer(5, {"auc": math.nan}) and not t.offer(6, {"accuracy": 0.9}) and not t.offer(7, {"auc": None})
    assert (t.best_key, t.best_value, t.offered) == (2, 0.80, 7)
    assert t.best_metrics == {"auc": 0.80}


def test_losses_are_better_when_lower() -> None:
    t = BestSoFar("val_loss")
    t.offer("v1", {"val_loss": 0.6})
    t.offer("v2", {"val_loss": 0.4})
    t.offer("v3", {"val_loss": 0.5})
    assert t.best_key == "v2"


def test_sensitivity_at_specificity_reads_the_roc_curve() -> None:
    y = np.array([0] * 10 + [1] * 4)
    score = np.array([0.1] * 8 + [0.7, 0.95] + [0.2, 0.8, 0.9, 0.99])
    # 90 % specificity allows one false positive of ten: threshold 0.8 passes one benign score (0.95)
    # and three of the four melanomas
    assert sensitivity_at_specificity(y, score, 0.9) == pytest.approx(3 / 4)
    assert sensitivity_at_specificity(y, score, 1.0) == pytest.approx(1 / 4)  # only 0.99 beats every benign
    with pytest.raises(ValueError, match="both classes"):
        sensitivity_at_specificity(np.zeros(3), np.ones(3))


def test_binary_report_of_a_constant_score_is_the_floor() -> None:
    y = np.array([0, 0, 0, 1])
    r = binary_report(y, np.zeros(4))
    assert r["auc"] == 0.5 and r["balanced_accuracy"] == 0.5 and r["accuracy"] == 0.75
    assert r["sensitivity_at_90_specificity"] == 0.0

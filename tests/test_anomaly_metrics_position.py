"""Position-matched AUROC and the slices' relative axial position (the brain FLAIR confound)."""

from __future__ import annotations

import numpy as np
import pytest

from learning.anomaly.errors import AnomalyError
from learning.anomaly.metrics import image_auroc, position_bands, position_matched_auroc
from learning.brain_mri import SliceSet


def test_a_position_only_score_is_perfect_plainly_and_chance_within_bands() -> None:
    rng = np.random.default_rng(0)
    position = rng.uniform(0, 1, 2000)
    mid_band = (position >= 0.4) & (position < 0.6)  # the lesion rate changes between bands, not within
    labels = (rng.uniform(0, 1, 2000) < np.where(mid_band, 0.6, 0.05)).astype(int)
    central = -np.abs(position - 0.5)
    assert image_auroc(labels, central) > 0.75  # the confound: position alone separates the classes
    assert abs(position_matched_auroc(labels, central, position, bands=5) - 0.5) < 0.08


def test_a_score_that_sees_the_anomaly_keeps_its_auroc_within_bands() -> None:
    rng = np.random.default_rng(1)
    position = rng.uniform(0, 1, 1000)
    labels = rng.integers(0, 2, 1000)
    scores = labels + rng.normal(0, 0.1, 1000)
    assert position_matched_auroc(labels, scores, position) > 0.99


def test_pairs_weight_the_bands_and_one_class_bands_add_nothing() -> None:
    labels = np.array([1, 0, 0, 1, 1, 0, 1, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.0, 0.1, 0.5, 0.7, 0.8])
    position = np.array([0.0, 0.0, 0.1, 0.5, 0.5, 0.5, 0.95, 0.95])
    # band 0: 1 pos × 2 neg, AUROC 1; band 2: 2 pos × 1 neg, AUROC 0; band 4: positives only
    assert position_matched_auroc(labels, scores, position, bands=5) == pytest.approx((1.0 * 2 + 0.0 * 2) / 4)
    with pytest.raises(AnomalyError):
        position_matched_auroc(np.array([1, 0]), np.array([0.1, 0.2]), np.array([0.0, 0.9]), bands=5)
    with pytest.raises(AnomalyError):
        position_bands(np.array([1.2]))
    assert position_bands(np.array([0.0, 0.19, 0.2, 0.99, 1.0]), 5).tolist() == [0, 0, 1, 4, 4]


def test_relative_position_ranks_each_subjects_slices() -> None:
    n = 5
    s = SliceSet(np.zeros((n, 2, 2), np.float32), np.zeros((n, 2, 2), np.uint8),
                 np.array(["a", "a", "a", "b", "c"]), np.array([30, 10, 20, 7, 9]), (1.0, 1.0))
    assert s.relative_position.tolist() == [1.0, 0.0, 0.5, 0.5, 0.5]

"""bench/privacy.py's post-processing: the logit shift fitted on the validation split."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from privacy import fit_logit_shift


def _balanced_accuracy(y: np.ndarray, logits: np.ndarray, shift: float) -> float:
    pred = logits[:, 1] - logits[:, 0] + shift > 0
    return float(0.5 * (pred[y == 1].mean() + (~pred[y == 0]).mean()))


def test_shift_undoes_a_one_class_bias() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0] * 40 + [1] * 120)
    margin = np.where(y == 1, 1.0, -1.0) + rng.normal(0, 0.3, len(y)) + 5.0  # every argmax says class 1
    logits = np.stack([np.zeros_like(margin), margin], axis=1)
    assert _balanced_accuracy(y, logits, 0.0) == 0.5
    s = fit_logit_shift(y, logits)
    assert -6.0 < s < -4.0
    assert _balanced_accuracy(y, logits, s) > 0.95


def test_no_shift_when_already_best_or_undefined() -> None:
    y = np.array([0, 0, 1, 1])
    logits = np.array([[0.0, -2.0], [0.0, -1.0], [0.0, 1.0], [0.0, 2.0]])
    assert fit_logit_shift(y, logits) == 0.0  # 0 separates them: the smallest |s| among the best
    assert fit_logit_shift(np.array([1, 1]), np.zeros((2, 2))) == 0.0  # one class: nothing to balance

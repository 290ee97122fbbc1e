from __future__ import annotations

import numpy as np

from learning.calibration import expected_calibration_error, fit_temperature, nll, softmax


def test_temperature_recovers_overconfidence_and_lowers_nll_and_ece() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    true_logits = rng.normal(size=(n, 2)) * 1.5
    labels = np.array([rng.choice(2, p=p) for p in softmax(true_logits)])
    overconfident = true_logits * 4.0  # a model 4x too sure of itself
    t = fit_temperature(overconfident, labels)
    assert 3.2 < t < 4.8
    assert nll(overconfident, labels, t) < nll(overconfident, labels)
    assert expected_calibration_error(softmax(overconfident, t), labels) < expected_calibration_error(
        softmax(overconfident), labels)


def test_temperature_keeps_predictions() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(100, 3))
    assert (softmax(logits, 2.5).argmax(1) == logits.argmax(1)).all()

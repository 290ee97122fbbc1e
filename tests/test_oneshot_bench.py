"""bench/oneshot.py's bookkeeping: the teacher arm scores the ensemble the student learns from, and the
verdicts (which can come out either way) follow the numbers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from oneshot import ensemble_metrics, metrics_of, spec_for, summarize, verdicts

from fedscan import experiments
from learning.datasets import ArrayDataset


def _data(n: int = 40) -> ArrayDataset:
    rng = np.random.default_rng(0)
    return ArrayDataset(rng.integers(0, 256, (n, 12, 12), dtype=np.uint8), np.arange(n) % 2, ["normal", "pneumonia"])


def test_teacher_of_identical_sites_scores_as_that_site_and_differs_from_another() -> None:
    data = _data()
    spec = spec_for(data, width=4)
    a, b = experiments.initial(spec, 0), experiments.initial(spec, 1)
    assert ensemble_metrics(spec, [a, a], data) == metrics_of(spec, a, data)
    mixed = ensemble_metrics(spec, [a, b], data)
    assert mixed["auc"] not in (metrics_of(spec, a, data)["auc"], metrics_of(spec, b, data)["auc"])


def _row(arm: str, seed: int, auc: float, accuracy: float = 0.7) -> dict[str, Any]:
    return {"dataset": "d", "seed": seed, "arm": arm, "auc": auc, "balanced_accuracy": accuracy,
            "accuracy": accuracy, "rounds": 1, "uplink_bytes_per_site": 10, "downlink_bytes_per_site": 10,
            "seconds": 1.0}


def _verdict(teacher_auc: float, oneshot_auc: float) -> dict[str, Any]:
    rows = [r for seed in (0, 1) for r in (
        _row("oneshot", seed, oneshot_auc), _row("ensemble (teacher)", seed, teacher_auc),
        _row("fedavg@1", seed, 0.6), _row("fedavg@20", seed, 0.9), _row("centralized", seed, 0.95),
        _row("site a", seed, 0.70), _row("site b", seed, 0.80), _row("floor (majority class)", seed, 0.5, 0.6))]
    summary = summarize(rows)
    assert [s["arm"] for s in summary][:2] == ["oneshot", "ensemble (teacher)"]
    (v,) = verdicts(summary)
    return v


def test_verdicts_compare_oneshot_and_its_teacher_with_every_site() -> None:
    low = _verdict(teacher_auc=0.78, oneshot_auc=0.75)
    assert low["teacher_beats_every_site_auc"] is False and low["oneshot_beats_every_site_auc"] is False
    assert round(low["gap_to_teacher_auc_points"], 6) == -3.0
    high = _verdict(teacher_auc=0.85, oneshot_auc=0.82)
    assert high["teacher_beats_every_site_auc"] is True and high["oneshot_beats_every_site_auc"] is True
    assert high["oneshot_beats_fedavg1_auc"] is True and round(high["gap_to_fedavg20_auc_points"], 6) == -8.0

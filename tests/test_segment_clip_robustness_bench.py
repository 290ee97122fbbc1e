"""bench/segment_clip_robustness.py: both clippings start from each bound, and the verdict's arithmetic."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from segment import SETTINGS
from segment_clip_robustness import jobs_for, verdicts

from learning.segmentation.data import MRI, PH2


def test_both_clippings_start_from_the_same_bound() -> None:
    jobs = jobs_for((0.1, 10.0), SETTINGS)
    assert [(s.initial_clip, s.fixed_clip, j.clipping) for s, j in jobs] == [
        (0.1, 0.1, "adaptive"), (0.1, 0.1, "fixed"), (10.0, 10.0, "adaptive"), (10.0, 10.0, "fixed")]
    assert {(j.arm, j.share, j.epsilon) for _, j in jobs} == {("federated", "fedbn", 4.0)}


def test_verdict_reports_per_bound_differences_mean_and_worst_case() -> None:
    dice = {(0.1, "adaptive"): 0.8, (0.1, "fixed"): 0.5, (1.0, "adaptive"): 0.8, (1.0, "fixed"): 0.85}
    rows = [{"initial_clip": c0, "clipping": clip, "scope": m, "dice": d if m == PH2 else 0.0}
            for (c0, clip), d in dice.items() for m in (PH2, MRI)]
    v = verdicts(rows, (0.1, 1.0))
    assert v[PH2]["adaptive_minus_fixed_points"] == {"0.1": 30.0, "1": -5.0}
    assert v[PH2]["mean_over_bounds_points"] == 12.5
    assert (v[PH2]["worst_adaptive"], v[PH2]["worst_fixed"]) == (0.8, 0.5)
    assert v[MRI]["mean_over_bounds_points"] == 0.0

"""`fedscan demo` end to end at a tiny size: report schema, plot, and a finished federation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def _mini_npz(full: Path, out: Path, sizes: dict[str, int]) -> Path:
    """The first ``sizes[split]`` images of each split of ``full``, as a MedMNIST-format npz.

    The demo's whole path (broker, coordinator, agents, baselines, report, plot) on a sixth of the
    data: an epoch over all 4,708 training images, three times over for the baselines, made this
    test the slowest of the suite.
    """
    with np.load(full) as z:
        np.savez(out, **{f"{s}_{k}": z[f"{s}_{k}"][:n] for s, n in sizes.items() for k in ("images", "labels")})
    return out


def test_demo_runs_and_writes_the_report(tmp_path: Path, pneumonia_npz: Path) -> None:
    out = tmp_path / "demo"
    data = _mini_npz(pneumonia_npz, tmp_path / "mini.npz", {"train": 800, "val": 200, "test": 300})
    proc = subprocess.run(
        [sys.executable, "-m", "fedscan", "demo", "--out", str(out), "--agents", "2", "--rounds", "1",
         "--data", str(data)], capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "demo-report.json").read_text())
    assert {"rounds", "sites", "accuracy", "balanced_accuracy", "auc", "bytes", "seconds"} <= set(report)
    assert report["rounds"] == 1 and report["sites"] == ["site-1", "site-2"]
    for metric in ("accuracy", "balanced_accuracy", "auc"):
        assert {"federated", "centralized", "local_mean"} <= set(report[metric])
        assert 0.0 <= report[metric]["federated"] <= 1.0
    assert report["bytes"]["uplink"] > 2 * report["bytes"]["float32_update"]  # two raw updates at least
    assert report["bytes"]["downlink"] > 0 and report["seconds"] > 0
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

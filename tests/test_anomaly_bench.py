"""bench/anomaly.py's bookkeeping: jobs planned, per-arm rows averaged over sites then seeds, the
single-site mean, and the must-show verdicts (which can come out either way)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import anomaly
from anomaly import Job, aggregate, main, plan, verdicts

from fedscan.anomaly_arms import ArmResult


def test_plan_has_every_arm_per_seed_and_one_intensity_run() -> None:
    jobs = plan(["pneumoniamnist"], ["gamma"], seeds=2, sites=3)
    assert sum(j.arm == "intensity-baseline" for j in jobs) == 1
    assert sum(j.arm == "single" for j in jobs) == 6 and sum(j.arm == "federated-feddis" for j in jobs) == 2
    assert len(set(jobs)) == len(jobs)


def _res(name: str, **site_auroc: float) -> ArmResult:
    return ArmResult(name, {s: {"image_auroc": v} for s, v in site_auroc.items()})


def test_rows_average_sites_then_seeds_and_verdicts_follow_the_numbers() -> None:
    results = []
    for seed, (fed, plain) in enumerate([(0.8, 0.6), (0.6, 0.6)]):
        results += [(Job("d", "gamma", "federated-feddis", seed), _res("federated-feddis", site0=fed, site1=fed)),
                    (Job("d", "gamma", "federated-fedavg-ae", seed), _res("federated-fedavg-ae", site0=plain)),
                    (Job("d", "gamma", "single", seed, "site0"), _res("single-site0", site0=0.5)),
                    (Job("d", "gamma", "single", seed, "site1"), _res("single-site1", site1=0.9))]
    rows = aggregate(results)
    by = {r["arm"]: r for r in rows}
    assert by["federated-feddis"]["image_auroc"] == pytest.approx(0.7)
    assert by["federated-feddis"]["image_auroc_std"] == pytest.approx(0.1)
    assert by["single-mean"]["image_auroc"] == pytest.approx(0.7) and by["single-mean"]["seeds"] == 2
    v = verdicts(rows)
    assert v == {"d/gamma/image_auroc: feddis 0.7000 vs single-mean 0.7000": False,
                 "d/gamma/image_auroc: feddis 0.7000 vs federated-fedavg-ae 0.6000": True}


def test_rounds_without_its_own_name_is_refused_before_any_work(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Another budget written to anomaly.json would pass for the default settings' run."""
    monkeypatch.setattr(sys, "argv", ["anomaly.py", "--split", "val", "--rounds", "30"])

    def no_work(*_a: object, **_k: object) -> None:
        raise AssertionError("the run went past the argument check")

    monkeypatch.setattr(anomaly, "plan", no_work)
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert "--rounds changes the settings: give the run its own --name" in capsys.readouterr().err

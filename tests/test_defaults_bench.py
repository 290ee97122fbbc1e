"""bench/defaults.py's choice of "the best single site" as settings are chosen: by validation, not test."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from defaults import _site_best_on_validation
from melanoma import row

from fedscan.baselines import Outcome

NAN = float("nan")


def _site(name: str, val: list[float], test_auc: float) -> Outcome:
    return Outcome(name, {"auc": test_auc}, val_curve=val, selected_round=1)


def test_the_site_with_the_best_validated_round_wins_not_the_best_test_score() -> None:
    sites = [_site("site-1", [0.80, 0.90], 0.99), _site("site-2", [NAN, 0.95, 0.91], 0.85),
             _site("site-3", [], 0.97)]
    assert _site_best_on_validation(sites).name == "site-2"
    assert _site_best_on_validation([_site("a", [NAN], 0.5), _site("b", [0.6], 0.4)]).name == "b"


def test_rows_carry_the_validation_auc_the_model_was_selected_by() -> None:
    assert row(0, _site("site-2", [NAN, 0.95, 0.91], 0.85))["val_auc"] == 0.95
    assert "val_auc" not in row(0, _site("site-3", [], 0.97))


def test_a_further_budget_run_writes_the_file_it_is_named_not_the_earlier_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    import defaults
    from _common import InlineExecutor

    def fake_tune_one(dataset: str, seed: int, federated: bool, momentum: float | None, rounds: int) -> dict[str, Any]:
        return {"dataset": dataset, "seed": seed, "arm": "federated" if federated else "centralized",
                "rounds": rounds, "val_auc_best": 0.9 if federated else 0.95}

    written: list[str] = []
    monkeypatch.setattr(defaults, "ProcessPoolExecutor", lambda **kw: InlineExecutor())
    monkeypatch.setattr(defaults, "_tune_one", fake_tune_one)
    monkeypatch.setattr(defaults, "write_rows", lambda name, rows, **kw: written.append(name))
    monkeypatch.setattr(sys, "argv", ["defaults.py", "--tune-rounds", "80", "--tune-datasets", "isic",
                                      "--tune-seeds", "0", "--tune-results", "defaults_budget_tuning-r80"])
    defaults.main()
    monkeypatch.setattr(sys, "argv", ["defaults.py", "--tune-rounds", "40", "--tune-datasets", "isic",
                                      "--tune-seeds", "0"])
    defaults.main()
    assert written == ["defaults_budget_tuning-r80", "defaults_budget_tuning"]

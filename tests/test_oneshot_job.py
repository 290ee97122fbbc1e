"""fedscan/oneshot_job.py: the ``--job oneshot`` coordinator plan, its options and refusals, its registration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.jobs import JobContext, UnknownJob
from coordinator.strategies.oneshot import OneShotDistillation
from fedscan.jobs import agent_trainers, coordinator_jobs
from fedscan.oneshot_job import DEFAULT, config_from_options, oneshot_plan
from firmware.profile import find_profile
from protocol.errors import Reason
from protocol.jobs import Job


def _ctx(profile: str = "xray-cxr-28-oneshot", **kw: object) -> JobContext:
    return JobContext(profile=find_profile(profile), val_data=None, rounds=1, **kw)  # type: ignore[arg-type]


def test_plan_is_classify_with_the_distillation_step() -> None:
    plan = coordinator_jobs().plan(Job.ONESHOT, _ctx())
    assert plan.job is Job.ONESHOT and isinstance(plan.strategy, OneShotDistillation)
    assert plan.model_spec.kwargs["norm"] == "batch"
    assert plan.strategy.shape == (1, 28, 28) and plan.strategy.config == DEFAULT
    assert any(n.endswith("running_mean") for n in plan.initial_tensors())  # a BatchNorm model travels
    assert agent_trainers().trains_like_classify(Job.ONESHOT)  # the box's step: one round of classify


def test_refusals() -> None:
    with pytest.raises(UnknownJob) as e:
        oneshot_plan(_ctx("xray-cxr-28"))  # GroupNorm profile
    assert e.value.reason is Reason.BATCHNORM_REQUIRED
    with pytest.raises(UnknownJob) as e:
        oneshot_plan(JobContext(profile=find_profile("xray-cxr-28-oneshot"), val_data=None, rounds=5))
    assert e.value.reason is Reason.BAD_JOB_PARAMS
    for bad in ({"nope": "1"}, {"epochs": "x"}, {"epochs": "0"}, {"batch_size": "1"}):
        with pytest.raises(UnknownJob) as e:
            config_from_options(bad)
        assert e.value.reason is Reason.BAD_JOB_PARAMS


def test_options_override_the_defaults() -> None:
    cfg = config_from_options({"epochs": "2", "iterations": "5", "batch_size": "8", "replay_steps": "0"})
    assert (cfg.epochs, cfg.synthesis.iterations, cfg.synthesis.batch_size, cfg.distill.replay_steps) == (2, 5, 8, 0)
    assert cfg.distill.lr == DEFAULT.distill.lr and cfg.synthesis.pixel_range == DEFAULT.synthesis.pixel_range
    plan = oneshot_plan(_ctx(options={"epochs": "2"}))
    assert isinstance(plan.strategy, OneShotDistillation) and plan.strategy.config.epochs == 2


def test_the_default_is_the_setting_the_validation_search_chose() -> None:
    """DEFAULT may change only with a new ``bench/oneshot.py --tune`` run that picks it (a full run, not --quick)."""
    tuning = json.loads((Path(__file__).resolve().parents[1] / "bench/results/oneshot_tuning.json").read_text())
    assert tuning["meta"]["quick"] is False and tuning["meta"]["best"] == "default"
    assert tuning["meta"]["candidates"]["default"] == DEFAULT.model_dump(mode="json")

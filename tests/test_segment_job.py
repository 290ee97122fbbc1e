"""The segmentation job's two halves (issue 18): the box's round (``SegmentTrainer``: FedBN local
layers kept on the box, adaptive DP against the box's own ε budget kept on disk) and the
coordinator's plan and aggregation step (``fedscan.segment_job``), on real PH2 images at 16×16."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from coordinator.jobs import JobContext, UnknownJob
from coordinator.strategies import ClientResult
from edge_agent.jobs import JobError
from edge_agent.private_training import BUDGET_FILE, PrivacyStateError
from edge_agent.segment_training import SegmentParams, SegmentTrainer, parse_params
from fedscan.jobs import coordinator_jobs, load_job_data
from fedscan.segment_job import SegmentAggregation
from firmware.profile import FirmwareProfile, PrivacySection, find_profile
from learning.data_path import data_dir
from learning.models import build_model
from learning.pause import PauseHook
from learning.privacy_accounting import BudgetExhausted
from learning.segmentation.data import PH2, load_site
from learning.segmentation.sharing import ShareRule, local_names, shared_names
from protocol.errors import Reason
from protocol.jobs import Job
from protocol.manifest import Architecture, Manifest, TensorEntry
from protocol.messages import Task
from protocol.tensors import tensor_hash

PH2_ROOT = data_dir() / "ph2"
needs_ph2 = pytest.mark.skipif(not PH2_ROOT.is_dir(), reason=f"{PH2_ROOT} not present (shared data)")
SIZE = 16


def _profile(budget: float | None = 8.0) -> FirmwareProfile:
    p = find_profile("seg-dermoscopy-64")
    p = p.model_copy(update={"input": p.input.model_copy(update={"height": SIZE, "width": SIZE}),
                             "model": p.model.model_copy(update={"width": 4})})
    if budget is None:
        return p.model_copy(update={"privacy": None})
    return p.model_copy(update={"privacy": PrivacySection(dp_sgd=True, max_grad_norm=1.0, epsilon_budget=budget)})


def _plan(profile: FirmwareProfile, **options: str):  # type: ignore[no-untyped-def]
    return coordinator_jobs().plan(Job.SEGMENT, JobContext(profile=profile, val_data=None, seed=0, rounds=3,
                                                            options=options))


def _manifest(plan, tensors) -> Manifest:  # type: ignore[no-untyped-def]
    spec = plan.model_spec
    return Manifest(version="v0", architecture=Architecture(name=spec.architecture, kwargs=spec.kwargs),
                    classes=spec.classes, input=spec.input, job=Job.SEGMENT,
                    tensors=[TensorEntry(name=k, shape=v.shape) for k, v in tensors.items()],
                    tensor_hash=tensor_hash(tensors))


def _task(round_id: int, params: dict) -> Task:  # type: ignore[type-arg]
    return Task(round_id=round_id, base_version="v0", deadline=time.time() + 60, job=Job.SEGMENT, job_params=params)


@needs_ph2
def test_box_round_keeps_norm_layers_local_and_spends_its_own_budget_across_restarts(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    profile = _profile(budget=8.0)
    plan = _plan(profile, share="fedbn", steps="3", batch_size="4")
    assert plan.params["planned_rounds"] == 3 and plan.params["share"] == "fedbn"
    base = plan.initial_tensors()
    manifest = _manifest(plan, base)
    np.save(tmp_path / "picks.npy", np.arange(8))
    site = load_job_data(profile, PH2_ROOT, tmp_path / "picks.npy", site="derm-1")  # the agent's --data/--indices
    assert site.modality == PH2 and len(site) == 8 and site.name == "derm-1" and site.train.size == SIZE

    trainer = SegmentTrainer(profile, tmp_path)
    up1 = trainer.train(_task(1, plan.params), manifest, base, site, pause=PauseHook(), progress=None)
    model = build_model("seg_unet", **plan.model_spec.kwargs)
    local, shared = local_names(model, ShareRule.FEDBN), shared_names(model, ShareRule.FEDBN)
    assert local and list(up1.tensors) == list(base)  # the whole model's names, in order
    assert all(np.array_equal(up1.tensors[k], base[k]) for k in local), "a local norm layer left the box"
    assert any(not np.array_equal(up1.tensors[k], base[k]) for k in shared)
    kept = trainer.local_tensors()
    assert sorted(kept) == sorted(local) and any(not np.array_equal(kept[k], base[k]) for k in local)
    m = up1.metrics
    assert 0 < m["dp_epsilon"] <= 8.0 and m["dp_budget_epsilon"] == 8.0 and m["dp_clip_before"] == 1.0
    assert m["dp_clip"] != 1.0, "the adaptive bound moves with the site's released counts"
    assert json.loads((tmp_path / BUDGET_FILE).read_text())["events"], "ε must be on disk before the update leaves"

    again = SegmentTrainer(profile, tmp_path)  # a restarted box continues its budget and its clip bound
    up2 = again.train(_task(2, plan.params), manifest, base, site, pause=PauseHook(), progress=None)
    assert up2.metrics["dp_epsilon"] > m["dp_epsilon"] and up2.metrics["dp_clip_before"] == pytest.approx(m["dp_clip"])

    # a budget with no room for one more round refuses before training, and spends nothing
    stored = (tmp_path / BUDGET_FILE).read_text()
    tight = SegmentTrainer(_profile(budget=up2.metrics["dp_epsilon"] + 1e-3), tmp_path)
    with pytest.raises(BudgetExhausted):
        tight.train(_task(3, plan.params), manifest, base, site, pause=PauseHook(), progress=None)
    assert (tmp_path / BUDGET_FILE).read_text() == stored
    (tmp_path / BUDGET_FILE).write_text("{broken")
    with pytest.raises(PrivacyStateError, match="never delete it"):
        again.train(_task(3, plan.params), manifest, base, site, pause=PauseHook(), progress=None)


@needs_ph2
@pytest.mark.parametrize("budget", [None, 8.0])
def test_dp_rounds_train_with_the_dp_optimizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               budget: float | None) -> None:
    """Adam at the job's lr diverges under DP noise (bench/segment.py --dp-tune): DP rounds take dp_optimizer/dp_lr."""
    import edge_agent.segment_training as st

    seen: list[Any] = []
    real = st.train_site
    monkeypatch.setattr(st, "train_site", lambda model, data, cfg, **kw: seen.append(cfg) or real(model, data, cfg, **kw))
    profile = _profile(budget=budget)
    plan = _plan(profile, steps="1", batch_size="2", dp_lr="0.02")
    base = plan.initial_tensors()
    site = load_site(PH2_ROOT, np.arange(4), name="d", size=SIZE, channels=1)
    SegmentTrainer(profile, tmp_path).train(_task(1, plan.params), _manifest(plan, base), base, site,
                                            pause=PauseHook(), progress=None)
    want = ("adam", 2e-3) if budget is None else ("sgd", 0.02)
    assert [(c.optimizer, c.lr) for c in seen] == [want]


@needs_ph2
def test_box_refuses_bad_params_and_the_wrong_data(tmp_path: Path) -> None:
    profile = _profile(budget=None)
    plan = _plan(profile, share="fedavg", steps="1", batch_size="2")
    base = plan.initial_tensors()
    site = load_site(PH2_ROOT, np.arange(2), name="d", size=SIZE, channels=1)
    trainer = SegmentTrainer(profile, tmp_path)
    up = trainer.train(_task(1, plan.params), _manifest(plan, base), base, site, pause=PauseHook(), progress=None)
    assert "dp_epsilon" not in up.metrics and trainer.local_tensors() == {}  # fedavg: nothing stays local
    for bad in ({"share": "everything"}, {"steps": 0}, {"clipping": "none"}, {"surprise": 1},
                {"dp_optimizer": "rmsprop"}, {"dp_lr": 0}):
        with pytest.raises(JobError) as err:
            parse_params({**plan.params, **bad})
        assert err.value.reason == Reason.BAD_JOB_PARAMS
    with pytest.raises(JobError) as err:
        trainer.train(_task(2, plan.params), _manifest(plan, base), base, (np.zeros(3), np.zeros(3)),
                      pause=PauseHook(), progress=None)
    assert err.value.reason == Reason.JOB_MISMATCH


def test_aggregation_averages_shared_tensors_one_vote_per_site_and_keeps_local_ones() -> None:
    plan = _plan(_profile(None), share="fedbn")
    agg = plan.strategy
    assert isinstance(agg, SegmentAggregation) and agg.weighting == "equal"
    base = plan.initial_tensors()
    local = sorted(set(base) - set(agg.shared))
    assert local, "FedBN keeps the norm layers local"
    a = {k: v + 1.0 for k, v in base.items()}
    b = {k: v + 3.0 for k, v in base.items()}
    new, report = agg.aggregate(1, base, [ClientResult("a", a, 10), ClientResult("b", b, 1000)])
    k = agg.shared[0]
    assert np.allclose(new[k], base[k] + 2.0), "equal weighting: one vote per site, not per image"
    assert all(np.array_equal(new[n], base[n]) for n in local)
    assert report.details["sites"] == ["a", "b"]
    # a site whose update has a wrong shape is refused with a reason; the round goes on with the rest
    bad = {**a, k: np.zeros((1,), np.float32)}
    new, report = agg.aggregate(2, base, [ClientResult("a", bad, 10), ClientResult("b", b, 10)])
    assert report.details["refused"]["a"]["reason"] == "shape_mismatch" and np.allclose(new[k], base[k] + 3.0)


def test_plan_refuses_a_classify_profile_and_unknown_options() -> None:
    with pytest.raises(UnknownJob, match="segment firmware profile"):
        _plan(find_profile("xray-cxr-28"))
    with pytest.raises(UnknownJob, match="unknown keys"):
        _plan(_profile(None), colour="blue")
    with pytest.raises(UnknownJob, match="share"):
        _plan(_profile(None), share="half")
    with pytest.raises(UnknownJob, match="weighting"):
        _plan(_profile(None), weighting="by_mood")
    with pytest.raises(UnknownJob, match="steps"):
        _plan(_profile(None), steps="0")
    assert SegmentParams().as_params()["share"] == "fedbn"


def test_segment_profile_needs_the_segmentation_unet() -> None:
    data = find_profile("seg-dermoscopy-64").model_dump()
    data["model"]["architecture"] = "small_cnn"
    data["model"]["norm"] = "group"
    with pytest.raises(ValueError, match="seg_unet"):
        FirmwareProfile.model_validate(data)


@pytest.mark.skipif(not (PH2_ROOT.is_dir() and (data_dir() / "brain-mri-flair").is_dir()), reason="shared data absent")
def test_coordinator_scores_models_on_its_own_validation_split() -> None:
    torch.set_num_threads(1)
    profile = _profile(None)
    plan = coordinator_jobs().plan(Job.SEGMENT, JobContext(profile=profile, val_data=data_dir(), seed=0, rounds=2))
    assert plan.evaluator is not None
    metrics = plan.evaluator(plan.initial_tensors())
    assert set(metrics) == {"val_dice_dermoscopy", "val_dice_brain_flair"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    # the validation cases are the bench's (build_splits, seed 0) validation split, never a site's or a test case
    from learning.brain_mri import list_subjects, split_subjects
    from learning.segmentation.data import MRI, load_validation, ph2_ids, split_ph2

    val = load_validation(data_dir(), size=SIZE, channels=1)
    p_sites, p_val, p_test = split_ph2(ph2_ids(PH2_ROOT), sites=2, val=30, test=40, seed=0)
    m_sites, m_val, m_test = split_subjects(list_subjects(data_dir() / "brain-mri-flair"), sites=2, val=4, test=5,
                                            seed=0)
    assert sorted(set(val[PH2].cases)) == p_val and not set(p_val) & set(p_test + p_sites[0] + p_sites[1])
    assert sorted(set(val[MRI].cases)) == sorted(m_val) and not set(m_val) & set(m_test + m_sites[0] + m_sites[1])

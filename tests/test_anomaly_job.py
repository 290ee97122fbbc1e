"""The anomaly job's two halves (issue 17, FedDis over the broker): the coordinator's plan and aggregation step
(``fedscan.anomaly_job``: the whole autoencoder is the global model, only the shape branch is averaged) and the
box's round (``AnomalyTrainer``: appearance branch and thresholds kept on the box), on real PneumoniaMNIST
normals and brain FLAIR subjects at small size."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.jobs import JobContext, UnknownJob
from coordinator.strategies import ClientResult
from edge_agent.anomaly_training import SCORE_FILE, STATE_FILE, AnomalyParams, AnomalyTrainer, parse_params
from edge_agent.jobs import JobError
from fedscan.jobs import agent_trainers, coordinator_jobs, load_job_data
from firmware.profile import FirmwareProfile, find_profile
from learning.anomaly.data import Site
from learning.anomaly.errors import AnomalyError
from learning.anomaly.model import DisentangledAE, ShareRule, local_names, shared_names
from learning.anomaly.site_state import load_site_state
from learning.data_path import data_dir
from learning.models import build_model
from learning.pause import PauseHook, TrainingCancelled
from protocol.errors import Reason
from protocol.jobs import Job
from protocol.manifest import Architecture, Manifest, TensorEntry
from protocol.messages import Task
from protocol.tensors import tensor_hash

NPZ = data_dir() / "pneumoniamnist.npz"
FLAIR = data_dir() / "brain-mri-flair"
needs_npz = pytest.mark.skipif(not NPZ.exists(), reason=f"{NPZ} not present (shared data)")
needs_flair = pytest.mark.skipif(not FLAIR.is_dir(), reason=f"{FLAIR} not present (shared data)")


def _profile(width: int = 8) -> FirmwareProfile:
    p = find_profile("xray-anomaly-28")
    return p.model_copy(update={"model": p.model.model_copy(update={"width": width})})


def _plan(profile: FirmwareProfile | None = None, seed: int = 0, **options: str):  # type: ignore[no-untyped-def]
    return coordinator_jobs().plan(Job.ANOMALY, JobContext(profile=profile or _profile(), val_data=None, seed=seed,
                                                            options=options))


def _manifest(plan, tensors, version: str = "v0") -> Manifest:  # type: ignore[no-untyped-def]
    spec = plan.model_spec
    return Manifest(version=version, architecture=Architecture(name=spec.architecture, kwargs=spec.kwargs),
                    classes=spec.classes, input=spec.input, job=Job.ANOMALY,
                    tensors=[TensorEntry(name=k, shape=v.shape) for k, v in tensors.items()],
                    tensor_hash=tensor_hash(tensors))


def _task(round_id: int, params: dict, seed: int = 1) -> Task:  # type: ignore[type-arg]
    task = Task(round_id=round_id, base_version="v0", deadline=time.time() + 60, job=Job.ANOMALY, job_params=params)
    return task.model_copy(update={"training": task.training.model_copy(update={"seed": seed})})


def test_plan_builds_the_autoencoder_and_averages_only_the_shape_branch() -> None:
    plan = _plan(steps="3")
    spec = plan.model_spec
    assert plan.job == Job.ANOMALY and spec.architecture == "feddis_ae" and spec.input.height == 28
    model = build_model(spec.architecture, **spec.kwargs)  # what the box builds from the manifest
    assert isinstance(model, DisentangledAE) and model.cfg.size == 28
    base = plan.initial_tensors()
    assert all(np.array_equal(base[k], v) for k, v in _plan(steps="3").initial_tensors().items())  # seeded
    assert any(not np.array_equal(base[k], v) for k, v in _plan(seed=1).initial_tensors().items())
    assert plan.params["share"] == "feddis" and plan.params["steps"] == 3 and plan.evaluator is None
    shape, local = shared_names(model, ShareRule.FEDDIS), local_names(model, ShareRule.FEDDIS)
    assert shape and local and all(k.startswith(("shape_enc.", "shape_dec.")) for k in shape)

    # two sites upload different tensors everywhere: shape tensors are averaged (weighted by images), the
    # appearance branch and the merger stay the base's even if a site sent its own
    rng = np.random.default_rng(0)
    ups = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()} for _ in range(2)]
    new, report = plan.strategy.aggregate(1, base, [ClientResult("a", ups[0], 30), ClientResult("b", ups[1], 10)])
    assert list(new) == list(base)
    for k in shape:
        np.testing.assert_allclose(new[k], 0.75 * ups[0][k] + 0.25 * ups[1][k], rtol=1e-5, atol=1e-6)
    assert all(np.array_equal(new[k], base[k]) for k in local)
    assert report.details["aggregated_tensors"] == len(shape)

    everything = _plan(share="all")  # the plain FedAvg autoencoder baseline: every tensor averaged
    new_all, _ = everything.strategy.aggregate(1, base, [ClientResult("a", ups[0], 1), ClientResult("b", ups[1], 1)])
    assert all(not np.array_equal(new_all[k], base[k]) for k in local)


def test_plan_refuses_bad_options_and_other_jobs_profiles() -> None:
    for bad in ({"share": "everything"}, {"steps": "0"}, {"lr": "fast"}, {"surprise": "1"}, {"percentile": "0"},
                {"sign": "negative"}, {"lambda_s": "nan"}):
        with pytest.raises(UnknownJob) as err:
            _plan(**bad)
        assert err.value.reason == Reason.BAD_JOB_PARAMS, bad
    with pytest.raises(UnknownJob, match="job: anomaly"):
        coordinator_jobs().plan(Job.ANOMALY, JobContext(profile=find_profile("xray-cxr-28"), val_data=None))
    assert parse_params(AnomalyParams().as_params()) == AnomalyParams()  # the wire form round-trips
    with pytest.raises(ValueError, match="feddis_ae"):
        FirmwareProfile.model_validate({**find_profile("xray-cxr-28").model_dump(), "job": "anomaly"})
    with pytest.raises(ValueError, match="square"):
        FirmwareProfile.model_validate({**_profile().model_dump(), "input": {"height": 28, "width": 32}})


@needs_npz
def test_box_round_keeps_appearance_and_thresholds_local_and_continues_after_restart(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    profile = _profile()
    plan = _plan(profile, steps="4", batch_size="8")
    base = plan.initial_tensors()
    manifest = _manifest(plan, base)
    np.save(tmp_path / "picks.npy", np.arange(80))
    site = load_job_data(profile, NPZ, tmp_path / "picks.npy", site="cxr-1")  # the agent's --data / --indices
    with np.load(NPZ) as z:
        normals = int((z["train_labels"].reshape(-1)[:80] == 0).sum())
    assert isinstance(site, Site) and len(site.train) + len(site.calib) == normals and len(site.calib) >= 1
    assert site.train.shape[1:] == (28, 28) and site.train.min() >= 0.0 and site.train.max() <= 1.0

    state = tmp_path / "job-anomaly"
    trainer = agent_trainers().trainer(Job.ANOMALY, profile, tmp_path)  # the registry gives it job-anomaly/
    assert isinstance(trainer, AnomalyTrainer) and trainer.state_dir == state
    calls: list[int] = []
    hook = PauseHook(should_pause=lambda: bool(calls.append(1)))
    up1 = trainer.train(_task(1, plan.params), manifest, base, site, pause=hook, progress=None)
    assert len(calls) >= 4, "the trainer yields to inference between steps"
    model = build_model("feddis_ae", **plan.model_spec.kwargs)
    shape, local = shared_names(model, ShareRule.FEDDIS), local_names(model, ShareRule.FEDDIS)
    assert list(up1.tensors) == list(base) and up1.sample_count == len(site.train)
    assert all(np.array_equal(up1.tensors[k], base[k]) for k in local), "an appearance tensor left the box"
    assert any(not np.array_equal(up1.tensors[k], base[k]) for k in shape)
    kept = load_site_state(state / STATE_FILE)
    assert sorted(kept.local) == sorted(local) and any(not np.array_equal(kept.local[k], base[k]) for k in local)
    assert kept.thresholds is not None and kept.thresholds.n_normal == len(site.calib) and kept.base_version == "v0"
    assert up1.metrics["threshold_image"] == kept.thresholds.image > 0 and (state / SCORE_FILE).exists()
    assert np.isfinite(up1.metrics["train_loss"]) and up1.metrics["shape_consistency"] >= 0

    again = AnomalyTrainer(profile, state)  # a restarted box trains on from its own appearance branch
    served, thresholds, _ = again.serving_model(manifest, base)  # what /v1/anomaly serves, before a new round
    assert thresholds == kept.thresholds
    for k, v in served.state_dict().items():
        if k in local:
            assert np.array_equal(v.numpy(), kept.local[k])
    up2 = again.train(_task(2, plan.params, seed=2), manifest, base, site, pause=PauseHook(), progress=None)
    later = load_site_state(state / STATE_FILE)
    assert any(not np.array_equal(later.local[k], kept.local[k]) for k in local)
    assert all(np.array_equal(up2.tensors[k], base[k]) for k in local)

    cancelled = PauseHook()
    cancelled.cancel()
    with pytest.raises(TrainingCancelled):
        again.train(_task(3, plan.params), manifest, base, site, pause=cancelled, progress=None)


@needs_npz
def test_box_refuses_bad_params_wrong_data_and_a_changed_sharing_rule(tmp_path: Path) -> None:
    profile = _profile()
    plan = _plan(profile, steps="1", batch_size="4")
    base = plan.initial_tensors()
    manifest = _manifest(plan, base)
    site = load_job_data(profile, NPZ, None, site="s")
    trainer = AnomalyTrainer(profile, tmp_path)
    for bad in ({"share": "some"}, {"steps": 0}, {"batch_size": "x"}, {"smooth": -1}, {"k": 1}):
        with pytest.raises(JobError) as err:
            trainer.train(_task(1, {**plan.params, **bad}), manifest, base, site, pause=PauseHook(), progress=None)
        assert err.value.reason == Reason.BAD_JOB_PARAMS, bad
    with pytest.raises(JobError) as err:
        trainer.train(_task(1, plan.params), manifest, base, np.zeros((4, 28, 28)), pause=PauseHook(), progress=None)
    assert err.value.reason == Reason.JOB_MISMATCH
    trainer.train(_task(1, plan.params), manifest, base, site, pause=PauseHook(), progress=None)
    with pytest.raises(JobError) as err:  # local tensors kept under feddis do not fit share=all (nothing local)
        trainer.train(_task(2, {**plan.params, "share": "all"}), manifest, base, site, pause=PauseHook(),
                      progress=None)
    assert err.value.reason == Reason.BAD_JOB_PARAMS
    with pytest.raises(AnomalyError, match="integer positions"):
        load_job_data(profile, NPZ, _save(tmp_path / "bad.npy", np.array([10**7])), site="s")


def _save(path: Path, arr: np.ndarray) -> Path:
    np.save(path, arr)
    return path


@needs_flair
def test_flair_box_holds_out_its_last_subject_and_trains_on_lesion_free_slices(tmp_path: Path) -> None:
    profile = find_profile("anomaly-flair-64").model_copy()
    profile = profile.model_copy(update={"input": profile.input.model_copy(update={"height": 16, "width": 16})})
    site = load_job_data(profile, FLAIR, _save(tmp_path / "p.npy", np.array([0, 1])), site="mri-1")
    assert isinstance(site, Site) and site.train.shape[1:] == (16, 16) and len(site.train) and len(site.calib)
    with pytest.raises(AnomalyError, match="2 subjects"):
        load_job_data(profile, FLAIR, _save(tmp_path / "one.npy", np.array([3])), site="mri-1")

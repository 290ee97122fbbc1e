"""The job seam (issues 17/18): ``Job`` on the wire in tasks and manifests, the registries on both
sides, and the agent's refusal of a task it cannot train. Classify stays byte-identical."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_helpers import FLEET_KEY, tiny_trust, tiny_v0
from typer.testing import CliRunner

from coordinator.jobs import JobContext, JobRegistry, UnknownJob
from edge_agent.agent import AgentSettings, EdgeAgent
from edge_agent.jobs import JobError, LocalUpdate, TrainerRegistry, check_job
from fedscan.cli import app
from fedscan.jobs import agent_trainers, coordinator_jobs
from firmware.profile import FirmwareProfile, find_profile
from learning.datasets import make_synthetic
from protocol.errors import MalformedMessage, Reason
from protocol.frame import decode_update, read_header, specs_of
from protocol.jobs import SERVING_ENDPOINT, Job, serving_endpoint
from protocol.manifest import parse_manifest
from protocol.messages import AgentEvent, Task, parse_message
from protocol.signing import SignatureError
from protocol.topics import Topics
from protocol.transport import MemoryBroker, MemoryTransport


def _task(job: Job = Job.CLASSIFY, **kw: Any) -> Task:
    return Task(round_id=1, base_version="v0", deadline=time.time() + 60, job=job, **kw)


def test_classify_task_leaves_job_off_the_wire_and_other_jobs_carry_it() -> None:
    plain = json.loads(_task().to_bytes())
    assert "job" not in plain and "job_params" not in plain  # an agent older than jobs still parses it
    assert parse_message(Task, _task().to_bytes()).job == Job.CLASSIFY
    seg = _task(Job.SEGMENT, job_params={"share": "fedbn", "planned_rounds": 3})
    wire = json.loads(seg.to_bytes())
    assert wire["job"] == "segment" and wire["job_params"] == {"share": "fedbn", "planned_rounds": 3}
    assert parse_message(Task, seg.to_bytes()) == seg


def test_unknown_job_on_the_wire_is_a_malformed_message() -> None:
    wire = json.loads(_task(Job.SEGMENT).to_bytes())
    wire["job"] = "mine-bitcoin"
    with pytest.raises(MalformedMessage, match="job"):
        parse_message(Task, json.dumps(wire))


def test_classify_manifest_signs_the_same_bytes_as_before_jobs_and_other_jobs_sign_their_job() -> None:
    manifest, _ = tiny_v0()
    assert manifest.job == Job.CLASSIFY and '"job"' not in manifest.canonical_bytes().decode()
    assert "job" not in json.loads(manifest.to_bytes())
    trust = tiny_trust()
    trust.verify_manifest(parse_manifest(manifest.to_bytes()))  # signed, sent, parsed: still verifies
    seg = FLEET_KEY.sign_manifest(manifest.model_copy(update={"job": Job.SEGMENT, "signature": None}))
    assert json.loads(seg.to_bytes())["job"] == "segment"
    trust.verify_manifest(parse_manifest(seg.to_bytes()))
    # a segmentation model relabelled as a classifier no longer verifies: the job is signed
    relabelled = seg.model_copy(update={"job": Job.CLASSIFY})
    with pytest.raises(SignatureError):
        trust.verify_manifest(relabelled)


def test_every_job_has_a_serving_endpoint() -> None:
    assert set(SERVING_ENDPOINT) == set(Job)
    assert serving_endpoint("classify") == "/v1/diagnose" and serving_endpoint(Job.SEGMENT) == "/v1/segment"


def test_trainer_registry_refuses_unknown_jobs_and_builds_each_trainer_once(tmp_path: Path) -> None:
    built: list[Path] = []

    class Echo:
        def __init__(self, profile: FirmwareProfile, state_dir: Path) -> None:
            built.append(state_dir)

        def train(self, task: Task, manifest: Any, base: Any, data: Any, *, pause: Any, progress: Any) -> LocalUpdate:
            return LocalUpdate({k: v + 1 for k, v in base.items()}, 7, {"train_loss": 0.5})

    reg = TrainerRegistry()
    profile = find_profile("xray-cxr-28")
    with pytest.raises(JobError) as err:
        reg.trainer(Job.ANOMALY, profile, tmp_path)
    assert err.value.reason == Reason.UNSUPPORTED_JOB
    reg.register(Job.ANOMALY, Echo)
    assert reg.trainer(Job.ANOMALY, profile, tmp_path) is reg.trainer(Job.ANOMALY, profile, tmp_path)
    assert built == [tmp_path / "job-anomaly"] and built[0].is_dir()


def test_a_job_can_train_with_the_classify_step(tmp_path: Path) -> None:
    """One-shot's box step is one classify round: registered as classify-trained, no trainer of its own."""
    agent = _agent(tmp_path, MemoryBroker(), TrainerRegistry(classify_trained=[Job.ONESHOT]), job=Job.ONESHOT)
    assert agent.training.jobs.jobs == [Job.CLASSIFY, Job.ONESHOT]
    frame = agent.training.run(_task(Job.ONESHOT), make_synthetic(16, seed=1), "u-1")
    header, _ = read_header(frame)
    assert header.sample_count == 16 and header.metrics["steps"] >= 1


def test_check_job_refuses_a_base_model_of_another_job() -> None:
    manifest, _ = tiny_v0()
    check_job(_task(), manifest)
    with pytest.raises(JobError) as err:
        check_job(_task(Job.SEGMENT), manifest)
    assert err.value.reason == Reason.JOB_MISMATCH


def _agent(tmp_path: Path, broker: MemoryBroker, jobs: TrainerRegistry | None = None,
           job: Job = Job.CLASSIFY) -> EdgeAgent:
    manifest, weights = tiny_v0()
    if job != Job.CLASSIFY:
        manifest = FLEET_KEY.sign_manifest(manifest.model_copy(update={"job": job, "signature": None}))
    t = MemoryTransport(broker, "a1")
    t.connect()
    agent = EdgeAgent(AgentSettings("a1", find_profile("xray-cxr-28"), tmp_path, threads=1, trust=tiny_trust()),
                      t, make_synthetic(16, seed=1), jobs=jobs)
    agent.installer.install(manifest, weights)
    return agent


def _events(broker: MemoryBroker) -> list[AgentEvent]:
    return [AgentEvent.model_validate_json(p) for t, p in broker.log if t == Topics("default").events("a1")]


@pytest.mark.parametrize(("base_job", "reason"), [(Job.CLASSIFY, Reason.JOB_MISMATCH),
                                                  (Job.SEGMENT, Reason.UNSUPPORTED_JOB)])
def test_agent_refuses_a_task_it_cannot_train_on_the_record(tmp_path: Path, base_job: Job, reason: Reason) -> None:
    broker = MemoryBroker()
    agent = _agent(tmp_path, broker, job=base_job)
    agent._handle_task(_task(Job.SEGMENT), agent._stop)
    events = _events(broker)
    assert [e.kind for e in events] == ["training_refused"]
    assert events[0].detail.reason == reason and events[0].detail.round_id == 1
    assert not list((tmp_path / "outbox").glob("*"))  # nothing trained, nothing to send


def test_agent_runs_a_registered_jobs_trainer_and_encodes_its_update(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    class PlusOne:
        def __init__(self, profile: FirmwareProfile, state_dir: Path) -> None:
            pass

        def train(self, task: Task, manifest: Any, base: Any, data: Any, *, pause: Any, progress: Any) -> LocalUpdate:
            seen["params"], seen["n"] = task.job_params, len(data)
            return LocalUpdate({k: v + 1.0 for k, v in base.items()}, 5, {"train_loss": 0.25})

    agent = _agent(tmp_path, MemoryBroker(), TrainerRegistry({Job.ANOMALY: PlusOne}), job=Job.ANOMALY)
    frame = agent.training.run(_task(Job.ANOMALY, job_params={"k": 1}), make_synthetic(16, seed=1), "u-1")
    header, _ = read_header(frame)
    assert header.sample_count == 5 and header.metrics["train_loss"] == 0.25 and "seconds" in header.metrics
    base = agent.installer.tensors("v0")
    got = decode_update(frame, expected=specs_of(base), base=base).tensors
    assert all(np.allclose(got[k], base[k] + 1.0) for k in base)
    assert seen == {"params": {"k": 1}, "n": 16}


def test_coordinator_registry_plans_classify_and_refuses_unknown_jobs() -> None:
    ctx = JobContext(profile=find_profile("xray-cxr-28"), val_data=None)
    plan = coordinator_jobs().plan("classify", ctx)
    assert plan.job == Job.CLASSIFY and plan.strategy.name == "fedavg" and plan.model_spec.architecture
    assert plan.evaluator is None and plan.params == {}  # no --val-data: no validation; classify has no job params
    assert all(np.isfinite(v).all() for v in plan.initial_tensors().values())
    with pytest.raises(UnknownJob, match="no coordinator for job 'bogus'"):
        coordinator_jobs().plan("bogus", ctx)
    with pytest.raises(UnknownJob, match="made a plan for classify"):
        JobRegistry({Job.ANOMALY: lambda c: coordinator_jobs().plan(Job.CLASSIFY, c)}).plan(Job.ANOMALY, ctx)
    assert Job.CLASSIFY in coordinator_jobs().jobs
    assert isinstance(agent_trainers(), TrainerRegistry)


def test_cli_refuses_an_unknown_job_with_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["coordinator", "--state", str(tmp_path), "--job", "bogus"])
    assert result.exit_code == 2 and "--job must be one of" in result.output
    result = CliRunner().invoke(app, ["coordinator", "--state", str(tmp_path), "--job-option", "novalue"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


def test_profile_names_its_job() -> None:
    assert find_profile("xray-cxr-28").job == Job.CLASSIFY
    with pytest.raises(ValueError, match="job"):
        FirmwareProfile.model_validate({**find_profile("xray-cxr-28").model_dump(), "job": "bogus"})

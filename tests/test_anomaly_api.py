"""``POST /v1/anomaly`` (issue 17, serving): a real PneumoniaMNIST image through the agent's HTTP API → score,
the site threshold's verdict, the anomaly map as a PNG at the image's size, model version, timings; refusals with
reasons (bad images 4xx, not ready 503, another job's box 409), all audited."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from test_api_helpers import TOKEN, serve_http

from coordinator.jobs import JobContext
from edge_agent.anomaly_training import AnomalyTrainer
from edge_agent.api import ApiSettings, create_app
from edge_agent.api.anomaly_routes import anomaly_router
from edge_agent.audit import AuditLog
from edge_agent.serving import ServedModel
from edge_agent.serving.anomaly import AnomalyServer, note_for_modality
from edge_agent.store import LocalStore
from fedscan.jobs import anomaly_server_for, coordinator_jobs, load_job_data
from firmware.profile import FirmwareProfile, find_profile
from learning.data_path import data_dir
from protocol.jobs import Job
from protocol.manifest import Architecture, Manifest, TensorEntry
from protocol.messages import Task
from protocol.tensors import tensor_hash

NPZ = data_dir() / "pneumoniamnist.npz"
needs_npz = pytest.mark.skipif(not NPZ.exists(), reason=f"{NPZ} not present (shared data)")
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _profile(name: str = "xray-anomaly-28", size: int | None = None) -> FirmwareProfile:
    p = find_profile(name)
    p = p.model_copy(update={"model": p.model.model_copy(update={"width": 4})})
    if size is not None:
        p = p.model_copy(update={"input": p.input.model_copy(update={"height": size, "width": size})})
    return p


def _model(profile: FirmwareProfile, version: str = "v1") -> tuple[Manifest, dict[str, np.ndarray]]:
    plan = coordinator_jobs().plan(Job.ANOMALY, JobContext(profile=profile, val_data=None))
    tensors, spec = plan.initial_tensors(), plan.model_spec
    return Manifest(version=version, architecture=Architecture(name=spec.architecture, kwargs=spec.kwargs),
                    classes=spec.classes, input=spec.input, job=Job.ANOMALY,
                    tensors=[TensorEntry(name=k, shape=v.shape) for k, v in tensors.items()],
                    tensor_hash=tensor_hash(tensors)), tensors


def _app(tmp_path: Path, profile: FirmwareProfile, server: AnomalyServer | None):  # type: ignore[no-untyped-def]
    audit = AuditLog(tmp_path / "audit.jsonl")
    app = create_app(ApiSettings(tokens={"ward": TOKEN}), ServedModel(), LocalStore(tmp_path / "store"), audit,
                     accept=profile.input, extra_routers=[anomaly_router(server, profile.input, job=profile.job)],
                     job=profile.job)
    return app, audit


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@needs_npz
def test_xray_through_the_api_gives_score_verdict_map_version_and_timings(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    profile = _profile()
    with np.load(NPZ) as z:
        xray = z["test_images"][0]
    held_out: dict[str, Any] = {"normals": None}  # the box's dataset (a learning.anomaly.data.Site)
    server = anomaly_server_for(profile, tmp_path / "agent", lambda: held_out["normals"])  # what compose builds
    assert server is not None and anomaly_server_for(find_profile("xray-cxr-28"), tmp_path) is None
    manifest, tensors = _model(profile)
    assert not server.activate(manifest.model_copy(update={"job": Job.CLASSIFY}), tensors), "not an anomaly model"
    assert server.activate(manifest, tensors)  # no threshold yet: no round, no held-out normals at hand
    app, audit = _app(tmp_path, profile, server)
    with serve_http(app) as url, httpx.Client(timeout=60) as c:
        r = c.post(f"{url}/v1/anomaly", content=_png(xray), headers={**AUTH, "Content-Type": "image/png"})
        assert (r.status_code, r.json()["detail"]["reason"]) == (503, "not_ready")
        assert "threshold" in r.json()["detail"]["message"]

        # a box with its held-out normals at hand (its --data) calibrates on every model it activates
        held_out["normals"] = load_job_data(profile, NPZ, None, site="cxr")
        assert server.activate(manifest, tensors)
        big = np.asarray(Image.fromarray(xray).resize((56, 70)))  # any size: the map comes back at it
        r = c.post(f"{url}/v1/anomaly", files={"file": ("x.png", _png(big), "image/png")}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        amap = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["map_png"]))))
        assert amap.shape == (body["height"], body["width"]) == (70, 56) and amap.dtype == np.uint8
        assert body["model_version"] == "v1" and body["score"] >= 0 and isinstance(body["anomalous"], bool)
        assert body["anomalous"] is (body["score"] > body["threshold"]) and body["threshold"] > 0
        assert body["pixel_threshold"] > 0 and "normal images" in body["note"] and "DLWMLS" not in body["note"]
        assert set(body["timings"]) == {"decode_ms", "preprocess_ms", "inference_ms", "postprocess_ms", "total_ms"}
        assert body["timings"]["total_ms"] >= body["timings"]["inference_ms"] >= 0

        # refusals, each with its reason
        r = c.post(f"{url}/v1/anomaly", content=b"not an image", headers={**AUTH, "Content-Type": "image/png"})
        assert (r.status_code, r.json()["detail"]["reason"]) == (400, "corrupt_image")
        r = c.post(f"{url}/v1/anomaly", content=b"", headers={**AUTH, "Content-Type": "image/png"})
        assert r.status_code == 400 and r.json()["detail"]["reason"] == "empty_body"
        r = c.post(f"{url}/v1/anomaly", content=b"GIF89a....", headers={**AUTH, "Content-Type": "image/gif"})
        assert r.status_code == 415 and r.json()["detail"]["reason"]
        r = c.post(f"{url}/v1/anomaly", content=_png(np.zeros((1, 1), np.uint8)),
                   headers={**AUTH, "Content-Type": "image/png"})
        assert (r.status_code, r.json()["detail"]["reason"]) == (422, "wrong_size")
        r = c.post(f"{url}/v1/anomaly", content=_png(np.zeros((30, 30, 4), np.uint8)),  # translucent RGBA
                   headers={**AUTH, "Content-Type": "image/png"})
        assert (r.status_code, r.json()["detail"]["reason"]) == (422, "wrong_channels")
        r = c.post(f"{url}/v1/anomaly", content=_png(np.full((30, 40), 3000, np.uint16)),  # 16-bit grey: scaled
                   headers={**AUTH, "Content-Type": "image/png"})
        assert r.status_code == 200 and (r.json()["height"], r.json()["width"]) == (30, 40)
        r = c.post(f"{url}/v1/anomaly", content=_png(xray), headers={"Content-Type": "image/png"})
        assert r.status_code == 401
        # an anomaly box has no classifier: /v1/diagnose says where to go instead
        r = c.post(f"{url}/v1/diagnose", content=_png(xray), headers={**AUTH, "Content-Type": "image/png"})
        assert (r.status_code, r.json()["detail"]["reason"]) == (409, "job_mismatch")
        assert "/v1/anomaly" in r.json()["detail"]["message"]
        op = c.get(f"{url}/openapi.json").json()["paths"]["/v1/anomaly"]["post"]
        assert "AnomalyOut" in str(op["responses"]["200"]) and "multipart/form-data" in op["requestBody"]["content"]
    events = [(r["event"], r["reason"]) for r in audit.records()]
    assert events[:2] == [("rejected", "not_ready"), ("anomaly", None)]
    assert [e for e, _ in events[2:7]] == ["rejected"] * 5 and events[2][1] == "corrupt_image"
    assert events[7] == ("anomaly", None)
    audit.close()


def test_another_jobs_box_answers_job_mismatch_naming_its_route(tmp_path: Path) -> None:
    profile = find_profile("xray-cxr-28")
    app, audit = _app(tmp_path, profile, None)  # what compose mounts on a box of another job
    with serve_http(app) as url, httpx.Client(timeout=60) as c:
        r = c.post(f"{url}/v1/anomaly", content=_png(np.zeros((28, 28), np.uint8)),
                   headers={**AUTH, "Content-Type": "image/png"})
        assert (r.status_code, r.json()["detail"]["reason"]) == (409, "job_mismatch")
        assert "/v1/diagnose" in r.json()["detail"]["message"]
    assert [(r["event"], r["reason"]) for r in audit.records()] == [("rejected", "job_mismatch")]
    audit.close()


def test_mri_box_scores_a_16_bit_dicom_slice_and_says_normal_came_from_automatic_masks(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("MR_small.dcm")
    assert path is not None
    profile = _profile("anomaly-flair-64", size=16)
    trainer = AnomalyTrainer(profile, tmp_path / "job-anomaly")
    manifest, tensors = _model(profile, "v2")
    rng = np.random.default_rng(0)
    server = AnomalyServer(trainer, note=note_for_modality(profile.modality),
                           calibration=lambda: rng.uniform(0, 1, (6, 16, 16)).astype(np.float32))
    assert server.activate(manifest, tensors)
    assert trainer.site_state().base_version == "v2"  # type: ignore[union-attr]  # thresholds of the served model
    app, audit = _app(tmp_path, profile, server)
    with serve_http(app) as url, httpx.Client(timeout=60) as c:
        r = c.post(f"{url}/v1/anomaly", content=Path(path).read_bytes(),
                   headers={**AUTH, "Content-Type": "application/dicom"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["height"], body["width"]) == (64, 64) and "DLWMLS" in body["note"]
        assert "not drawn by hand" in body["note"]
    audit.close()


def test_task_round_trip_of_params_is_what_the_plan_sends() -> None:
    plan = coordinator_jobs().plan(Job.ANOMALY, JobContext(profile=_profile(), val_data=None,
                                                            options={"sign": "positive", "foreground": "0.05"}))
    task = Task(round_id=1, base_version="v0", deadline=time.time() + 9, job=Job.ANOMALY, job_params=plan.params)
    again = Task.model_validate_json(task.model_dump_json())  # over the wire and back
    assert again.job_params == plan.params and again.job_params["sign"] == "positive"

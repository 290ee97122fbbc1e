"""Integration (issue 17): ``fedscan coordinator --job anomaly`` and two agents as processes over a real
mosquitto, at tiny size — two chest X-ray boxes, each with its share of PneumoniaMNIST's normal images, 2 rounds
of FedDis; then one box's ``/v1/anomaly`` serves the federated model (its own appearance branch, its own
threshold) on a pneumonia X-ray: a score, the site threshold's verdict and a decodable map PNG."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from jobproc import spawn_fedscan, wait_logged
from mqtt_broker import Broker
from PIL import Image

from coordinator.keys import ensure_signing_key, trust_path
from coordinator.model_repo import ModelRepository
from coordinator.store import open_store
from fedscan.broker import free_port, stop_processes
from learning.anomaly.model import ShareRule, local_names, shared_names
from learning.anomaly.site_state import load_site_state
from learning.models import build_model
from protocol.jobs import Job

pytestmark = pytest.mark.integration

TOKEN = "anomaly-token-0123456789abcdef"


def _profile(path: Path) -> Path:
    path.write_text("""schema_version: 1
name: xray-anomaly-tiny
modality: DX
job: anomaly
model: {architecture: feddis_ae, norm: group, width: 4, classes: [normal, anomalous]}
input: {channels: 1, height: 28, width: 28, formats: [png, jpeg, dicom]}
""")
    return path




def test_anomaly_job_two_boxes_two_rounds_over_mosquitto(tmp_path: Path, broker: Broker, pneumonia_npz: Path) -> None:
    coord = tmp_path / "coordinator"
    coord.mkdir()
    ensure_signing_key(coord)
    profile = _profile(tmp_path / "xray.yaml")
    with np.load(pneumonia_npz) as z:
        labels = z["train_labels"].reshape(-1)
        pneumonia = z["test_images"][z["test_labels"].reshape(-1) == 1][0]
    sites = {"cxr-1": np.arange(0, 120), "cxr-2": np.arange(120, 240)}  # positions into the train split
    store = open_store(f"sqlite:///{coord / 'state.db'}")
    for name, picks in sites.items():
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "picks.npy", picks)
        store.enroll_agent(name, str(profile), ["anomaly"])
    http_port = free_port()
    logs = [coord / "coordinator.log", *(tmp_path / n / "agent.log" for n in sites)]
    procs = [spawn_fedscan(["coordinator", "--state", str(coord), "--broker", f"127.0.0.1:{broker.port}", "--profile",
                     str(profile), "--job", "anomaly", "--job-option", "steps=3", "--job-option", "batch_size=8",
                     "--rounds", "2", "--min-clients", "2", "--seed", "0", "--threads", "1", "--no-export",
                     "--deadline", "900"], logs[0])]
    for name in sites:
        extra = ["--http-port", str(http_port)] if name == "cxr-1" else []
        procs.append(spawn_fedscan(["agent", "--id", name, "--broker", f"127.0.0.1:{broker.port}", "--profile", str(profile),
                             "--state", str(tmp_path / name / "state"), "--data", str(pneumonia_npz), "--indices",
                             str(tmp_path / name / "picks.npy"), "--threads", "1", "--no-resource-gates",
                             "--no-telemetry", "--trust", str(trust_path(coord)), *extra],
                            tmp_path / name / "agent.log", FEDSCAN_API_TOKENS=f"ward:{TOKEN}"))
    try:
        def complete(r: int) -> bool:
            rec = store.get_round(r)
            return rec is not None and rec.status == "complete"

        wait_logged(lambda: complete(2), 150, "round 2 of the anomaly job", logs)
        wait_logged(lambda: store.get_agent("cxr-1").reported_version == "v2", 120, "cxr-1 to serve v2", logs)  # type: ignore[union-attr]
        repo = ModelRepository(coord / "models")
        manifests = [repo.manifest(v) for v in ("v0", "v1", "v2")]
        assert [m.job for m in manifests] == [Job.ANOMALY] * 3 and manifests[0].architecture.name == "feddis_ae"
        assert sorted(manifests[2].participants) == sorted(sites)

        # FedDis: the coordinator averaged the shape branch and never moved (or saw) an appearance branch ...
        v0, v2 = repo.tensors("v0"), repo.tensors("v2")
        model = build_model("feddis_ae", **manifests[0].architecture.kwargs)
        local, shape = local_names(model, ShareRule.FEDDIS), shared_names(model, ShareRule.FEDDIS)
        assert local and all(np.array_equal(v0[k], v2[k]) for k in local)
        assert any(not np.array_equal(v0[k], v2[k]) for k in shape)
        for name, picks in sites.items():  # ... while each box keeps and trains its own, with its own thresholds
            state = load_site_state(tmp_path / name / "state" / "job-anomaly" / "site_state.npz")
            assert sorted(state.local) == sorted(local) and any(not np.array_equal(state.local[k], v0[k]) for k in local)
            assert state.thresholds is not None and state.thresholds.n_normal >= 1
            assert state.thresholds.n_normal < int((labels[picks] == 0).sum())  # held out, not trained on

        buf = io.BytesIO()
        Image.fromarray(pneumonia).save(buf, format="PNG")
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/anomaly", content=buf.getvalue(), timeout=60,
                       headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        body = r.json()
        amap = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["map_png"]))))
        assert body["model_version"] == "v2" and amap.shape == (body["height"], body["width"]) == (28, 28)
        assert body["anomalous"] is (body["score"] > body["threshold"]) and body["threshold"] > 0
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/diagnose", content=buf.getvalue(), timeout=60,
                       headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"})
        assert (r.status_code, r.json()["detail"]["reason"]) == (409, "job_mismatch")
    finally:
        stop_processes(procs)
        store.close()

"""Integration (issue 17): ``fedscan coordinator --job anomaly`` and two agents as processes over a real
mosquitto, at tiny size — two chest X-ray boxes, each with its share of PneumoniaMNIST's normal images, 2 rounds
of FedDis; then one box's ``/v1/anomaly`` serves the federated model (its own appearance branch, its own
threshold) on a pneumonia X-ray: a score, the site threshold's verdict and a decodable map PNG. The same
with two brain FLAIR boxes (subjects split between them; lesion-free slices are "normal" by automatic masks)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

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
from learning.brain_mri import list_subjects, load_slices
from learning.data_path import data_dir
from learning.models import build_model
from protocol.jobs import Job

pytestmark = pytest.mark.integration

TOKEN = "anomaly-token-0123456789abcdef"
FLAIR = data_dir() / "brain-mri-flair"


XRAY_PROFILE = """schema_version: 1
name: xray-anomaly-tiny
modality: DX
job: anomaly
model: {architecture: feddis_ae, norm: group, width: 4, classes: [normal, anomalous]}
input: {channels: 1, height: 28, width: 28, formats: [png, jpeg, dicom]}
"""
FLAIR_PROFILE = """schema_version: 1
name: flair-anomaly-tiny
modality: MR
job: anomaly
model: {architecture: feddis_ae, norm: group, width: 4, classes: [normal, anomalous]}
input: {channels: 1, height: 16, width: 16, formats: [png, dicom]}
"""


def _federation(tmp_path: Path, broker: Broker, profile_text: str, data: Path, sites: dict[str, np.ndarray],
                options: list[str]) -> tuple[Path, Path, Any, int, list[Path], list[Any]]:
    """Coordinator (``--job anomaly``, 2 rounds) and one agent per site as processes; the first serves HTTP."""
    coord = tmp_path / "coordinator"
    coord.mkdir()
    ensure_signing_key(coord)
    profile = tmp_path / "profile.yaml"
    profile.write_text(profile_text)
    store = open_store(f"sqlite:///{coord / 'state.db'}")
    for name, picks in sites.items():
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "picks.npy", picks)
        store.enroll_agent(name, str(profile), ["anomaly"])
    http_port = free_port()
    logs = [coord / "coordinator.log", *(tmp_path / n / "agent.log" for n in sites)]
    job_options = [a for o in ["steps=3", "batch_size=8", *options] for a in ("--job-option", o)]
    procs = [spawn_fedscan(["coordinator", "--state", str(coord), "--broker", f"127.0.0.1:{broker.port}", "--profile",
                            str(profile), "--job", "anomaly", *job_options, "--rounds", "2", "--min-clients", "2",
                            "--seed", "0", "--threads", "1", "--no-export", "--deadline", "900"], logs[0])]
    for i, name in enumerate(sites):
        extra = ["--http-port", str(http_port)] if i == 0 else []
        procs.append(spawn_fedscan(["agent", "--id", name, "--broker", f"127.0.0.1:{broker.port}", "--profile",
                                    str(profile), "--state", str(tmp_path / name / "state"), "--data", str(data),
                                    "--indices", str(tmp_path / name / "picks.npy"), "--threads", "1",
                                    "--no-resource-gates", "--no-telemetry", "--trust", str(trust_path(coord)), *extra],
                                   tmp_path / name / "agent.log", FEDSCAN_API_TOKENS=f"ward:{TOKEN}"))
    return coord, profile, store, http_port, logs, procs


def _wait_served(store: Any, first: str, logs: list[Path]) -> None:
    def complete(r: int) -> bool:
        rec = store.get_round(r)
        return rec is not None and rec.status == "complete"

    wait_logged(lambda: complete(2), 150, "round 2 of the anomaly job", logs)
    wait_logged(lambda: store.get_agent(first).reported_version == "v2", 120, f"{first} to serve v2", logs)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _ask(http_port: int, body: bytes) -> dict[str, Any]:
    r = httpx.post(f"http://127.0.0.1:{http_port}/v1/anomaly", content=body, timeout=60,
                   headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    assert out["model_version"] == "v2" and out["anomalous"] is (out["score"] > out["threshold"])
    amap = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["map_png"]))))
    assert amap.shape == (out["height"], out["width"])
    return out


def test_anomaly_job_two_boxes_two_rounds_over_mosquitto(tmp_path: Path, broker: Broker, pneumonia_npz: Path) -> None:
    with np.load(pneumonia_npz) as z:
        labels = z["train_labels"].reshape(-1)
        pneumonia = z["test_images"][z["test_labels"].reshape(-1) == 1][0]
    sites = {"cxr-1": np.arange(0, 120), "cxr-2": np.arange(120, 240)}  # positions into the train split
    coord, _, store, http_port, logs, procs = _federation(tmp_path, broker, XRAY_PROFILE, pneumonia_npz, sites, [])
    try:
        _wait_served(store, "cxr-1", logs)
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

        body = _ask(http_port, _png(pneumonia))
        assert (body["height"], body["width"]) == (28, 28) and body["threshold"] > 0
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/diagnose", content=_png(pneumonia), timeout=60,
                       headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"})
        assert (r.status_code, r.json()["detail"]["reason"]) == (409, "job_mismatch")
    finally:
        stop_processes(procs)
        store.close()


@pytest.mark.skipif(not FLAIR.is_dir(), reason=f"{FLAIR} not present (shared data)")
def test_flair_anomaly_job_two_mri_boxes_over_mosquitto(tmp_path: Path, broker: Broker) -> None:
    """Brain FLAIR boxes (two subjects each, the last held out for the threshold) learn normal from
    lesion-free slices; the served answer on a lesion slice says the masks were automatic."""
    sites = {"mri-1": np.array([0, 1]), "mri-2": np.array([2, 3])}  # subjects by position in the sorted list
    _, _, store, http_port, logs, procs = _federation(
        tmp_path, broker, FLAIR_PROFILE, FLAIR, sites, ["sign=positive", "foreground=0.05", "top_fraction=0.01"])
    try:
        _wait_served(store, "mri-1", logs)
        for name in sites:
            state = load_site_state(tmp_path / name / "state" / "job-anomaly" / "site_state.npz")
            assert state.thresholds is not None and state.thresholds.n_normal >= 1
        test_subject = list_subjects(FLAIR)[-1]  # no box trained on it
        slices = load_slices(FLAIR, [test_subject], size=16)
        lesion = slices.images[slices.has_lesion][0]
        image = np.clip(lesion / max(float(lesion.max()), 1e-6) * 65535, 0, 65535).astype(np.uint16)  # 16-bit grey
        body = _ask(http_port, _png(image))
        assert (body["height"], body["width"]) == (16, 16)
        assert "DLWMLS" in body["note"] and "not drawn by hand" in body["note"]
    finally:
        stop_processes(procs)
        store.close()

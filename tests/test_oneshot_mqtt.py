"""Integration (issue 17): ``fedscan coordinator --job oneshot`` and two agents as processes over a real
mosquitto, at tiny size — each agent trains once and uploads once, the coordinator synthesizes images from
their BatchNorm statistics and distills their ensemble, publishes the global model, and a box serves it
through ``/v1/diagnose`` as a classifier."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from fedproc import stratified_parts, wait_for
from jobproc import spawn_fedscan
from mqtt_broker import Broker
from PIL import Image

from coordinator.keys import ensure_signing_key, trust_path
from coordinator.model_repo import ModelRepository
from coordinator.store import open_store
from fedscan.broker import free_port, stop_processes
from learning.datasets import load_medmnist
from protocol.jobs import Job

pytestmark = pytest.mark.integration
TOKEN = "oneshot-token-0123456789abcdef"
PROFILE = "xray-cxr-28-oneshot"


def test_oneshot_job_one_upload_per_site_over_mosquitto(tmp_path: Path, broker: Broker, pneumonia_npz: Path) -> None:
    coord = tmp_path / "coordinator"
    coord.mkdir()
    ensure_signing_key(coord)
    train = load_medmnist(pneumonia_npz, "train")
    sites = ["site-1", "site-2"]
    store = open_store(f"sqlite:///{coord / 'state.db'}")
    for name, idx in zip(sites, stratified_parts(train.labels, [200, 200], 0), strict=True):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "indices.npy", idx)
        store.enroll_agent(name, PROFILE, ["oneshot"])
    port = free_port()
    logs = [coord / "coordinator.log", *(tmp_path / n / "agent.log" for n in sites)]
    procs = [spawn_fedscan(["coordinator", "--state", str(coord), "--broker", f"127.0.0.1:{broker.port}", "--profile",
                     PROFILE, "--job", "oneshot", "--job-option", "epochs=1", "--job-option", "iterations=4",
                     "--job-option", "batch_size=8", "--job-option", "replay_steps=2", "--rounds", "1",
                     "--min-clients", "2", "--local-epochs", "1", "--lr", "0.02", "--val-data", str(pneumonia_npz),
                     "--seed", "0", "--threads", "1", "--no-export", "--select-metric", "latest",
                     "--deadline", "900"], logs[0])]
    for name in sites:
        extra = ["--http-port", str(port)] if name == "site-1" else []
        procs.append(spawn_fedscan(["agent", "--id", name, "--broker", f"127.0.0.1:{broker.port}", "--profile", PROFILE,
                             "--state", str(tmp_path / name / "state"), "--data", str(pneumonia_npz), "--indices",
                             str(tmp_path / name / "indices.npy"), "--threads", "1", "--no-resource-gates",
                             "--trust", str(trust_path(coord)), *extra],
                            tmp_path / name / "agent.log", FEDSCAN_API_TOKENS=f"ward:{TOKEN}"))
    try:
        def complete() -> bool:
            rec = store.get_round(1)
            return rec is not None and rec.status == "complete"

        wait_for(complete, 600, "the one-shot round")
        wait_for(lambda: (a := store.get_agent("site-1")) is not None and a.reported_version == "v1", 300,
                 "site-1 to serve v1")
        repo = ModelRepository(coord / "models")
        v0, v1 = repo.manifest("v0"), repo.manifest("v1")
        assert v0.job == v1.job == Job.ONESHOT  # signed into each manifest
        assert sorted(v1.participants) == sites  # one upload from each site
        assert v1.architecture.kwargs["norm"] == "batch"
        t0, t1 = repo.tensors("v0"), repo.tensors("v1")
        assert any(not np.array_equal(t0[k], t1[k]) for k in t0)

        img = Image.fromarray(load_medmnist(pneumonia_npz, "test").images[0])
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/diagnose", content=buf.getvalue(), timeout=60,
                       headers={"Content-Type": "image/png", "Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == "v1" and body["label"] in ("normal", "pneumonia")
        assert abs(sum(body["probabilities"].values()) - 1.0) < 1e-4
    except AssertionError as e:
        tails = "\n".join(f"===== {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
        raise AssertionError(f"{e}\n{tails}") from e
    finally:
        stop_processes(procs)
        store.close()

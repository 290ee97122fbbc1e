"""A site with no data of its own receives the global model and diagnoses from day one,
over the agent process's real HTTP API."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import httpx
import pytest
from fedproc import Federation, wait_for
from mqtt_broker import Broker, free_port
from PIL import Image

from learning.datasets import load_medmnist
from tools import forkserver

pytestmark = pytest.mark.integration
TOKEN = "clinic-token-0123456789abcdef"


def test_site_without_data_diagnoses_with_the_global_model(tmp_path: Path, broker: Broker,
                                                            pneumonia_npz: Path) -> None:
    train = load_medmnist(pneumonia_npz, "train")
    fed = Federation(tmp_path, broker.port, pneumonia_npz, sizes=[400], rounds=1)
    store = fed.prepare(train.labels)
    store.enroll_agent("clinic", "xray-cxr-28", ["no-data"])
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", FEDSCAN_API_TOKENS=f"clinician:{TOKEN}")
    log = tmp_path / "clinic.log"
    with open(log, "wb") as fh:
        clinic = subprocess.Popen(
            [*forkserver.command(), "agent", "--id", "clinic", "--broker", f"127.0.0.1:{broker.port}",
             "--state", str(tmp_path / "clinic"), "--http-port", str(port), "--threads", "1", "--no-resource-gates",
             "--trust", str(fed.trust)],
            stdout=fh, stderr=subprocess.STDOUT, env=env)
    fed.extra_coordinator_args = []
    fed.start_all()
    try:
        wait_for(lambda: (a := store.get_agent("clinic")) is not None and a.reported_version == "v1", 240,
                 "the data-less site to serve v1", fed)
        img = Image.fromarray(load_medmnist(pneumonia_npz, "test").images[0])
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        r = httpx.post(f"{url}/v1/diagnose", content=buf.getvalue(), timeout=30,
                       headers={"Content-Type": "image/png", "Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == "v1"
        # the coordinator exported verified ONNX artifacts; the box fetched them and serves with ONNX Runtime
        from coordinator.model_repo import ModelRepository

        kinds = {a.kind: a for a in ModelRepository(fed.state / "models").manifest("v1").artifacts}
        assert {"onnx-fp32", "onnx-int8"} <= set(kinds)
        assert kinds["onnx-fp32"].verification["top1_agreement"] == 1.0
        assert body["engine"].startswith("ort-cpu"), body["engine"]
        assert body["label"] in ("normal", "pneumonia")
        assert abs(sum(body["probabilities"].values()) - 1.0) < 1e-4
        unauth = httpx.post(f"{url}/v1/diagnose", content=buf.getvalue(), timeout=30,
                            headers={"Content-Type": "image/png"})
        assert unauth.status_code == 401
    finally:
        clinic.terminate()
        clinic.wait(20)
        fed.stop()
        store.close()
    assert "Traceback" not in log.read_text(errors="replace")

"""Process level: an agent training a round over mosquitto gets real diagnosis requests over HTTP;
its training pauses within 2 s of the first request, resumes after the load stops, and the update
it uploads is bit-identical to an uninterrupted run with the same seed."""

from __future__ import annotations

import io
import os
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from fedproc import Federation, wait_for
from mqtt_broker import free_port, mosquitto
from PIL import Image

from coordinator.store import BlobStore
from learning.datasets import load_medmnist
from protocol.frame import read_header
from tools import forkserver

pytestmark = pytest.mark.integration
TOKEN = "clinic-token-0123456789abcdef"
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*training (paused|resumed)")


def _run(tmp: Path, npz: Path, labels: object, *, load: bool) -> tuple[str, list[tuple[float, str]], float | None]:
    tmp.mkdir(parents=True, exist_ok=True)
    with mosquitto(tmp) as broker:
        fed = Federation(tmp / "fed", broker.port, npz, sizes=[1600], rounds=1, local_epochs=2)
        store = fed.prepare(labels)  # type: ignore[arg-type]
        fed.start_coordinator()
        port = free_port()
        log = tmp / "agent.log"
        env = dict(os.environ, OMP_NUM_THREADS="1", FEDSCAN_API_TOKENS=f"clinician:{TOKEN}")
        with open(log, "wb") as fh:
            agent = subprocess.Popen(
                [*forkserver.command(), "agent", "--id", "site-1", "--broker", f"127.0.0.1:{broker.port}",
                 "--state", str(tmp / "state"), "--data", str(npz), "--indices",
                 str(tmp / "fed" / "site-1" / "indices.npy"), "--http-port", str(port), "--threads", "1",
                 "--no-resource-gates", "--trust", str(fed.trust)], stdout=fh, stderr=subprocess.STDOUT, env=env)
        first_request: float | None = None
        try:
            if load:
                # the agent activates v0, then trains round 1 (2 epochs x 50 batches of 32, several seconds)
                wait_for(lambda: "serving model v0" in log.read_text(errors="replace"), 120, "the agent to serve")
                time.sleep(1.0)
                png = io.BytesIO()
                Image.fromarray(load_medmnist(npz, "test").images[0]).save(png, format="PNG")
                first_request = time.time()
                for _ in range(20):
                    r = httpx.post(f"http://127.0.0.1:{port}/v1/diagnose", content=png.getvalue(), timeout=30,
                                   headers={"Content-Type": "image/png", "Authorization": f"Bearer {TOKEN}"})
                    assert r.status_code == 200, r.text
                    time.sleep(0.1)
            wait_for(lambda: (r := store.get_round(1)) is not None and r.status == "complete", 300, "round 1", fed)
            update = store.list_updates(1)[0]
            payload_sha = read_header(BlobStore(fed.state / "blobs").get(update.blob_sha256))[0].payload_sha256
        finally:
            agent.terminate()
            agent.wait(20)
            fed.stop()
            store.close()
    events = []
    for line in log.read_text(errors="replace").splitlines():
        m = STAMP.match(line)
        if m:
            events.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), m.group(2)))
    return payload_sha, events, first_request


def test_training_pauses_for_diagnosis_and_the_update_is_bit_identical(tmp_path: Path, pneumonia_npz: Path) -> None:
    labels = load_medmnist(pneumonia_npz, "train").labels
    quiet_sha, quiet_events, _ = _run(tmp_path / "quiet", pneumonia_npz, labels, load=False)
    assert not [e for e in quiet_events if e[1] == "paused"], "an unloaded run must not pause"
    loaded_sha, events, first = _run(tmp_path / "loaded", pneumonia_npz, labels, load=True)
    assert first is not None
    paused = [t for t, kind in events if kind == "paused" and t >= first - 0.5]
    resumed = [t for t, kind in events if kind == "resumed" and paused and t > paused[0]]
    assert paused, f"training never paused: {events}"
    assert paused[0] - first <= 2.0, f"paused {paused[0] - first:.2f}s after the first request"
    assert resumed, "training never resumed after the load stopped"
    assert loaded_sha == quiet_sha, "the interrupted run's update differs from the uninterrupted one"

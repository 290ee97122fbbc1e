"""Everything an agent process logged, audited and published during a training round and a DICOM
diagnosis is free of the study's patient identifiers."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pydicom
import pytest
from fedproc import Federation, wait_for
from mqtt_broker import Broker, free_port
from pydicom.data import get_testdata_file

from learning.datasets import load_medmnist
from tools import forkserver

pytestmark = pytest.mark.integration
TOKEN = "clinic-token-0123456789abcdef"
IDENTIFIERS = ["QZX^MARKERPATIENT", "PID-7731-QZX", "1.2.826.0.1.3680043.8.498.77310001", "ACC-QZX-4411"]


def test_agent_logs_audit_and_mqtt_hold_no_patient_identifiers(tmp_path: Path, broker: Broker,
                                                               pneumonia_npz: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Modality = "DX"
    ds.PatientName, ds.PatientID = IDENTIFIERS[0], IDENTIFIERS[1]
    ds.StudyInstanceUID, ds.AccessionNumber = IDENTIFIERS[2], IDENTIFIERS[3]
    dicom_path = tmp_path / "study.dcm"
    ds.save_as(dicom_path)
    assert all(i.encode() in dicom_path.read_bytes() for i in IDENTIFIERS)  # the input really carries them

    seen: list[bytes] = []
    lock = threading.Lock()

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        with lock:
            seen.append(msg.topic.encode() + b" " + bytes(msg.payload))

    sniffer = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="auditor")
    sniffer.on_message = on_message
    sniffer.on_connect = lambda c, u, f, rc, p: c.subscribe("#", 1)
    sniffer.connect("127.0.0.1", broker.port)
    sniffer.loop_start()

    train = load_medmnist(pneumonia_npz, "train")
    fed = Federation(tmp_path / "fed", broker.port, pneumonia_npz, sizes=[300], rounds=1)
    store = fed.prepare(train.labels)
    fed.start_coordinator()
    port = free_port()
    state = tmp_path / "fed" / "site-1" / "state"
    env = dict(os.environ, OMP_NUM_THREADS="1", FEDSCAN_API_TOKENS=f"clinician:{TOKEN}")
    log = tmp_path / "agent.log"
    with open(log, "wb") as fh:
        agent = subprocess.Popen(
            [*forkserver.command(), "agent", "--id", "site-1", "--broker", f"127.0.0.1:{broker.port}",
             "--state", str(state), "--data", str(pneumonia_npz), "--indices",
             str(tmp_path / "fed" / "site-1" / "indices.npy"), "--http-port", str(port), "--threads", "1",
             "--no-resource-gates", "--verbose", "--trust", str(fed.trust)], stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: (r := store.get_round(1)) is not None and r.status == "complete", 240, "round 1", fed)
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200, 60,
                 "the agent to serve")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/diagnose", content=dicom_path.read_bytes(), timeout=30,
                       headers={"Content-Type": "application/dicom", "Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text
        assert not any(i in r.text for i in IDENTIFIERS)
    finally:
        agent.terminate()
        agent.wait(20)
        fed.stop()
        store.close()
        sniffer.loop_stop()
        sniffer.disconnect()
    with lock:
        published = b"\n".join(seen)
    assert b"updates/1" in published and b"telemetry" in published, "the sniffer must have seen the round"
    haystacks = {"agent log": log.read_bytes(), "mqtt": published,
                 "audit": (state / "audit.jsonl").read_bytes()}
    assert len(haystacks["audit"]) > 0
    for where, data in haystacks.items():
        for ident in IDENTIFIERS:
            assert ident.encode() not in data, f"{ident} found in {where}"

"""Integration (issue 18): ``fedscan coordinator --job segment`` and two agents as processes over a real
mosquitto, at tiny size — a dermatoscope site (PH2, ε budget 8) and an MRI site (brain FLAIR slices; masks
from an automatic model, DLWMLS; ε budget 4), 2 rounds of FedBN with adaptive DP clipping, then the
dermatoscope's ``/v1/segment`` serves the federated model on a PH2 image."""

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
from learning.data_path import data_dir
from learning.models import build_model
from learning.segmentation.sharing import ShareRule, local_names
from protocol.jobs import Job

pytestmark = pytest.mark.integration

PH2_ROOT, MRI_ROOT = data_dir() / "ph2", data_dir() / "brain-mri-flair"
TOKEN = "seg-token-0123456789abcdef"
SIZE = 16


def _profile(path: Path, name: str, modality: str, budget: float) -> Path:
    path.write_text(f"""schema_version: 1
name: {name}
modality: {modality}
job: segment
model: {{architecture: seg_unet, norm: instance, width: 4, classes: [background, lesion]}}
input: {{channels: 1, height: {SIZE}, width: {SIZE}, formats: [png, jpeg, dicom]}}
privacy: {{dp_sgd: true, max_grad_norm: 1.0, target_delta: 1.0e-5, epsilon_budget: {budget}}}
""")
    return path




@pytest.mark.skipif(not (PH2_ROOT.is_dir() and MRI_ROOT.is_dir()), reason="shared PH2 / brain FLAIR data not present")
def test_segment_job_two_modalities_two_rounds_over_mosquitto(tmp_path: Path, broker: Broker) -> None:
    coord = tmp_path / "coordinator"
    coord.mkdir()
    ensure_signing_key(coord)
    derm = _profile(tmp_path / "derm.yaml", "seg-derm-tiny", "XC", 8.0)
    mri = _profile(tmp_path / "mri.yaml", "seg-mri-tiny", "MR", 4.0)
    sites = {"derm-1": (derm, PH2_ROOT, np.arange(6)), "mri-1": (mri, MRI_ROOT, np.array([0]))}
    store = open_store(f"sqlite:///{coord / 'state.db'}")
    for name, (profile, _, picks) in sites.items():
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "picks.npy", picks)
        store.enroll_agent(name, str(profile), ["segment"])
    http_port = free_port()
    logs = [coord / "coordinator.log", *(tmp_path / n / "agent.log" for n in sites)]
    procs = [spawn_fedscan(["coordinator", "--state", str(coord), "--broker", f"127.0.0.1:{broker.port}", "--profile",
                     str(derm), "--job", "segment", "--job-option", "steps=2", "--job-option", "batch_size=4",
                     "--job-option", "share=fedbn", "--rounds", "2", "--min-clients", "2", "--seed", "0",
                     "--threads", "1", "--no-export", "--deadline", "900"], logs[0])]
    for name, (profile, root, _) in sites.items():
        extra = ["--http-port", str(http_port)] if name == "derm-1" else []
        procs.append(spawn_fedscan(["agent", "--id", name, "--broker", f"127.0.0.1:{broker.port}", "--profile", str(profile),
                             "--state", str(tmp_path / name / "state"), "--data", str(root), "--indices",
                             str(tmp_path / name / "picks.npy"), "--threads", "1", "--no-resource-gates",
                             "--no-telemetry", "--trust", str(trust_path(coord)), *extra],
                            tmp_path / name / "agent.log", FEDSCAN_API_TOKENS=f"ward:{TOKEN}"))
    try:
        def complete(r: int) -> bool:
            rec = store.get_round(r)
            return rec is not None and rec.status == "complete"

        wait_logged(lambda: complete(2), 600, "round 2 of the segment job", logs)
        wait_logged(lambda: store.get_agent("derm-1").reported_version == "v2", 300, "derm-1 to serve v2", logs)  # type: ignore[union-attr]
        rounds = [store.get_round(r) for r in (1, 2)]
        repo = ModelRepository(coord / "models")
        manifests = [repo.manifest(v) for v in ("v0", "v1", "v2")]
        assert [m.job for m in manifests] == [Job.SEGMENT] * 3  # every model says what it is (and it is signed)
        assert sorted(manifests[2].participants) == sorted(sites)

        # FedBN: the coordinator never moved the sites' normalization layers; everything else it aggregated
        v0, v2 = repo.tensors("v0"), repo.tensors("v2")
        norms = local_names(build_model("seg_unet", **manifests[0].architecture.kwargs), ShareRule.FEDBN)
        assert norms and all(np.array_equal(v0[k], v2[k]) for k in norms)
        assert sum(not np.array_equal(v0[k], v2[k]) for k in v0) == len(v0) - len(norms)
        for name in sites:  # ... while each site keeps and trains its own
            job_dir = tmp_path / name / "state" / "job-segment"
            with np.load(job_dir / "local_tensors.npz") as local:
                assert sorted(local.files) == sorted(norms)
                assert any(not np.array_equal(local[k], v0[k]) for k in norms)
            assert (job_dir / "privacy_budget.json").exists()

        # each site's own ε, reported by its accountant with every update, within its own budget, growing
        eps = [{a: p["epsilon"] for a, p in r.detail["client_privacy"].items()} for r in rounds]  # type: ignore[union-attr]
        assert set(eps[0]) == set(eps[1]) == set(sites)
        assert 0 < eps[0]["derm-1"] < eps[1]["derm-1"] <= 8.0 and 0 < eps[0]["mri-1"] < eps[1]["mri-1"] <= 4.0
        budgets = {a: p["budget_epsilon"] for a, p in rounds[1].detail["client_privacy"].items()}  # type: ignore[union-attr]
        assert budgets == {"derm-1": 8.0, "mri-1": 4.0}

        # the dermatoscope serves the federated model (with its own norm layers) on a PH2 image
        png = (PH2_ROOT / "images" / "IMD002.png").read_bytes()
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/segment", content=png, timeout=60,
                       params={"spacing_row_mm": 0.03, "spacing_col_mm": 0.03},
                       headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        body = r.json()
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
        assert body["model_version"] == "v2" and mask.shape == (body["height"], body["width"]) == (572, 765)
        assert body["area_mm2"] == pytest.approx(body["area_px"] * 0.03 * 0.03)
    finally:
        stop_processes(procs)
        store.close()

"""``POST /v1/segment`` (issue 18, serving): a real PH2 image through the agent's HTTP API → mask PNG at the
image's size, lesion area in pixels and mm², model version, timings; in the OpenAPI schema; refusals with
reasons, audited."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from test_api_helpers import TOKEN, serve_http

from edge_agent.api import ApiSettings, create_app
from edge_agent.api.segment_routes import segment_router
from edge_agent.audit import AuditLog
from edge_agent.serving import ServedModel
from edge_agent.serving.segment import SegmentServer, modality_of_profile
from edge_agent.store import LocalStore
from firmware.profile import find_profile
from learning.data_path import data_dir
from learning.segmentation.data import MRI, PH2, load_ph2_pair, ph2_ids
from protocol.jobs import Job
from protocol.manifest import Architecture, InputSpec, Manifest

PH2_ROOT = data_dir() / "ph2"
needs_ph2 = pytest.mark.skipif(not PH2_ROOT.is_dir(), reason=f"{PH2_ROOT} not present (shared data)")
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class _DarkIsLesion(torch.nn.Module):
    """A stand-in mask model: 'lesion' where the input is darker than its mean (pigmented lesions are)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lesion = (x.mean(dim=1, keepdim=True) < x.mean()).float() * 8 - 4
        return torch.cat([-lesion, lesion], dim=1)


def _manifest(version: str, job: Job = Job.SEGMENT) -> Manifest:
    return Manifest(version=version, architecture=Architecture(name="seg_unet"), classes=["background", "lesion"],
                    input=InputSpec(channels=1, height=32, width=32), tensors=[], tensor_hash="0" * 64, job=job)


def _app(tmp_path: Path, server: SegmentServer):  # type: ignore[no-untyped-def]
    profile = find_profile("seg-dermoscopy-64")
    audit = AuditLog(tmp_path / "audit.jsonl")
    app = create_app(ApiSettings(tokens={"ward": TOKEN}), ServedModel(), LocalStore(tmp_path / "store"), audit,
                     accept=profile.input, extra_routers=[segment_router(server, profile.input)], job=profile.job)
    return app, audit


@needs_ph2
def test_ph2_image_through_the_api_gives_mask_area_version_and_timings(tmp_path: Path) -> None:
    server = SegmentServer(lambda m, t: _DarkIsLesion(), modality=modality_of_profile("XC"))
    assert server.modality == PH2 and modality_of_profile("MR") == MRI
    assert not server.activate(_manifest("v3", Job.CLASSIFY), {}), "a classifier is not a mask model"
    assert server.activate(_manifest("v4"), {})
    app, audit = _app(tmp_path, server)
    image_id = ph2_ids(PH2_ROOT)[0]
    _, truth = load_ph2_pair(PH2_ROOT, image_id)
    png = (PH2_ROOT / "images" / f"{image_id}.png").read_bytes()  # the file as the dermatoscope sends it
    with serve_http(app) as url, httpx.Client(timeout=60) as c:
        r = c.post(f"{url}/v1/segment", params={"spacing_row_mm": 0.05, "spacing_col_mm": 0.04},
                   files={"file": (f"{image_id}.png", png, "image/png")}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
        assert mask.shape == truth.shape == (body["height"], body["width"])  # the input's own pixels
        assert set(np.unique(mask)) <= {0, 255} and body["area_px"] == int((mask == 255).sum()) > 0
        assert body["area_mm2"] == pytest.approx(body["area_px"] * 0.05 * 0.04)
        assert body["spacing_mm"] == [0.05, 0.04] and body["model_version"] == "v4"
        assert body["modality"] == PH2 and "clinicians" in body["note"]
        assert body["lesion_fraction"] == pytest.approx(body["area_px"] / mask.size)
        assert set(body["timings"]) == {"decode_ms", "preprocess_ms", "inference_ms", "postprocess_ms", "total_ms"}
        assert body["timings"]["total_ms"] >= body["timings"]["inference_ms"] >= 0
        overlap = ((mask == 255) & (truth == 1)).sum() / truth.sum()
        assert overlap > 0.7, "the mask is not where the clinicians' lesion is: preprocessing or resizing is off"

        r = c.post(f"{url}/v1/segment", content=png, headers={**AUTH, "Content-Type": "image/png"})  # raw body
        assert r.status_code == 200 and r.json()["area_mm2"] is None and r.json()["spacing_mm"] is None

        # refusals, each with its reason
        r = c.post(f"{url}/v1/segment", content=b"not an image", headers={**AUTH, "Content-Type": "image/png"})
        assert (r.status_code, r.json()["detail"]["reason"]) == (400, "corrupt_image")
        r = c.post(f"{url}/v1/segment", params={"spacing_row_mm": 0.05}, content=png,
                   headers={**AUTH, "Content-Type": "image/png"})
        assert (r.status_code, r.json()["detail"]["reason"]) == (422, "invalid_request")
        r = c.post(f"{url}/v1/segment", content=png, headers={"Content-Type": "image/png"})
        assert r.status_code == 401
        # a segmentation box has no classifier: /v1/diagnose says where to go instead
        r = c.post(f"{url}/v1/diagnose", content=png, headers={**AUTH, "Content-Type": "image/png"})
        assert (r.status_code, r.json()["detail"]["reason"]) == (409, "job_mismatch")
        assert "/v1/segment" in r.json()["detail"]["message"]

        schema = c.get(f"{url}/openapi.json").json()
        op = schema["paths"]["/v1/segment"]["post"]
        assert "SegmentOut" in str(op["responses"]["200"]) and "multipart/form-data" in op["requestBody"]["content"]
        assert {p["name"] for p in op["parameters"]} >= {"spacing_row_mm", "spacing_col_mm"}
    events = [(r["event"], r["reason"]) for r in audit.records()]
    assert events == [("segmentation", None), ("segmentation", None), ("rejected", "corrupt_image"),
                      ("rejected", "invalid_request"), ("rejected", "job_mismatch")]
    audit.close()


def test_segment_before_any_mask_model_is_not_ready(tmp_path: Path) -> None:
    server = SegmentServer(lambda m, t: _DarkIsLesion(), modality=PH2)
    app, audit = _app(tmp_path, server)
    img = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(img, format="PNG")
    with serve_http(app) as url, httpx.Client(timeout=60) as c:
        r = c.post(f"{url}/v1/segment", content=img.getvalue(), headers={**AUTH, "Content-Type": "image/png"})
        assert (r.status_code, r.json()["detail"]["reason"]) == (503, "not_ready")
    assert [(r["event"], r["reason"]) for r in audit.records()] == [("rejected", "not_ready")]
    audit.close()


def test_mri_dicom_slice_takes_its_pixel_spacing_from_the_file(tmp_path: Path) -> None:
    """An MR box segments a DICOM slice; the area in mm² uses the file's own PixelSpacing, and the answer
    says the model learnt from automatic (DLWMLS) masks."""
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("MR_small.dcm")
    assert path is not None
    spacing = tuple(float(v) for v in pydicom.dcmread(path).PixelSpacing)
    server = SegmentServer(lambda m, t: _DarkIsLesion(), modality=modality_of_profile("MR"))
    server.activate(_manifest("v9"), {})
    profile = find_profile("seg-flair-64")
    audit = AuditLog(tmp_path / "audit.jsonl")
    app = create_app(ApiSettings(tokens={"ward": TOKEN}), ServedModel(), LocalStore(tmp_path / "store"), audit,
                     accept=profile.input, extra_routers=[segment_router(server, profile.input)], job=profile.job)
    with serve_http(app) as url, httpx.Client(timeout=60) as c:
        r = c.post(f"{url}/v1/segment", content=Path(path).read_bytes(),
                   headers={**AUTH, "Content-Type": "application/dicom"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["modality"] == MRI and "DLWMLS" in body["note"] and body["model_version"] == "v9"
    assert tuple(body["spacing_mm"]) == spacing and (body["height"], body["width"]) == (64, 64)
    assert body["area_px"] > 0 and body["area_mm2"] == pytest.approx(body["area_px"] * spacing[0] * spacing[1])
    audit.close()

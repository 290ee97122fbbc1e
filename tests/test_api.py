"""The inference API over real HTTP (uvicorn on a loopback port), with a real small torch model."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import torch
from test_api_helpers import (
    ACCEPT,
    CLASSES,
    PROFILE,
    Box,
    TorchTestEngine,
    dicom_file,
    install,
    jpeg_bytes,
    make_model,
    png_bytes,
    running_box,
)

from learning.calibration import softmax
from learning.dicom import image_from_array
from learning.transforms import build_pipeline


@pytest.fixture
def images(pneumonia_npz: Path) -> np.ndarray:
    return np.load(pneumonia_npz)["test_images"][:64]


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    with running_box(tmp_path) as b:
        yield b


def dcm(name: str) -> bytes:
    return Path(dicom_file(name)).read_bytes()


def post_image(c: httpx.Client, box: Box, data: bytes, ctype: str, multipart: bool = False) -> httpx.Response:
    if multipart:
        return c.post(f"{box.url}/v1/diagnose", files={"file": ("x", data, ctype)}, headers=box.auth)
    return c.post(f"{box.url}/v1/diagnose", content=data, headers={**box.auth, "Content-Type": ctype})


def expected_probs(seed: int, arr: np.ndarray, temperature: float = 1.7) -> np.ndarray:
    x = build_pipeline(PROFILE.preprocessing)(image_from_array(arr))
    with torch.no_grad():
        logits = make_model(seed).eval()(torch.from_numpy(x[None])).numpy()
    return softmax(logits, temperature)[0]


def test_health_ready_openapi_and_model(box: Box) -> None:
    with httpx.Client() as c:
        assert c.get(f"{box.url}/healthz").json() == {"status": "ok"}
        assert c.get(f"{box.url}/readyz").json() == {"ready": True, "model_version": "v1"}
        spec = c.get(f"{box.url}/openapi.json").json()
        body = spec["paths"]["/v1/diagnose"]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "image/png", "image/jpeg", "application/dicom"} <= set(body)
        assert {"/v1/studies/{study_id}/finding", "/v1/model", "/readyz", "/healthz"} <= set(spec["paths"])
        m = c.get(f"{box.url}/v1/model", headers=box.auth).json()
        assert m["version"] == "v1" and m["classes"] == list(CLASSES) and m["temperature"] == 1.7
        assert m["input"] == {"channels": 1, "height": 28, "width": 28} and m["engine"] == "torch-test"


def test_diagnose_png_multipart_jpeg_raw_and_dicom(box: Box, images: np.ndarray) -> None:
    arr = images[0]
    with httpx.Client() as c:
        r = post_image(c, box, png_bytes(arr), "image/png", multipart=True)
        assert r.status_code == 200, r.text
        d = r.json()
        want = expected_probs(1, arr)  # same pixels as training, softmax(logits / T)
        got = np.array([d["probabilities"][k] for k in CLASSES])
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert d["label"] == CLASSES[int(np.argmax(want))]
        assert d["confidence"] == pytest.approx(float(want.max()), abs=1e-5)
        assert d["reliability_percent"] == round(100 * d["confidence"], 1)
        assert d["calibrated"] is True and d["model_version"] == "v1" and d["engine"] == "torch-test"
        assert set(d["timings"]) >= {"decode_ms", "preprocess_ms", "queue_ms", "infer_ms", "total_ms"}
        assert len(d["study_id"]) == 32
        r = post_image(c, box, jpeg_bytes(arr), "image/jpeg")
        assert r.status_code == 200 and r.json()["study_id"] != d["study_id"]
        for name in ("CT_small.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_rle.dcm"):
            r = post_image(c, box, dcm(name), "application/dicom", multipart=name.startswith("CT"))
            assert r.status_code == 200, (name, r.text)
        # octet-stream multipart (curl's default for .dcm) is sniffed
        r = post_image(c, box, dcm("MR_small.dcm"), "application/octet-stream", multipart=True)
        assert r.status_code == 200, r.text
        study = c.get(f"{box.url}/v1/studies/{r.json()['study_id']}", headers=box.auth).json()
        assert study["modality"] == "MR" and study["label"] == r.json()["label"] and study["finding"] is None


def _rgba() -> bytes:
    a = np.zeros((28, 28, 4), dtype=np.uint8)
    a[..., 3] = 100
    return png_bytes(a, mode="RGBA")


BAD = {
    "wrong-content-type": (b"GIF89a....", "image/gif", 415, "unsupported_content_type"),
    "corrupt-png": (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png", 400, "corrupt_image"),
    "truncated-dicom": (dcm("MR_truncated.dcm"), "application/dicom", 422, "truncated_dicom"),
    "no-pixel-data": (dcm("rtplan.dcm"), "application/dicom", 422, "no_pixel_data"),
    "no-decoder": (dcm("MR_small_jpeg_ls_lossless.dcm"), "application/dicom", 415, "unsupported_transfer_syntax"),
    "over-byte-limit": (b"\0" * (ACCEPT.max_bytes + 1), "image/png", 413, "too_large"),
    "too-many-channels": (_rgba(), "image/png", 422, "wrong_channels"),
    "modality": (dcm("rtdose.dcm"), "application/dicom", 422, "modality_not_accepted"),
}


def test_every_bad_input_refused_with_a_reason_and_serving_goes_on(box: Box, images: np.ndarray) -> None:
    good = png_bytes(images[1])
    with httpx.Client(timeout=30) as c:
        for name, (data, ctype, status, reason) in BAD.items():
            for multipart in (False, True):
                r = post_image(c, box, data, ctype, multipart=multipart)
                assert r.status_code == status, (name, multipart, r.text)
                assert r.json()["detail"]["reason"] == reason, (name, r.text)
                ok = post_image(c, box, good, "image/png")
                assert ok.status_code == 200, (name, ok.text)
    refused = [rec for rec in box.audit.records() if rec["event"] == "rejected"]
    assert {rec["reason"] for rec in refused} >= {v[3] for v in BAD.values()}
    assert all(rec["caller"] == "clinician" and int(str(rec["status_code"])) >= 400 for rec in refused)


def test_wrong_channel_count_for_the_model(tmp_path: Path, images: np.ndarray) -> None:
    """A model whose preprocessing keeps colour gets an RGB picture where it takes one channel."""
    with running_box(tmp_path) as box:
        steps = [s for s in PROFILE.preprocessing if s.op != "to_grayscale"]
        m = box.served.current()
        box.served.swap(version="v-rgb", engine=m.engine, classes=CLASSES, input=m.input, preprocessing=steps)
        rgb = np.stack([images[0]] * 3, axis=-1)
        with httpx.Client() as c:
            r = post_image(c, box, png_bytes(rgb), "image/png")
            assert (r.status_code, r.json()["detail"]["reason"]) == (422, "wrong_channels")
            assert post_image(c, box, png_bytes(images[0]), "image/png").status_code == 200


def test_token_required_except_health(box: Box, images: np.ndarray) -> None:
    data = png_bytes(images[0])
    with httpx.Client() as c:
        r = c.post(f"{box.url}/v1/diagnose", content=data, headers={"Content-Type": "image/png"})
        assert r.status_code == 401 and r.json()["detail"]["reason"] == "missing_token"
        assert r.headers["WWW-Authenticate"] == "Bearer"
        r = c.post(f"{box.url}/v1/diagnose", content=data,
                   headers={"Content-Type": "image/png", "Authorization": "Bearer not-the-token-000000"})
        assert r.status_code == 401 and r.json()["detail"]["reason"] == "invalid_token"
        assert c.get(f"{box.url}/v1/model").status_code == 401
        assert c.get(f"{box.url}/v1/studies").status_code == 401
        assert c.get(f"{box.url}/healthz").status_code == 200
        assert post_image(c, box, data, "image/png").status_code == 200


def test_not_ready_until_a_model_is_loaded(tmp_path: Path, images: np.ndarray) -> None:
    """A new box with no model answers 503 not_ready; once the installer swaps one in it serves."""
    with running_box(tmp_path, model=False) as box, httpx.Client() as c:
        r = c.get(f"{box.url}/readyz")
        assert r.status_code == 503 and r.json()["detail"]["reason"] == "not_ready"
        r = post_image(c, box, png_bytes(images[0]), "image/png")
        assert r.status_code == 503 and r.json()["detail"]["reason"] == "not_ready" and "Retry-After" in r.headers
        install(box.served, "global-3", seed=3)  # no local data: the global model serves at once
        assert c.get(f"{box.url}/readyz").status_code == 200
        r = post_image(c, box, png_bytes(images[0]), "image/png")
        assert r.status_code == 200 and r.json()["model_version"] == "global-3"
        assert box.store.training_examples().x.shape[0] == 0


def test_finding_makes_a_training_example(box: Box, images: np.ndarray) -> None:
    with httpx.Client() as c:
        ids = [post_image(c, box, png_bytes(images[i]), "image/png").json()["study_id"] for i in range(3)]
        r = c.post(f"{box.url}/v1/studies/{ids[1]}/finding", json={"label": "pneumonia"}, headers=box.auth)
        assert r.status_code == 200 and r.json()["finding"] == "pneumonia"
        r = c.post(f"{box.url}/v1/studies/{ids[2]}/finding", json={"label": "tumour"}, headers=box.auth)
        assert (r.status_code, r.json()["detail"]["reason"]) == (422, "unknown_label")
        r = c.post(f"{box.url}/v1/studies/{'0' * 32}/finding", json={"label": "normal"}, headers=box.auth)
        assert (r.status_code, r.json()["detail"]["reason"]) == (404, "unknown_study")
        assert c.get(f"{box.url}/v1/studies/{ids[1]}", headers=box.auth).json()["finding"] == "pneumonia"
    ex = box.store.training_examples(classes=CLASSES, shape=(1, 28, 28))
    assert ex.study_ids == [ids[1]] and ex.y is not None and ex.y.tolist() == [1]
    want = build_pipeline(PROFILE.preprocessing)(image_from_array(images[1]))
    np.testing.assert_array_equal(ex.x[0], want)  # the trainer learns from what the model saw
    findings = [r for r in box.audit.records() if r["event"] == "finding"]
    assert findings and findings[0]["caller"] == "clinician" and findings[0]["study_id"] == ids[1]


def test_audit_and_store_hold_no_patient_identifiers(box: Box) -> None:
    raw = dcm("CT_small.dcm")
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    secrets_ = [str(ds.PatientName), str(ds.PatientID), str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)]
    with httpx.Client() as c:
        d = post_image(c, box, raw, "application/dicom").json()
    rec = [r for r in box.audit.records() if r["event"] == "diagnosis"][-1]
    assert rec["study_id"] == d["study_id"] and rec["caller"] == "clinician" and rec["model_version"] == "v1"
    assert rec["engine"] == "torch-test" and rec["label"] == d["label"] and str(rec["time"]).endswith("+00:00")
    assert set(rec) == {"event", "caller", "study_id", "model_version", "engine", "label", "confidence",
                        "probabilities", "source", "reason", "status_code", "request_id", "time"}
    files = [p for p in box.root.rglob("*") if p.is_file()]
    for p in files:
        blob = p.read_bytes()
        for s in secrets_:
            assert s.encode() not in blob, (p.name, "holds an identifier")
    stored = pydicom.dcmread(box.store.study_dir(d["study_id"]) / "source.dcm")
    assert not stored.get("PatientName") and "PatientID" not in stored and stored.PatientIdentityRemoved == "YES"
    np.testing.assert_array_equal(stored.pixel_array, ds.pixel_array)  # pixels kept for re-learning


def test_overloaded_queue_answers_503_with_retry_after(tmp_path: Path, images: np.ndarray) -> None:
    with running_box(tmp_path, max_batch=1, max_wait_ms=0, queue_size=1) as box:
        install(box.served, "slow", seed=1, delay_s=0.25)
        data = png_bytes(images[0])
        with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=12)) as c, ThreadPoolExecutor(12) as pool:
            rs = list(pool.map(lambda _: post_image(c, box, data, "image/png"), range(12)))
            codes = sorted(r.status_code for r in rs)
            assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
            busy = [r for r in rs if r.status_code == 503]
            assert all(r.json()["detail"]["reason"] == "overloaded" and r.headers["Retry-After"] == "1" for r in busy)
            assert post_image(c, box, data, "image/png").status_code == 200  # and it serves on


def test_timeout_answers_504_and_the_batcher_survives(tmp_path: Path, images: np.ndarray) -> None:
    outcomes: list[str] = []
    with running_box(tmp_path, max_batch=1, max_wait_ms=0) as box, httpx.Client(timeout=30) as c:
        box.service.on_result.append(lambda s, o: outcomes.append(o))
        install(box.served, "slow", seed=1, delay_s=0.4)
        box.service.timeout_s = 0.1
        data = png_bytes(images[0])
        r = post_image(c, box, data, "image/png")
        assert (r.status_code, r.json()["detail"]["reason"]) == (504, "inference_timeout")
        box.service.timeout_s = 30
        install(box.served, "fast", seed=1)
        r = post_image(c, box, data, "image/png")  # the abandoned job did not kill the worker
        assert r.status_code == 200 and r.json()["model_version"] == "fast"
        assert post_image(c, box, b"junk", "image/png").status_code == 400
    assert outcomes == ["error", "ok", "rejected"]


def test_model_swap_under_load_drops_no_request(tmp_path: Path, images: np.ndarray) -> None:
    with running_box(tmp_path, max_batch=8, max_wait_ms=2) as box:
        first = box.served.current().engine
        assert isinstance(first, TorchTestEngine)
        engines = {"v1": first, "v2": install(box.served, "v2", seed=2)}
        want = {v: {i: expected_probs(s, images[i]) for i in range(8)} for v, s in (("v1", 1), ("v2", 2))}
        bodies = [png_bytes(images[i]) for i in range(8)]
        stop = threading.Event()
        results: list[tuple[int, int, dict[str, object]]] = []

        def client(k: int) -> None:
            with httpx.Client(timeout=30) as c:
                n = 0
                while not stop.is_set() or n < 10:
                    i = (k + n) % 8
                    r = post_image(c, box, bodies[i], "image/png")
                    results.append((i, r.status_code, r.json()))
                    n += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for n in range(30):
            v = "v1" if n % 2 else "v2"
            box.served.swap(version=v, engine=engines[v], classes=CLASSES, input=box.served.current().input,
                            temperature=1.7, preprocessing=PROFILE.preprocessing)
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(60)
        assert len(results) >= 60
        assert all(code == 200 for _, code, _ in results), [b for _, c, b in results if c != 200][:3]
        served = {body["model_version"] for _, _, body in results}
        assert served == {"v1", "v2"}
        for i, _, body in results:  # each answer names the model that really computed it
            v = str(body["model_version"])
            got = np.array([body["probabilities"][k] for k in CLASSES])  # type: ignore[index]
            np.testing.assert_allclose(got, want[v][i], atol=1e-5)
        assert max(max(e.batch_sizes) for e in engines.values()) > 1  # micro-batching happened


def test_on_inference_request_callbacks(box: Box, images: np.ndarray) -> None:
    calls: list[float] = []
    def broken() -> None:
        raise RuntimeError("a broken callback never fails a diagnosis")

    box.hooks.append(lambda: calls.append(time.monotonic()))  # type: ignore[func-returns-value]
    box.hooks.append(broken)
    with httpx.Client() as c:
        for i in range(3):
            assert post_image(c, box, png_bytes(images[i]), "image/png").status_code == 200
        assert post_image(c, box, b"junk", "image/png").status_code == 400
    assert len(calls) == 4


def test_end_to_end_latency_over_http(box: Box, images: np.ndarray) -> None:
    """Median of 50 sequential PNG diagnoses over loopback HTTP (28x28 model, CPU)."""
    bodies = [png_bytes(images[i % len(images)]) for i in range(60)]
    lat = []
    with httpx.Client() as c:
        for i, b in enumerate(bodies):
            t0 = time.perf_counter()
            r = post_image(c, box, b, "image/png")
            if i >= 10:  # warm-up excluded
                lat.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200
    med = statistics.median(lat)
    print(f"\nend-to-end diagnose latency over HTTP: median {med:.1f} ms, p90 "
          f"{sorted(lat)[int(0.9 * len(lat))]:.1f} ms (n={len(lat)})")
    (box.root / "latency.json").write_text(json.dumps({"median_ms": med, "n": len(lat)}))
    assert med < 500


def test_create_app_builds_and_owns_its_batcher(tmp_path: Path, images: np.ndarray) -> None:
    from test_api_helpers import TOKEN, serve_http

    from edge_agent.api import ApiSettings, create_app
    from edge_agent.audit import AuditLog
    from edge_agent.serving import ServedModel
    from edge_agent.store import LocalStore

    served = ServedModel()
    install(served, "v1", seed=1)
    store, audit = LocalStore(tmp_path / "s"), AuditLog(tmp_path / "a.jsonl")
    pauses: list[int] = []
    app = create_app(ApiSettings(tokens={"ward": TOKEN}), served, store, audit, accept=ACCEPT,
                     serving=PROFILE.serving, on_inference_request=[lambda: pauses.append(1)])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with serve_http(app) as url, httpx.Client(timeout=30) as c:
        r = c.post(f"{url}/v1/diagnose", content=png_bytes(images[0]), headers={**auth, "Content-Type": "image/png"})
        assert r.status_code == 200 and r.json()["model_version"] == "v1"
        r = c.post(f"{url}/v1/diagnose", files={"other": ("x", b"1", "text/plain")}, headers=auth)
        assert (r.status_code, r.json()["detail"]["reason"]) == (422, "missing_file")
        assert app.state.service.batcher.running and app.state.service.batcher.max_batch == 8
    assert pauses == [1] and not app.state.service.batcher.running
    assert [(r["event"], r["caller"], r["reason"]) for r in audit.records()] == [
        ("diagnosis", "ward", None), ("rejected", "ward", "missing_file")]
    store.close()
    audit.close()

"""The local store (retention, de-identification, training examples) and the API settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from test_api_helpers import dicom_file

from edge_agent.api import ApiSettings
from edge_agent.store import LocalStore, StudyNotFound


def x(v: float) -> np.ndarray:
    return np.full((1, 28, 28), v, dtype=np.float32)


def test_retention_by_age_and_size(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, max_age_s=100.0, max_bytes=None)
    old = store.ingest(source="http", content_type="image/png", model_input=x(0), now=1000.0)
    new = store.ingest(source="http", content_type="image/png", model_input=x(1), now=1090.0)
    assert store.enforce_retention(now=1150.0) == 1  # `old` is 150 s old
    with pytest.raises(StudyNotFound):
        store.get(old)
    assert not store.study_dir(old).exists() and store.get(new).study_id == new
    store.close()

    size_store = LocalStore(tmp_path / "c", max_age_s=None, max_bytes=10_000)
    ids = [size_store.ingest(source="http", content_type="image/png", model_input=x(i), now=float(i))
           for i in range(5)]  # ~3.3 kB each: only the newest three fit
    kept = [r.study_id for r in size_store.list()]
    assert kept == ids[::-1][:3] and size_store.total_bytes() <= 10_000
    size_store.close()


def test_training_examples_only_confirmed_and_matching(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    a = store.ingest(source="http", content_type="image/png", model_input=x(0.25))
    b = store.ingest(source="dicom", content_type="application/dicom", model_input=x(0.5))
    store.ingest(source="http", content_type="image/png", model_input=x(0.75))
    other = store.ingest(source="http", content_type="image/png", model_input=np.zeros((3, 64, 64), np.float32))
    store.record_finding(a, "normal", by="dr")
    store.record_finding(b, "pneumonia", by="dr")
    store.record_finding(other, "pneumonia", by="dr")
    ex = store.training_examples(classes=["normal", "pneumonia"], shape=(1, 28, 28))
    assert ex.study_ids == [a, b] and ex.y is not None and ex.y.tolist() == [0, 1]
    assert ex.x.shape == (2, 1, 28, 28) and ex.x.dtype == np.float32 and ex.x[1, 0, 0, 0] == 0.5
    assert store.training_examples(classes=["other", "x"]).x.shape[0] == 0
    with pytest.raises(StudyNotFound):
        store.record_finding("f" * 32, "normal", by="dr")
    store.close()


def test_study_ids_are_random_not_derived(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    ids = {store.ingest(source="http", content_type="image/png", model_input=x(0)) for _ in range(20)}
    assert len(ids) == 20 and all(len(i) == 32 for i in ids)
    store.close()


def test_settings_refuse_insecure_defaults() -> None:
    with pytest.raises(ValidationError, match="no API tokens"):
        ApiSettings()
    with pytest.raises(ValidationError, match="shorter than 16"):
        ApiSettings(tokens={"a": "short"})
    assert ApiSettings(environment="development").tokens == {}
    s = ApiSettings.from_env({"FEDSCAN_API_TOKENS": "ward:0123456789abcdef0,ct:fedcba98765432100"})
    assert set(s.tokens) == {"ward", "ct"} and "0123456789abcdef0" not in repr(s)
    with pytest.raises(ValueError, match="name:token"):
        ApiSettings.from_env({"FEDSCAN_API_TOKENS": "justatoken"})


def test_swap_manifest_takes_calibration_and_falls_back_to_profile_steps() -> None:
    from test_api_helpers import CLASSES, INPUT_SPEC, PROFILE, TorchTestEngine, make_model

    from edge_agent.serving import ServedModel, ServingError
    from learning.calibration import softmax
    from learning.dicom import image_from_array
    from protocol.manifest import Architecture, Calibration, Manifest

    served = ServedModel()
    with pytest.raises(ServingError) as not_ready:
        served.current()
    assert not_ready.value.reason == "not_ready"
    seen: list[str] = []
    served.add_listener(lambda m: seen.append(m.version))
    m = Manifest(version="g7", architecture=Architecture(name="small_cnn"), classes=list(CLASSES), input=INPUT_SPEC,
                 tensors=[], tensor_hash="0" * 64, calibration=Calibration(temperature=2.5))
    engine = TorchTestEngine(make_model(7))
    assert served.swap_manifest(m, engine, default_preprocessing=PROFILE.preprocessing) is None
    cur = served.current()
    assert (cur.version, cur.temperature, cur.calibrated, seen) == ("g7", 2.5, True, ["g7"])
    x = cur.preprocess(image_from_array(np.zeros((40, 30), np.uint8)))
    assert x.shape == (1, 28, 28)
    p = softmax(engine.predict(x[None]), 2.5)
    assert p.shape == (1, 2) and abs(float(p.sum()) - 1) < 1e-9
    prev = served.swap(version="g8", engine=engine, classes=CLASSES, input=INPUT_SPEC)
    assert prev is cur and served.current().calibrated is False and served.current().temperature == 1.0


def test_only_small_pngs_are_decoded_on_the_event_loop(tmp_path: Path) -> None:
    from test_api_helpers import ACCEPT, png_bytes

    from edge_agent.audit import AuditLog
    from edge_agent.serving import DiagnosisService, MicroBatcher, ServedModel

    svc = DiagnosisService(ServedModel(), MicroBatcher(), LocalStore(tmp_path), AuditLog(tmp_path / "a"), ACCEPT)
    assert svc._inline_ok(png_bytes(np.zeros((224, 224), np.uint8)))
    assert not svc._inline_ok(b"")
    big = png_bytes(np.zeros((600, 600), np.uint8))  # tiny file, 360 k pixels: a thread decodes it
    assert len(big) < svc.inline_bytes and not svc._inline_ok(big)
    assert not svc._inline_ok(dicom_file("CT_small.dcm").read_bytes())
    svc.store.close()

"""Failures the box answers without leaking and without losing track (issue 15 items 12, 14, 10):
every answer carries a request id that names the log and audit lines; internal details stay in the
log; every refusal is audited whatever its cause; no partial study is left behind; decoding is
bounded (a busy box answers 503 with Retry-After)."""

from __future__ import annotations

import errno
import logging
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from test_api_helpers import Box, png_bytes, running_box

from edge_agent.serving import diagnosis

SECRET = "/srv/models/v1/engine.plan at 0xdeadbeef"


def _post(box: Box, data: bytes, ctype: str = "image/png") -> httpx.Response:
    return httpx.post(f"{box.url}/v1/diagnose", content=data, timeout=30, headers={**box.auth, "Content-Type": ctype})


def _image() -> bytes:
    return png_bytes((np.arange(28 * 28) % 251).astype(np.uint8).reshape(28, 28))


def _studies(box: Box) -> list[Path]:
    return list((box.root / "store" / "studies").iterdir())


def test_an_engine_failure_is_answered_with_a_request_id_and_no_internal_detail(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with running_box(tmp_path) as box:
        engine = box.served.current().engine

        def broken(batch: np.ndarray) -> np.ndarray:
            raise RuntimeError(SECRET)

        engine.predict = broken  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR):
            r = _post(box, _image())
        assert r.status_code == 500
        rid = r.headers["X-Request-ID"]
        assert len(rid) == 32 and r.json()["detail"] == {
            "reason": "inference_failed", "message": "inference failed; the box's log has the details", "request_id": rid}
        assert SECRET not in r.text and "RuntimeError" not in r.text
        assert any(rid in rec.getMessage() and SECRET in rec.getMessage() for rec in caplog.records)
        audit = [a for a in box.audit.records() if a["event"] == "rejected"]
        assert audit[-1]["request_id"] == rid and audit[-1]["reason"] == "inference_failed"
        ok = httpx.get(f"{box.url}/healthz", timeout=10)
        assert len(ok.headers["X-Request-ID"]) == 32 and ok.headers["X-Request-ID"] != rid
        missing = httpx.get(f"{box.url}/v1/studies/{'0' * 32}", headers=box.auth, timeout=10)
        assert missing.status_code == 404 and missing.json()["detail"]["request_id"] == missing.headers["X-Request-ID"]


def test_a_full_disk_is_audited_answered_and_leaves_no_partial_study(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with running_box(tmp_path) as box:
        real_save = np.save

        def full_disk(file: Any, arr: Any, *a: Any, **k: Any) -> None:
            real_save(file, arr, *a, **k)  # the first file lands, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(np, "save", full_disk)
        r = _post(box, _image())
        assert r.status_code == 500 and r.json()["detail"]["reason"] == "internal_error"
        assert "space" not in r.text
        assert _studies(box) == [] and box.store.list() == []
        last = list(box.audit.records())[-1]
        assert (last["event"], last["reason"], last["status_code"], last["request_id"]) == (
            "rejected", "internal_error", 500, r.headers["X-Request-ID"])
        monkeypatch.setattr(np, "save", real_save)
        # the store itself fails after the study was written: the study is removed again
        monkeypatch.setattr(box.store, "record_diagnosis", lambda *a, **k: (_ for _ in ()).throw(OSError("db")))
        assert _post(box, _image()).status_code == 500
        assert _studies(box) == [] and box.store.list() == []
        assert [a["reason"] for a in box.audit.records() if a["event"] == "rejected"] == ["internal_error"] * 2


def test_an_unexpected_decoder_error_refuses_the_image_and_is_audited(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def choke(*a: Any, **k: Any) -> Any:
        raise KeyError("plugin state")

    monkeypatch.setattr(diagnosis, "decode", choke)
    with running_box(tmp_path) as box:
        r = _post(box, png_bytes(np.zeros((600, 600), np.uint8)))  # decoded off the event loop
        assert r.status_code == 400 and r.json()["detail"]["reason"] == "corrupt_image"
        last = list(box.audit.records())[-1]
        assert last["reason"] == "corrupt_image" and last["request_id"] == r.headers["X-Request-ID"]
        assert _studies(box) == []


def test_decoding_is_bounded_and_a_busy_box_answers_503_with_retry_after(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real = diagnosis.decode

    def slow(*a: Any, **k: Any) -> Any:
        release.wait(10)
        return real(*a, **k)

    monkeypatch.setattr(diagnosis, "decode", slow)
    with running_box(tmp_path) as box:
        box.service._decoding = threading.BoundedSemaphore(2)
        box.service.decode_wait_s = 0.2
        data = png_bytes(np.zeros((600, 600), np.uint8))
        with httpx.Client(timeout=30) as c:
            busy: list[httpx.Response] = []
            slots = [threading.Thread(target=lambda: busy.append(c.post(
                f"{box.url}/v1/diagnose", content=data, headers={**box.auth, "Content-Type": "image/png"})))
                for _ in range(2)]
            for t in slots:
                t.start()
            while box.service._decoding._value > 0:  # both slots taken
                threading.Event().wait(0.01)
            refused = c.post(f"{box.url}/v1/diagnose", content=data, headers={**box.auth, "Content-Type": "image/png"})
            release.set()
            for t in slots:
                t.join(30)
        assert refused.status_code == 503 and refused.json()["detail"]["reason"] == "overloaded"
        assert refused.headers["Retry-After"] == "1"
        assert sorted(r.status_code for r in busy) == [200, 200]

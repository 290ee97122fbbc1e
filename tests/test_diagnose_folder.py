"""``fedscan diagnose-folder`` (issue 16 item 4): a folder through ``POST /v1/diagnose`` into a CSV.

Against a real box (uvicorn on loopback, a small real model, production token rules): every
image gets a row with label, positive-class probability, reliability %, model version and
milliseconds; a truncated PNG and a file that is no image get a 4xx row with the reason and
the batch goes on; the refusals are in the box's audit log; a wrong token, an unknown
``--positive`` class and an empty folder exit 2 with the reason.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedscan.cli import app
from tests.test_api_helpers import TOKEN, dicom_file, jpeg_bytes, png_bytes, running_box


def make_folder(root: Path) -> Path:
    folder = root / "clinic-batch"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        (folder / f"img{i}.png").write_bytes(png_bytes(rng.integers(0, 255, (40, 40), dtype=np.uint8)))
    (folder / "sub" / "colour.jpg").write_bytes(jpeg_bytes(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)))
    shutil.copy(dicom_file("CT_small.dcm"), folder / "sub" / "ct.dcm")
    good = png_bytes(rng.integers(0, 255, (40, 40), dtype=np.uint8))
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "not-an-image.jpg").write_bytes(b"hello, this is text")
    (folder / "notes.txt").write_text("not an image: skipped by suffix")
    return folder


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        return {r["image"]: r for r in csv.DictReader(fh)}


def test_every_image_gets_a_row_and_corrupt_ones_a_reason(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    out = tmp_path / "out" / "diagnoses.csv"
    with running_box(tmp_path / "box") as box:
        res = CliRunner().invoke(app, ["diagnose-folder", str(folder), "--url", box.url, "--out", str(out),
                                       "--token", TOKEN])
        audit = [json.loads(line) for line in (tmp_path / "box" / "audit.jsonl").read_text().splitlines()]
    assert res.exit_code == 0, res.output
    assert "5 diagnosed, 2 refused, 0 failed" in res.output
    rows = read_rows(out)
    assert sorted(rows) == sorted(["img0.png", "img1.png", "img2.png", "sub/colour.jpg", "sub/ct.dcm",
                                   "truncated.png", "not-an-image.jpg"])
    header = next(csv.reader(out.open()))
    assert header[:4] == ["image", "status", "label", "probability_pneumonia"]
    for name in ("img0.png", "sub/colour.jpg", "sub/ct.dcm"):
        r = rows[name]
        assert r["status"] == "200" and r["label"] in ("normal", "pneumonia") and r["model_version"] == "v1"
        p, rel = float(r["probability_pneumonia"]), float(r["reliability_percent"])
        assert 0.0 <= p <= 1.0 and 50.0 <= rel <= 100.0
        assert abs(rel - 100 * max(p, 1 - p)) < 0.11  # two classes: reliability is the larger probability
        assert float(r["service_ms"]) > 0 and float(r["round_trip_ms"]) >= float(r["service_ms"]) - 1
    for name in ("truncated.png", "not-an-image.jpg"):
        r = rows[name]
        assert r["status"].startswith("4") and r["reason"] and not r["label"], r
    refused = [a for a in audit if a.get("event") == "rejected"]
    assert len(refused) >= 2 and all(a.get("reason") for a in refused)


def test_refusals_exit_2_with_the_reason(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    with running_box(tmp_path / "box") as box:
        wrong = runner.invoke(app, ["diagnose-folder", str(folder), "--url", box.url, "--token", "nope-" + "x" * 20,
                                    "--out", str(tmp_path / "a.csv")])
        unknown = runner.invoke(app, ["diagnose-folder", str(folder), "--url", box.url, "--token", TOKEN,
                                      "--positive", "melanoma", "--out", str(tmp_path / "b.csv")])
        empty = runner.invoke(app, ["diagnose-folder", str(tmp_path / "empty"), "--url", box.url, "--token", TOKEN])
    assert wrong.exit_code == 2 and "401" in wrong.output
    assert unknown.exit_code == 2 and "melanoma" in unknown.output
    assert empty.exit_code == 2 and "no PNG, JPEG or DICOM" in empty.output


def test_unreachable_box_exits_2(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    res = CliRunner().invoke(app, ["diagnose-folder", str(folder), "--url", "http://127.0.0.1:9", "--token", TOKEN,
                                   "--timeout", "2"])
    assert res.exit_code == 2 and "cannot reach the box" in res.output


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1].parent / "shared/data/ph2/images").is_dir(),
                    reason="PH2 not in ../shared/data")
def test_real_dermoscopy_images_are_answered(tmp_path: Path) -> None:
    """Two real PH2 images (576x767 RGB PNG) through the box: decoded, resized, answered."""
    src = Path(__file__).resolve().parents[1].parent / "shared/data/ph2/images"
    folder = tmp_path / "ph2"
    folder.mkdir()
    for p in sorted(src.glob("*.png"))[:2]:
        (folder / p.name).symlink_to(p)
    out = tmp_path / "ph2.csv"
    with running_box(tmp_path / "box") as box:
        res = CliRunner().invoke(app, ["diagnose-folder", str(folder), "--url", box.url, "--out", str(out),
                                       "--token", TOKEN])
    assert res.exit_code == 0, res.output
    assert [r["status"] for r in read_rows(out).values()] == ["200", "200"]

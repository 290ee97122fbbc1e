"""Folder loaders: JSON-metadata labels (ISIC layout), CSV labels, DICOM folders, missing/malformed labels."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from learning.data_path import find_data_file
from learning.datasets import DatasetError
from learning.folders import load_dicom_folder, load_image_folder, metadata_records
from learning.records import dotted_get

FIELD = "meta.clinical.benign_malignant"


def isic_like(root: Path, labels: list[str | None], size: int = 40) -> None:
    """Images ISIC_000000i.jpg with ISIC-shaped JSON beside them (label None: the field is null)."""
    rng = np.random.default_rng(0)
    for i, label in enumerate(labels):
        name = f"ISIC_{i:07d}"
        Image.fromarray(rng.integers(0, 256, (size, size + 10, 3), dtype=np.uint8)).save(root / f"{name}.jpg")
        meta = {"meta": {"clinical": {"benign_malignant": label, "diagnosis": None},
                         "acquisition": {"pixelsX": 1000 + i % 2, "pixelsY": 700}}, "name": name}
        (root / f"{name}.json").write_text(json.dumps(meta))


def test_json_metadata_labels_and_ids(tmp_path: Path) -> None:
    isic_like(tmp_path, ["benign", "malignant", "benign"])
    ds = load_image_folder(tmp_path, label_field=FIELD, size=(16, 16), channels=3)
    assert ds.images.shape == (3, 16, 16, 3) and ds.images.dtype == np.uint8
    assert ds.classes == ["benign", "malignant"]
    np.testing.assert_array_equal(ds.labels, [0, 1, 0])
    assert ds.ids == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    sub = ds.subset([2, 0])
    assert sub.ids == ["ISIC_0000002", "ISIC_0000000"]
    recs = metadata_records(tmp_path, sub.ids)
    assert [dotted_get(r, "meta.acquisition.pixelsX") for r in recs] == [1000, 1000]
    # classes fix the order (the profile's)
    fixed = load_image_folder(tmp_path, label_field=FIELD, size=(8, 8), classes=["malignant", "benign"])
    np.testing.assert_array_equal(fixed.labels, [1, 0, 1])


def test_missing_label_refused_naming_file_and_field(tmp_path: Path) -> None:
    isic_like(tmp_path, ["benign", None, "malignant"])
    with pytest.raises(DatasetError, match=r"ISIC_0000001\.jpg \(.*ISIC_0000001\.json, field 'meta\.clinical"):
        load_image_folder(tmp_path, label_field=FIELD, size=(8, 8))
    (tmp_path / "ISIC_0000002.json").unlink()
    with pytest.raises(DatasetError, match=r"2 image\(s\) without a label.*ISIC_0000002\.json \(no such file\)"):
        load_image_folder(tmp_path, label_field=FIELD, size=(8, 8))


def test_missing_label_skipped_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    isic_like(tmp_path, ["benign", None, "malignant"])
    with caplog.at_level(logging.WARNING, logger="learning.folders"):
        ds = load_image_folder(tmp_path, label_field=FIELD, size=(8, 8), on_missing="skip")
    assert ds.ids == ["ISIC_0000000", "ISIC_0000002"]
    assert "leaving out 1 of 3" in caplog.text and "ISIC_0000001.jpg" in caplog.text
    with pytest.raises(ValueError, match="on_missing"):
        load_image_folder(tmp_path, label_field=FIELD, size=(8, 8), on_missing="ignore")  # type: ignore[arg-type]


def test_malformed_labels_always_refused(tmp_path: Path) -> None:
    isic_like(tmp_path, ["benign", "malignant"])
    meta = json.loads((tmp_path / "ISIC_0000001.json").read_text())
    meta["meta"]["clinical"]["benign_malignant"] = {"value": "malignant"}
    (tmp_path / "ISIC_0000001.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"ISIC_0000001\.json, field .*: malformed label"):
        load_image_folder(tmp_path, label_field=FIELD, size=(8, 8), on_missing="skip")
    (tmp_path / "ISIC_0000001.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"ISIC_0000001\.json: unreadable JSON"):
        load_image_folder(tmp_path, label_field=FIELD, size=(8, 8))
    (tmp_path / "ISIC_0000001.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="must be an object"):
        load_image_folder(tmp_path, label_field=FIELD, size=(8, 8))
    with pytest.raises(DatasetError, match="exactly one of"):
        load_image_folder(tmp_path, size=(8, 8))
    with pytest.raises(DatasetError, match="not a folder"):
        load_image_folder(tmp_path / "absent", label_field=FIELD)


def test_corrupt_image_in_metadata_folder_names_the_file(tmp_path: Path) -> None:
    isic_like(tmp_path, ["benign", "malignant"])
    (tmp_path / "ISIC_0000001.jpg").write_bytes((tmp_path / "ISIC_0000001.jpg").read_bytes()[:200])
    with pytest.raises(DatasetError, match=r"ISIC_0000001\.jpg: corrupt_image"):
        load_image_folder(tmp_path, label_field=FIELD, size=(8, 8), channels=3)


def test_csv_image_column_and_empty_label(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(3):
        Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("image,label\n0.png,a\n1.png,\n2.png,b\n")
    with pytest.raises(DatasetError, match=r"1\.png \(labels\.csv line 3, column 'label'\)"):
        load_image_folder(tmp_path, csv, size=(8, 8))
    with caplog.at_level(logging.WARNING, logger="learning.folders"):
        ds = load_image_folder(tmp_path, csv, size=(8, 8), on_missing="skip")
    assert ds.ids == ["0", "2"] and ds.classes == ["a", "b"]
    csv.write_text("image,label\n,a\n")
    with pytest.raises(DatasetError, match="line 2: empty file name"):
        load_image_folder(tmp_path, csv, size=(8, 8))


def dicom_sample(name: str) -> Path:
    p = get_testdata_file(name)
    assert p is not None
    return Path(p)


def test_dicom_folder_finds_files_by_preamble(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    shutil.copy(dicom_sample("CT_small.dcm"), tmp_path / "a" / "ct.dcm")
    shutil.copy(dicom_sample("MR_small.dcm"), tmp_path / "a" / "IM0001")  # no suffix: found by "DICM"
    (tmp_path / "notes.txt").write_text("not an image")
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,label\na/ct.dcm,normal\na/IM0001,pneumonia\n")
    ds = load_dicom_folder(tmp_path, csv, size=(16, 16))
    assert ds.images.shape == (2, 16, 16)
    assert ds.ids == ["a/IM0001", "a/ct"]
    np.testing.assert_array_equal(ds.labels, [1, 0])
    csv.write_text("filename,label\na/ct.dcm,normal\n")
    with pytest.raises(DatasetError, match=r"IM0001 \(labels\.csv: not listed\)"):
        load_dicom_folder(tmp_path, csv, size=(16, 16))
    assert load_dicom_folder(tmp_path, csv, size=(16, 16), on_missing="skip").ids == ["a/ct"]
    csv.write_text("filename,label\na/ct.dcm,normal\na/IM0001,x\nb/gone.dcm,normal\n")
    with pytest.raises(DatasetError, match=r"gone\.dcm: listed in labels\.csv but not a DICOM file"):
        load_dicom_folder(tmp_path, csv, size=(16, 16))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no DICOM files"):
        load_dicom_folder(empty, csv)


def test_real_isic_labels_and_the_two_without_diagnosis() -> None:
    root = find_data_file("isic-uda1")
    if root is None:
        pytest.skip("../shared/data/isic-uda1 not found (set FEDSCAN_DATA)")
    # benign/malignant is recorded for every image; the diagnosis field is null for two of them
    with pytest.raises(DatasetError, match=r"2 image\(s\).*ISIC_0000257\.jpg.*ISIC_0000454\.jpg"):
        load_image_folder(root, label_field="meta.clinical.diagnosis", size=(8, 8))

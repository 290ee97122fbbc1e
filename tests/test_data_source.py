"""``--data`` from the CLI (issue 16 item 1): npz, labelled image folders (CSV or JSON field), DICOM
folders, a site's share by ids or positions, ``fedscan partition`` by a metadata field or
Dirichlet, and bad labels refused naming the file and the field (exit 2 at the CLI)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from fedscan.cli import app
from fedscan.compose import load_agent_data
from firmware.profile import find_profile
from learning import data_source
from learning.data_path import find_data_file
from learning.data_source import DataFormat, DataSource
from learning.datasets import DatasetError
from learning.site_split import split_sites
from tests.test_learning_folders import FIELD, isic_like

DERM = find_profile("dermoscope-melanoma")
XRAY = find_profile("xray-cxr-28")


def csv_folder(root: Path, labels: list[str]) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["filename,label"]
    for i, lab in enumerate(labels):
        Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(root / f"x{i}.png")
        lines.append(f"x{i}.png,{lab}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_folder_with_json_labels_goes_through_the_profile(tmp_path: Path) -> None:
    isic_like(tmp_path, ["benign", "malignant", "benign", "malignant"])
    src = DataSource(tmp_path, label_field=FIELD)
    assert src.resolved_format() == DataFormat.IMAGES
    ds = data_source.load(src, DERM)
    assert ds.images.shape == (4, DERM.input.height, DERM.input.width, 3)
    assert ds.classes == list(DERM.model.classes) and ds.labels.tolist() == [0, 1, 0, 1]
    share = tmp_path / "site.txt"
    share.write_text("# a site\nISIC_0000003\nISIC_0000000\n")
    sub = data_source.select(ds, share)
    assert sub.ids == ["ISIC_0000003", "ISIC_0000000"] and sub.labels.tolist() == [1, 0]
    np.save(tmp_path / "site.npy", np.array([1, 2]))
    assert data_source.select(ds, tmp_path / "site.npy").ids == ["ISIC_0000001", "ISIC_0000002"]


def test_csv_folder_numeric_labels_name_the_profile_classes(tmp_path: Path) -> None:
    ds = data_source.load(DataSource(csv_folder(tmp_path / "f", ["0", "1", "1"]), labels_csv=tmp_path / "f/labels.csv"),
                          XRAY)
    assert ds.classes == ["normal", "pneumonia"] and ds.labels.tolist() == [0, 1, 1]
    assert ds.images.shape == (3, 28, 28)


def test_dicom_folder_and_npz(tmp_path: Path) -> None:
    folder = tmp_path / "dcm"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        p = get_testdata_file(name, download=False)
        assert isinstance(p, str)
        shutil.copy(p, folder / name)
    (folder / "labels.csv").write_text("filename,label\nCT_small.dcm,normal\nMR_small.dcm,pneumonia\n")
    ds = data_source.load(DataSource(folder, DataFormat.DICOM, labels_csv=folder / "labels.csv"), XRAY)
    assert ds.labels.tolist() == [0, 1] and ds.images.shape == (2, 28, 28)
    npz = tmp_path / "tiny.npz"
    rng = np.random.default_rng(0)
    arrays = {f"{s}_images": rng.integers(0, 255, (6, 28, 28), dtype=np.uint8) for s in ("train", "val", "test")}
    arrays.update({f"{s}_labels": np.array([[0], [1]] * 3, dtype=np.uint8) for s in ("train", "val", "test")})
    np.savez(npz, **arrays)  # type: ignore[arg-type]
    np.save(tmp_path / "idx.npy", np.array([0, 5]))
    got = load_agent_data(DataSource(npz), tmp_path / "idx.npy", XRAY)
    assert got is not None and len(got) == 2 and got.labels.tolist() == [0, 1]
    (tmp_path / "site.txt").write_text("a\n")
    with pytest.raises(DatasetError, match="image ids need a folder"):
        load_agent_data(DataSource(npz), tmp_path / "site.txt", XRAY)


def test_bad_labels_name_the_file_and_the_field(tmp_path: Path) -> None:
    root = tmp_path / "isic"
    root.mkdir()
    isic_like(root, ["benign", "melanoma?", "malignant"])
    with pytest.raises(DatasetError, match=r"ISIC_0000001\.jpg: label 'melanoma\?' \(.*ISIC_0000001\.json, "
                                           r"field 'meta\.clinical\.benign_malignant'\) is not one of the classes"):
        data_source.load(DataSource(root, label_field=FIELD), DERM)
    meta = json.loads((root / "ISIC_0000001.json").read_text())
    meta["meta"]["clinical"]["benign_malignant"] = {"nested": 1}
    (root / "ISIC_0000001.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"ISIC_0000001\.json, field 'meta\.clinical\.benign_malignant'.*malformed"):
        data_source.load(DataSource(root, label_field=FIELD), DERM)
    bad_csv = csv_folder(tmp_path / "c", ["normal", "pneumonia", "flu"])
    with pytest.raises(DatasetError, match=r"x2\.png: label 'flu' \(labels\.csv line 4, column 'label'\)"):
        data_source.load(DataSource(bad_csv, labels_csv=bad_csv / "labels.csv"), XRAY)
    share = tmp_path / "share.txt"
    share.write_text("ISIC_0000000\nISIC_9999999\n")
    meta["meta"]["clinical"]["benign_malignant"] = "benign"
    (root / "ISIC_0000001.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"share\.txt: 1 id\(s\) not in the data.*ISIC_9999999"):
        load_agent_data(DataSource(root, label_field=FIELD), share, DERM)


@pytest.mark.parametrize("args, message", [
    (["--label-field", FIELD, "--labels-csv", "x.csv"], "exactly one of --labels-csv and --label-field"),
    ([], "exactly one of --labels-csv and --label-field"),
    (["--data-format", "tiff"], "tiff"),
])
def test_cli_refuses_a_folder_without_labels_with_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    isic_like(tmp_path, ["benign"])
    res = CliRunner().invoke(app, ["agent", "--id", "a", "--data", str(tmp_path), *args,
                                   "--insecure-unsigned-models", "--state", str(tmp_path / "s")])
    assert res.exit_code == 2 and message in res.output, res.output


def test_split_sites_by_field_and_dirichlet() -> None:
    labels = np.array([0, 1] * 30)
    keys = [(1024, 768)] * 30 + [(2048, 1536)] * 20 + [(576, 432)] * 8 + [(1000, 750)] * 2
    s = split_sites(labels, sites=5, keys=keys, min_size=5, val_fraction=0.2, seed=0, exclude=np.arange(4))
    everything = np.concatenate([*s.parts, s.val, s.excluded])
    assert sorted(everything.tolist()) == list(range(60))  # every image exactly once
    assert set(s.names) == {"1024x768", "2048x1536", "576x432"}
    assert len(s.val) == 12 and np.bincount(labels[s.val]).tolist() == [6, 6]  # 20 % of 28 per class
    near = s.parts[s.names.index("1024x768")]
    assert {58, 59} - set(s.val.tolist()) <= set(near.tolist())  # (1000, 750): too small, joins its nearest device
    d = split_sites(labels, sites=4, alpha=0.3, min_size=3, seed=1)
    assert len(d.parts) == 4 and min(len(p) for p in d.parts) >= 3 and len(d.val) == 0


def test_partition_command_writes_site_and_val_lists(tmp_path: Path) -> None:
    folder = tmp_path / "isic"
    folder.mkdir()
    isic_like(folder, ["benign", "malignant"] * 10)
    for i, p in enumerate(sorted(folder.glob("*.json"))):  # three devices
        meta = json.loads(p.read_text())
        meta["meta"]["acquisition"]["pixelsX"] = (640, 1024, 2048)[i % 3]
        p.write_text(json.dumps(meta))
    (tmp_path / "test.txt").write_text("ISIC_0000000\nISIC_0000001\n")
    out = tmp_path / "parts"
    res = CliRunner().invoke(app, ["partition", str(folder), "--out", str(out), "--profile", "dermoscope-melanoma",
                                   "--label-field", FIELD, "--by-field", "meta.acquisition.pixelsX",
                                   "--min-site", "3", "--val-fraction", "0.25", "--exclude-ids",
                                   str(tmp_path / "test.txt")])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "partition.json").read_text())
    assert len(summary["sites"]) == 3 and summary["excluded"] == 2
    ids = [i for s in summary["sites"] for i in (out / s["file"]).read_text().split()]
    val = (out / "val.txt").read_text().split()
    assert len(ids) + len(val) == 18 and not set(ids) & set(val) and "ISIC_0000000" not in ids + val
    ds = load_agent_data(DataSource(folder, label_field=FIELD), out / summary["sites"][0]["file"], DERM)
    assert ds is not None and len(ds) == summary["sites"][0]["n"]
    bad = CliRunner().invoke(app, ["partition", str(folder), "--out", str(out), "--profile", "dermoscope-melanoma",
                                   "--label-field", FIELD, "--by-field", "meta.nowhere"])
    assert bad.exit_code == 2 and "ISIC_0000000: field 'meta.nowhere' is missing" in bad.output


@pytest.mark.skipif(find_data_file("isic-uda1") is None, reason="ISIC UDA-1 not in ../shared/data")
def test_partition_real_isic_by_device(tmp_path: Path) -> None:
    root = find_data_file("isic-uda1")
    assert root is not None
    res = CliRunner().invoke(app, ["partition", str(root), "--out", str(tmp_path), "--profile", "dermoscope-melanoma",
                                   "--label-field", FIELD, "--by-field",
                                   "meta.acquisition.pixelsX,meta.acquisition.pixelsY", "--min-site", "40",
                                   "--sites", "4", "--val-fraction", "0.2",
                                   "--exclude-ids", "learning/splits/isic_uda1_test.txt"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "partition.json").read_text())
    assert len(summary["sites"]) >= 3 and summary["excluded"] == 110
    assert sum(s["n"] for s in summary["sites"]) + summary["val"]["n"] == 440


@pytest.mark.parametrize("args, message", [
    (["--select-metric", "f1"], "--select-metric must be"),
    (["--recipe", "tuned"], "--recipe must be flags or default"),
    (["--steps-per-round", "5"], "--steps-per-round goes with"),
    (["--val-data", "nowhere.npz"], "nowhere.npz"),
])
def test_coordinator_cli_refusals_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    res = CliRunner().invoke(app, ["coordinator", "--state", str(tmp_path / "c"), *args])
    assert res.exit_code == 2 and message in res.output, res.output

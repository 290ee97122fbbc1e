from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from learning.datasets import (
    ArrayDataset,
    DatasetError,
    load_demo_splits,
    load_medmnist,
    make_synthetic,
)
from learning.folders import load_dicom_files, load_image_folder


def sample_file(name: str) -> str:
    p = get_testdata_file(name)
    assert p is not None, f"pydicom test file {name} missing"
    return str(p)


def test_real_pneumoniamnist_splits(pneumonia_npz: Path) -> None:
    sizes = {"train": 4708, "val": 524, "test": 624}
    for split, n in sizes.items():
        ds = load_medmnist(pneumonia_npz, split)
        assert len(ds) == n
        assert ds.images.shape == (n, 28, 28) and ds.images.dtype == np.uint8
        assert ds.labels.dtype == np.int64 and ds.labels.shape == (n,)
        assert ds.classes == ["normal", "pneumonia"]
    np.testing.assert_array_equal(load_medmnist(pneumonia_npz, "train").class_counts(), [1214, 3494])
    np.testing.assert_array_equal(load_medmnist(pneumonia_npz, "test").class_counts(), [234, 390])


def test_to_tensor_dataset_scales_and_normalizes() -> None:
    imgs = np.array([[[0, 255], [128, 64]]], dtype=np.uint8)
    ds = ArrayDataset(imgs, np.array([1]), ["a", "b"])
    x, y = ds.to_tensor_dataset().tensors
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (np.array([[0, 1], [128 / 255, 64 / 255]]) - 0.5) / 0.25
    np.testing.assert_allclose(x[0, 0].numpy(), expected, rtol=1e-6, atol=1e-6)
    raw, _ = ds.to_tensor_dataset(normalize=None).tensors
    assert float(raw.max()) == 1.0 and float(raw.min()) == 0.0
    rgb = ArrayDataset(np.zeros((3, 4, 5, 3), np.uint8), np.array([0, 1, 0]))
    xr, _ = rgb.to_tensor_dataset(normalize=((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))).tensors
    assert xr.shape == (3, 3, 4, 5)
    with pytest.raises(DatasetError, match="channel"):
        rgb.to_tensor_dataset(normalize=((0.5, 0.5), (0.25, 0.25)))
    floats = ArrayDataset(np.full((2, 3, 3), 0.75, np.float32), np.array([0, 0]))
    xf, _ = floats.to_tensor_dataset(normalize=None).tensors
    assert torch.all(xf == 0.75)


def test_subset_keeps_classes_and_order() -> None:
    ds = make_synthetic(20, seed=1)
    sub = ds.subset([5, 2, 7])
    assert len(sub) == 3 and sub.classes == ds.classes
    np.testing.assert_array_equal(sub.images[1], ds.images[2])
    np.testing.assert_array_equal(sub.labels, ds.labels[[5, 2, 7]])


def test_medmnist_rgb_and_bad_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    p = tmp_path / "bloodmnist.npz"
    np.savez(
        p,
        train_images=rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8),
        train_labels=np.array([[0], [7], [3], [1], [2], [0]], dtype=np.uint8),
        val_images=rng.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8),
        val_labels=np.array([[0], [1]], dtype=np.uint8),
    )
    train = load_medmnist(p, "train")
    assert train.channels == 3 and train.classes == [f"class_{i}" for i in range(8)]
    val = load_medmnist(p, "val")
    assert val.num_classes == 8  # from all splits, not just this one
    assert val.to_tensor_dataset(normalize=(0.5, 0.25)).tensors[0].shape == (2, 3, 28, 28)

    with pytest.raises(DatasetError, match=r"missing keys \['test_images', 'test_labels'\]"):
        load_medmnist(p, "test")
    with pytest.raises(DatasetError, match="split must be"):
        load_medmnist(p, "holdout")
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_images=np.zeros((3, 28, 28), np.uint8), train_labels=np.zeros((2, 1), np.uint8))
    with pytest.raises(DatasetError, match="3 images but 2 labels"):
        load_medmnist(bad, "train")
    multi = tmp_path / "chestmnist.npz"
    np.savez(multi, train_images=np.zeros((3, 28, 28), np.uint8), train_labels=np.zeros((3, 14), np.uint8))
    with pytest.raises(DatasetError, match="multi-label"):
        load_medmnist(multi, "train")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(DatasetError, match="not a readable npz"):
        load_medmnist(junk, "train")


def test_array_dataset_validation() -> None:
    with pytest.raises(DatasetError, match="4 images but 3 labels"):
        ArrayDataset(np.zeros((4, 8, 8), np.uint8), np.zeros(3, np.int64))
    with pytest.raises(DatasetError, match="labels span"):
        ArrayDataset(np.zeros((2, 8, 8), np.uint8), np.array([0, 2]), ["a", "b"])
    with pytest.raises(DatasetError, match=r"\(N,H,W\)"):
        ArrayDataset(np.zeros((8, 8), np.uint8), np.zeros(8, np.int64))
    with pytest.raises(DatasetError, match="integers"):
        ArrayDataset(np.zeros((2, 8, 8), np.uint8), np.array([0.5, 1.0]))
    with pytest.raises(DatasetError, match="uint8 or float"):
        ArrayDataset(np.zeros((2, 8, 8), np.int32), np.array([0, 1]))


def test_demo_splits_fall_back_to_generated_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDSCAN_DATA", str(tmp_path))
    with pytest.raises(DatasetError, match="not found"):
        load_demo_splits(allow_generated=False)
    splits = load_demo_splits()
    assert "GENERATED" in capsys.readouterr().out
    assert set(splits) == {"train", "val", "test"}
    assert splits["train"].images.shape[1:] == (28, 28) and splits["train"].classes == ["normal", "pneumonia"]
    again = load_demo_splits()
    np.testing.assert_array_equal(again["train"].images, splits["train"].images)  # seeded
    counts = splits["train"].class_counts()
    assert counts.min() > 0.4 * counts.sum()


def test_demo_splits_use_real_data(pneumonia_npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSCAN_DATA", str(pneumonia_npz.parent))
    splits = load_demo_splits()
    assert len(splits["train"]) == 4708 and len(splits["val"]) == 524 and len(splits["test"]) == 624


def test_image_folder_png_and_jpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (64, 48), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "a.png")
    Image.fromarray(np.stack([big] * 3, axis=-1)).save(tmp_path / "b.jpg", quality=95)
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(tmp_path / "sub" / "c.png")
    (tmp_path / "labels.csv").write_text("filename,label\na.png,pneumonia\nb.jpg,normal\nsub/c.png,pneumonia\n")
    ds = load_image_folder(tmp_path, tmp_path / "labels.csv", size=(28, 28))
    assert ds.images.shape == (3, 28, 28) and ds.images.dtype == np.uint8
    assert ds.classes == ["normal", "pneumonia"]
    np.testing.assert_array_equal(ds.labels, [1, 0, 1])
    assert np.all(ds.images[2] == 200)
    # the grayscale PNG and the RGB JPEG of the same picture agree up to JPEG loss
    assert np.abs(ds.images[0].astype(int) - ds.images[1].astype(int)).mean() < 6
    rgb = load_image_folder(tmp_path, tmp_path / "labels.csv", size=(16, 20), channels=3,
                            classes=["pneumonia", "normal"])
    assert rgb.images.shape == (3, 16, 20, 3)
    np.testing.assert_array_equal(rgb.labels, [0, 1, 0])


def test_image_folder_numeric_labels_sort_numerically(tmp_path: Path) -> None:
    for i in range(3):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "l.csv").write_text("filename,label\n0.png,10\n1.png,2\n2.png,2\n")
    ds = load_image_folder(tmp_path, tmp_path / "l.csv", size=(8, 8))
    assert ds.classes == ["2", "10"]
    np.testing.assert_array_equal(ds.labels, [1, 0, 0])


def test_image_folder_bad_inputs(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    csv = tmp_path / "l.csv"
    csv.write_text("filename,label\nok.png,0\nbroken.png,1\n")
    with pytest.raises(DatasetError, match=r"broken\.png: corrupt_image"):
        load_image_folder(tmp_path, csv)
    csv.write_text("filename,label\nok.png,0\nmissing.png,1\n")
    with pytest.raises(DatasetError, match=r"missing\.png: listed in l\.csv but missing"):
        load_image_folder(tmp_path, csv)
    csv.write_text("file,diagnosis\nok.png,0\n")
    with pytest.raises(DatasetError, match="needs columns"):
        load_image_folder(tmp_path, csv)
    csv.write_text("filename,label\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_image_folder(tmp_path, csv)
    csv.write_text("filename,label\nok.png,cat\n")
    with pytest.raises(DatasetError, match="is not one of the classes"):
        load_image_folder(tmp_path, csv, classes=["normal", "pneumonia"])
    with pytest.raises(DatasetError, match="cannot read"):
        load_image_folder(tmp_path, tmp_path / "nope.csv")


def test_dicom_files_real_samples() -> None:
    paths = [sample_file("CT_small.dcm"), sample_file("MR_small.dcm"), sample_file("SC_rgb_rle.dcm"),
             sample_file("MR_small_jp2klossless.dcm")]
    ds = load_dicom_files(paths, ["normal", "pneumonia", "normal", "pneumonia"], size=(28, 28))
    assert ds.images.shape == (4, 28, 28) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.labels, [0, 1, 0, 1])
    ct, mr = ds.images[0], ds.images[1]
    assert int(ct.max()) - int(ct.min()) >= 200  # no VOI window in the file: min-max (then the resize smooths)
    # MR_small carries WindowCenter 600 / WindowWidth 1600: stored 127..2145, so the top saturates
    assert mr.max() == 255 and mr.min() > 40
    # lossless JPEG 2000 decodes to the same picture as the uncompressed MR
    np.testing.assert_array_equal(ds.images[1], ds.images[3])


def test_dicom_rescale_and_monochrome1(tmp_path: Path) -> None:
    base = load_dicom_files([sample_file("CT_small.dcm")], [0], size=(128, 128)).images[0]
    inv = pydicom.dcmread(sample_file("CT_small.dcm"))
    inv.PhotometricInterpretation = "MONOCHROME1"
    inv.save_as(tmp_path / "mono1.dcm")
    neg = pydicom.dcmread(sample_file("CT_small.dcm"))
    neg.RescaleSlope = -1  # a negative slope flips the picture just like MONOCHROME1
    neg.save_as(tmp_path / "neg.dcm")
    got = load_dicom_files([tmp_path / "mono1.dcm", tmp_path / "neg.dcm"], [0, 0], size=(128, 128)).images
    assert np.abs(base.astype(int) - 127).mean() > 20  # not a flat picture: inversion shows
    for img in got:
        assert np.abs(img.astype(int) - (255 - base.astype(int))).max() <= 1
    both = pydicom.dcmread(sample_file("CT_small.dcm"))
    both.PhotometricInterpretation = "MONOCHROME1"
    both.RescaleSlope = -1
    both.save_as(tmp_path / "both.dcm")
    np.testing.assert_array_equal(load_dicom_files([tmp_path / "both.dcm"], [0], size=(128, 128)).images[0], base)


def test_dicom_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="truncated_dicom"):
        load_dicom_files([sample_file("MR_truncated.dcm")], [0])
    with pytest.raises(DatasetError, match="no_pixel_data"):
        load_dicom_files([sample_file("rtplan.dcm")], [0])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not DICOM")
    with pytest.raises(DatasetError, match=r"junk\.dcm: not_dicom"):
        load_dicom_files([junk], [0])
    with pytest.raises(DatasetError, match=r"absent\.dcm: given but missing"):
        load_dicom_files([tmp_path / "absent.dcm"], [0])
    with pytest.raises(DatasetError, match="2 DICOM paths but 1 labels"):
        load_dicom_files([sample_file("CT_small.dcm")] * 2, [0])


def test_folder_pixels_match_the_serving_pipeline(tmp_path: Path) -> None:
    """Training (ArrayDataset.batch with the profile's normalize) and serving (profile pipeline on the
    uploaded bytes) see the same pixels, up to the uint8 storage rounding."""
    from firmware.profile import find_profile
    from learning.dicom import decode
    from learning.transforms import build_pipeline

    profile = find_profile("xray-cxr-28")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    shutil.copy(sample_file("CT_small.dcm"), tmp_path / "c.dcm")
    (tmp_path / "l.csv").write_text("filename,label\na.png,normal\nb.png,pneumonia\nc.dcm,normal\n")
    ds = load_image_folder(tmp_path, tmp_path / "l.csv", steps=profile.preprocessing,
                           classes=profile.model.classes)
    norm = next(s for s in profile.preprocessing if s.op == "normalize")
    x, _ = ds.batch(normalize=(norm.mean, norm.std))
    serve = build_pipeline(profile.preprocessing)
    accept = profile.input.model_copy(update={"modalities": []})  # the profile takes DX/CR/OT, the sample is CT
    for i, (name, ctype) in enumerate([("a.png", "image/png"), ("b.png", "image/png"),
                                       ("c.dcm", "application/dicom")]):
        want = serve(decode((tmp_path / name).read_bytes(), ctype, accept))
        assert want.shape == (1, 28, 28)
        np.testing.assert_allclose(x[i].numpy(), want, atol=1 / 510 / norm.std[0] + 1e-6)
    # the default steps are the profile's without normalize
    plain = load_image_folder(tmp_path, tmp_path / "l.csv", classes=profile.model.classes)
    np.testing.assert_array_equal(plain.images, ds.images)

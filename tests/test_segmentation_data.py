"""Segmentation data: PH2 pairs images with masks, bad files are refused, splits never overlap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from learning.data_path import data_dir
from learning.datasets import DatasetError
from learning.segmentation.data import (
    MRI,
    PH2,
    SegSet,
    build_splits,
    load_ph2,
    load_ph2_pair,
    ph2_ids,
    preprocess_rgb,
    resize_mask,
    split_ph2,
)

PH2_ROOT = data_dir() / "ph2"
needs_ph2 = pytest.mark.skipif(not PH2_ROOT.is_dir(), reason=f"{PH2_ROOT} not present (shared data)")
needs_both = pytest.mark.skipif(not (PH2_ROOT.is_dir() and (data_dir() / "brain-mri-flair").is_dir()),
                                reason="shared PH2 / brain-mri-flair data not present")


@needs_ph2
def test_ph2_pairs_each_image_with_its_binary_mask() -> None:
    ids = ph2_ids(PH2_ROOT)
    assert len(ids) == 200 and ids[0] == "IMD002"
    rgb, mask = load_ph2_pair(PH2_ROOT, ids[0])
    assert rgb.shape[:2] == mask.shape and rgb.shape[2] == 3 and set(np.unique(mask)) == {0, 1}
    s = load_ph2(PH2_ROOT, ids[:6], size=32, channels=1)
    assert s.images.shape == (6, 1, 32, 32) and s.masks.shape == (6, 32, 32)
    assert s.images.dtype == np.float32 and s.images.min() >= 0.0 and s.images.max() <= 1.0
    assert set(np.unique(s.masks)) == {0, 1} and list(s.cases) == ids[:6]
    # the pairing is right: in dermoscopy the lesion is darker than the skin around it, image by image
    for img, m in zip(s.images[:, 0], s.masks, strict=True):
        assert img[m == 1].mean() < img[m == 0].mean()
    # the resized mask is the resized clinician mask of *this* image (same lesion share)
    assert abs(s.masks[0].mean() - mask.mean()) < 0.02


def _write_pair(root: Path, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{name}.png")
    Image.fromarray(mask).save(root / "masks" / f"{name}.png")


def test_bad_ph2_files_are_refused_with_a_typed_error(tmp_path: Path) -> None:
    rgb = np.full((20, 30, 3), 128, np.uint8)
    good = np.zeros((20, 30), np.uint8)
    good[5:10, 5:10] = 255
    _write_pair(tmp_path, "IMD001", rgb, good)
    assert ph2_ids(tmp_path) == ["IMD001"]
    _write_pair(tmp_path, "IMD002", rgb, np.zeros((10, 30), np.uint8))  # wrong shape
    with pytest.raises(DatasetError, match="differs from image shape"):
        load_ph2_pair(tmp_path, "IMD002")
    grey = good.copy()
    grey[0, 0] = 7
    _write_pair(tmp_path, "IMD003", rgb, grey)  # not binary
    with pytest.raises(DatasetError, match="not binary"):
        load_ph2_pair(tmp_path, "IMD003")
    (tmp_path / "images" / "IMD004.png").write_bytes(b"not a png")
    (tmp_path / "masks" / "IMD004.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="not a readable image"):
        load_ph2_pair(tmp_path, "IMD004")
    Image.fromarray(rgb).save(tmp_path / "images" / "IMD005.png")  # image without a mask
    with pytest.raises(DatasetError, match="without a mask"):
        ph2_ids(tmp_path)


def test_preprocessing_is_grey_luma_and_masks_stay_binary() -> None:
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[..., 0] = 200
    x = preprocess_rgb(rgb, size=8, channels=1)
    assert x.shape == (1, 8, 8) and np.allclose(x, round(0.299 * 200) / 255, atol=1 / 255)
    assert preprocess_rgb(rgb, size=8, channels=3).shape == (3, 8, 8)
    with pytest.raises(DatasetError):
        preprocess_rgb(np.zeros((4, 4, 3), np.float32), size=8, channels=1)
    m = np.zeros((40, 60), np.uint8)
    m[:20] = 1
    r = resize_mask(m, 8)
    assert set(np.unique(r)) == {0, 1} and r[:4].all() and not r[4:].any()


def test_segset_refuses_arrays_that_do_not_pair_up() -> None:
    with pytest.raises(DatasetError):
        SegSet(np.zeros((3, 1, 8, 8), np.float32), np.zeros((2, 8, 8), np.uint8), np.asarray(["a"] * 3), PH2)
    with pytest.raises(DatasetError):
        SegSet(np.zeros((3, 1, 8, 8), np.float32), np.zeros((3, 4, 4), np.uint8), np.asarray(["a"] * 3), PH2)


def test_ph2_split_is_by_image_and_disjoint() -> None:
    ids = [f"IMD{i:03d}" for i in range(50)]
    sites, val, test = split_ph2(ids, sites=2, val=5, test=10, seed=3)
    flat = [i for s in sites for i in s] + val + test
    assert sorted(flat) == ids and len(val) == 5 and len(test) == 10 and abs(len(sites[0]) - len(sites[1])) <= 1
    assert split_ph2(ids, sites=2, val=5, test=10, seed=3) == (sites, val, test)
    with pytest.raises(DatasetError):
        split_ph2(ids[:3], sites=2, val=1, test=1, seed=0)


@needs_both
def test_build_splits_two_sites_per_modality_subjects_never_shared() -> None:
    sp = build_splits(data_dir(), size=16, channels=1, ph2_limit=20, ph2_val=4, ph2_test=4, mri_limit=8,
                      mri_val=2, mri_test=2)
    assert [s.modality for s in sp.sites] == [PH2, PH2, MRI, MRI]
    mri_cases = [set(s.train.cases) for s in sp.sites if s.modality == MRI]
    mri_cases += [set(sp.val[MRI].cases), set(sp.test[MRI].cases)]
    assert sum(len(c) for c in mri_cases) == len(set().union(*mri_cases)) == 8
    ph2_cases = [set(s.train.cases) for s in sp.sites if s.modality == PH2] + [set(sp.val[PH2].cases),
                                                                                 set(sp.test[PH2].cases)]
    assert sum(len(c) for c in ph2_cases) == len(set().union(*ph2_cases)) == 20
    assert sp.test[MRI].spacing_mm is not None and any("DLWMLS" in n for n in sp.notes)

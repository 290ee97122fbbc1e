"""The brain FLAIR slice loader: subject-level splits, masks aligned with images, bad files refused."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from learning.brain_mri import MASKS_NOTE, list_subjects, load_slices, load_subject, normalise_volume, split_subjects
from learning.data_path import data_dir
from learning.datasets import DatasetError

ROOT = data_dir() / "brain-mri-flair"
needs_data = pytest.mark.skipif(not ROOT.is_dir(), reason=f"{ROOT} not present (shared data)")


@needs_data
def test_subjects_and_slices_are_aligned() -> None:
    subjects = list_subjects(ROOT)
    assert len(subjects) == 23 and subjects[0] == "Subj1" and subjects[-1] == "Subj23"
    s = load_subject(ROOT, "Subj1", size=32)
    assert s.images.shape == s.masks.shape and s.images.shape[1:] == (32, 32)
    assert s.images.dtype == np.float32 and s.images.min() >= 0.0 and s.images.max() <= 1.0
    assert set(np.unique(s.masks)) <= {0, 1} and s.has_lesion.any() and not s.has_lesion.all()
    assert (s.subjects == "Subj1").all() and np.all(np.diff(s.slice_index) > 0)
    assert s.spacing_mm[0] > 2.0  # 110 voxels of 2 mm resized to 32
    # lesion pixels are bright on FLAIR: their mean intensity beats the brain's
    lesion = s.images[s.masks == 1].mean()
    brain = s.images[(s.images > 0.05) & (s.masks == 0)].mean()
    assert lesion > brain


@needs_data
def test_subject_split_never_shares_a_subject() -> None:
    subjects = list_subjects(ROOT)
    sites, val, test = split_subjects(subjects, sites=3, val=3, test=5, seed=1)
    flat = [s for site in sites for s in site] + val + test
    assert sorted(flat) == sorted(subjects) and len(set(flat)) == len(flat)
    assert [len(x) for x in sites] == [5, 5, 5]
    assert split_subjects(subjects, sites=3, val=3, test=5, seed=1) == (sites, val, test)
    data = load_slices(ROOT, sites[0], size=16)
    assert set(data.subjects) == set(sites[0])
    assert "automatic" in MASKS_NOTE


def test_split_refuses_too_few_subjects() -> None:
    with pytest.raises(DatasetError, match="cannot split"):
        split_subjects(["a", "b"], sites=2, val=1, test=0, seed=0)


def test_truncated_volume_is_refused_with_its_path(tmp_path) -> None:
    (tmp_path / "flair").mkdir()
    (tmp_path / "lesion-masks").mkdir()
    (tmp_path / "flair" / "Subj1_FL.nii.gz").write_bytes(gzip.compress(b"\x5c\x01\x00\x00" + b"\0" * 40))
    (tmp_path / "lesion-masks" / "Subj1_FL_DLWMLS.nii.gz").write_bytes(b"junk")
    assert list_subjects(tmp_path) == ["Subj1"]
    with pytest.raises(DatasetError, match=r"Subj1_FL\.nii\.gz: not a readable NIfTI"):
        load_subject(tmp_path, "Subj1")


def test_normalise_volume_ignores_background() -> None:
    v = np.zeros((20, 20, 2), np.float32)
    v[2:18, 2:18] = 10.0
    v[5, 5, 1] = 1000.0  # one outlier voxel: clipped at the percentile, it does not set the scale
    out = normalise_volume(v)
    assert out.max() == 1.0 and out[0, 0, 0] == 0.0 and out[3, 3, 0] > 0.9

"""learning.anomaly.data: sites hold normal images only, subjects never cross splits, gamma is applied."""

from __future__ import annotations

import numpy as np
import pytest

from learning.anomaly.data import SHIFT_GAMMA, apply_appearance, brain_splits, pneumonia_splits
from learning.anomaly.errors import AnomalyError
from learning.brain_mri import list_subjects, load_slices, split_subjects
from learning.data_path import data_dir

NPZ = data_dir() / "pneumoniamnist.npz"
BRAIN = data_dir() / "brain-mri-flair"


def test_apply_appearance() -> None:
    x = np.array([[0.0, 0.25, 1.0]], np.float32)
    assert np.allclose(apply_appearance(x, 0.5), [[0.0, 0.5, 1.0]])
    assert apply_appearance(x, 1.0) is not x and np.array_equal(apply_appearance(x, 1.0), x)
    with pytest.raises(AnomalyError):
        apply_appearance(x, 0.0)


@pytest.mark.skipif(not NPZ.exists(), reason=f"{NPZ} not present (shared data)")
def test_pneumonia_sites_hold_only_normal_xrays() -> None:
    sp = pneumonia_splits(NPZ, sites=3, seed=0)
    with np.load(NPZ) as z:
        normal = z["train_images"][z["train_labels"].ravel() == 0].astype(np.float32) / 255.0
    held = np.concatenate([np.concatenate([s.train, s.calib]) for s in sp.sites])
    assert len(held) == len(normal) == 1214
    # every site image is one of the normal training X-rays (compare by a per-image fingerprint)
    key = {round(float(v), 5) for v in normal.reshape(len(normal), -1) @ np.linspace(0, 1, 784)}
    assert all(round(float(v), 5) in key for v in held.reshape(len(held), -1) @ np.linspace(0, 1, 784))
    assert len(sp.test.labels) == 624 and int(sp.test.labels.sum()) == 390 and sp.test.masks is None


@pytest.mark.skipif(not BRAIN.is_dir(), reason=f"{BRAIN} not present (shared data)")
def test_brain_sites_train_on_lesion_free_slices_of_their_own_subjects() -> None:
    subjects = list_subjects(BRAIN)[:6]
    sp = brain_splits(BRAIN, sites=2, val=1, test=1, seed=0, size=32, subjects=subjects, shift=SHIFT_GAMMA)
    site_ids, val_ids, test_ids = split_subjects(subjects, sites=2, val=1, test=1, seed=0)
    slices = load_slices(BRAIN, subjects, size=32)
    for site, ids in zip(sp.sites, site_ids, strict=True):
        mine = slices.of_subjects(ids)
        normal = mine.images[~mine.has_lesion]
        assert len(site.train) + len(site.calib) == len(normal)  # only lesion-free slices, all of them
        assert np.allclose(np.concatenate([site.train, site.calib]), apply_appearance(
            np.concatenate([slices.of_subjects(ids[:-1]).images[~slices.of_subjects(ids[:-1]).has_lesion],
                            slices.of_subjects(ids[-1:]).images[~slices.of_subjects(ids[-1:]).has_lesion]]),
            site.gamma))
    assert sp.sites[1].gamma == SHIFT_GAMMA[1] != 1.0
    test = slices.of_subjects(test_ids)
    assert sp.test.masks is not None and np.array_equal(sp.test.masks, test.masks)
    assert np.array_equal(sp.test.labels, test.has_lesion.astype(np.int64)) and sp.test.labels.any()
    assert not set(test_ids) & set(val_ids) and not set(test_ids) & {s for ids in site_ids for s in ids}
    assert "DLWMLS" in sp.note
    with pytest.raises(AnomalyError):
        brain_splits(BRAIN, sites=3, val=1, test=1, seed=0, size=32, subjects=subjects)  # 4 subjects for 3 sites

"""Fixed splits: stratified hold-out, id lists, the recorded ISIC test split and device sites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from learning import isic
from learning.datasets import ArrayDataset, DatasetError
from learning.splits import read_ids, split_by_ids, stratified_holdout, write_ids


def test_stratified_holdout_is_stratified_seeded_and_disjoint() -> None:
    y = np.array([0] * 70 + [1] * 30)
    kept, held = stratified_holdout(y, 0.2, seed=5)
    assert len(held) == 20 and np.bincount(y[held]).tolist() == [14, 6]
    assert len(np.intersect1d(kept, held)) == 0 and len(kept) + len(held) == 100
    again = stratified_holdout(y, 0.2, seed=5)
    assert np.array_equal(again[1], held)
    assert not np.array_equal(stratified_holdout(y, 0.2, seed=6)[1], held)
    with pytest.raises(ValueError, match="fraction"):
        stratified_holdout(y, 1.0, seed=0)


def test_id_lists_round_trip_and_split(tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    write_ids(path, ["c", "a"], "test ids\nnever select on them")
    assert path.read_text().startswith("# test ids\n# never select")
    assert read_ids(path) == ["a", "c"]
    ds = ArrayDataset(np.zeros((4, 2, 2), np.uint8), np.array([0, 1, 0, 1]), ids=["a", "b", "c", "d"])
    rest, held = split_by_ids(ds, read_ids(path))
    assert rest.ids == ["b", "d"] and held.ids == ["a", "c"]
    with pytest.raises(DatasetError, match=r"not in the dataset, e.g. \['zz'\]"):
        split_by_ids(ds, ["a", "zz"])
    path.write_text("a\na\n")
    with pytest.raises(DatasetError, match="duplicate"):
        read_ids(path)
    with pytest.raises(DatasetError, match="no image ids"):
        split_by_ids(ArrayDataset(ds.images, ds.labels), ["a"])


def test_recorded_isic_test_split_is_the_seeded_stratified_draw() -> None:
    recorded = read_ids(isic.TEST_IDS)
    assert len(recorded) == 110
    root = isic.data_root(required=False)
    if root is None:
        pytest.skip("../shared/data/isic-uda1 not found (set FEDSCAN_DATA)")
    assert recorded == isic.make_test_ids(root)  # the file is exactly the documented draw


def test_isic_splits_and_device_sites() -> None:
    if isic.data_root(required=False) is None:
        pytest.skip("../shared/data/isic-uda1 not found (set FEDSCAN_DATA)")
    s = isic.load_splits(8)
    assert {k: len(v) for k, v in s.items()} == {"train": 352, "val": 88, "test": 110}
    assert s["test"].class_counts().tolist() == [79, 31] and s["val"].class_counts().tolist() == [64, 24]
    assert not set(s["test"].ids) & (set(s["train"].ids) | set(s["val"].ids))
    assert not set(s["train"].ids) & set(s["val"].ids)
    sites = isic.device_sites(s["train"], min_size=30)
    assert len(sites.parts) >= 3 and sum(len(p) for p in sites.parts) == 352
    assert all(len(p) >= 30 for p in sites.parts)

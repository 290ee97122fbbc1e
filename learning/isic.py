"""ISIC UDA-1 dermoscopy (melanoma vs benign): the fixed test split, the validation split, sites by device.

``../shared/data/isic-uda1``: 550 JPEGs (250×250) with the archive's JSON beside each. The label
is ``meta.clinical.benign_malignant`` (present for all 550). The set has no official split, so a
stratified 20 % (seed :data:`TEST_SEED`) was held out once and its ids recorded in
``learning/splits/isic_uda1_test.txt``; every run reads that list and never selects on it. The
coordinator's validation split is a stratified 20 % of the rest (seed :data:`VAL_SEED`); the
sites hold what remains, split by the original camera resolution (``pixelsX`` × ``pixelsY``,
one per acquisition device) with :func:`learning.partition.by_field`.

Regenerate the id list (only if the data changes; it changes every figure): ``python -m learning.isic``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from learning.data_path import find_data_file
from learning.datasets import ArrayDataset, DatasetError
from learning.folders import labels_from_metadata, load_image_folder, metadata_records
from learning.partition import FieldPartition, by_field, field_keys
from learning.splits import SPLITS_DIR, read_ids, split_by_ids, stratified_holdout, write_ids

FOLDER = "isic-uda1"
LABEL_FIELD = "meta.clinical.benign_malignant"
CLASSES = ["benign", "malignant"]
DEVICE_FIELDS = ("meta.acquisition.pixelsX", "meta.acquisition.pixelsY")
TEST_IDS = SPLITS_DIR / "isic_uda1_test.txt"
TEST_FRACTION, TEST_SEED = 0.2, 20261129
VAL_FRACTION, VAL_SEED = 0.2, 1


def data_root(required: bool = True) -> Path | None:
    """Return the ISIC folder in the shared data, or None (``DatasetError`` when ``required``)."""
    root = find_data_file(FOLDER)
    if root is None and required:
        raise DatasetError(f"{FOLDER} not found in the shared data folder (set FEDSCAN_DATA)")
    return root


def make_test_ids(root: Path) -> list[str]:
    """Return the held-out test ids as first drawn: a stratified 20 % of the labelled images, seed :data:`TEST_SEED`."""
    rows = labels_from_metadata(root, LABEL_FIELD)
    labels = [CLASSES.index(r.label) if r.label in CLASSES else -1 for r in rows]
    if -1 in labels:
        raise DatasetError(f"{root}: a label outside {CLASSES}")
    _, held = stratified_holdout(labels, TEST_FRACTION, TEST_SEED)
    return sorted(rows[i].path.stem for i in held)


def load_splits(size: int, *, channels: int = 3, steps: Sequence[Any] | None = None,
                root: Path | None = None) -> dict[str, ArrayDataset]:
    """``{"train", "val", "test"}``: test from the recorded ids, val a stratified 20 % of the rest."""
    root = root or data_root()
    assert root is not None
    data = load_image_folder(root, label_field=LABEL_FIELD, size=(size, size), channels=channels,
                             classes=CLASSES, steps=steps)
    rest, test = split_by_ids(data, read_ids(TEST_IDS))
    keep, val = stratified_holdout(rest.labels, VAL_FRACTION, VAL_SEED)
    return {"train": rest.subset(keep), "val": rest.subset(val), "test": test}


def device_sites(train: ArrayDataset, *, min_size: int, max_sites: int | None = None, min_sites: int = 3,
                 root: Path | None = None) -> FieldPartition:
    """Sites by acquisition device (original resolution) over ``train`` (whose ids are ISIC image ids)."""
    root = root or data_root()
    assert root is not None
    keys = field_keys(metadata_records(root, train.ids), DEVICE_FIELDS, train.ids)
    return by_field(keys, min_size=min_size, max_sites=max_sites, min_sites=min_sites)


def main() -> None:
    """Write ``learning/splits/isic_uda1_test.txt`` from the shared data."""
    root = data_root()
    assert root is not None
    ids = make_test_ids(root)
    write_ids(TEST_IDS, ids, f"ISIC UDA-1 fixed test split: stratified {TEST_FRACTION:.0%} of the {FOLDER} images by "
                             f"{LABEL_FIELD},\nseed {TEST_SEED} (learning/isic.py make_test_ids). Never select on these.")
    print(f"{len(ids)} ids -> {TEST_IDS}")


if __name__ == "__main__":
    main()

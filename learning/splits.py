"""Fixed splits: seeded stratified hold-outs, and id lists recorded in the repository.

A test split that is used for selection stops being a test split. For a set without an official
split (ISIC UDA-1) the test images are held out once (:func:`stratified_holdout`, seeded), their
ids written to ``learning/splits/*.txt`` and read back by every run (:func:`read_ids`,
:func:`split_by_ids`), so no later change of code or seed can move an image across.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from learning.datasets import ArrayDataset, DatasetError

SPLITS_DIR = Path(__file__).resolve().parent / "splits"


def stratified_holdout(labels: np.ndarray | Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(kept, held_out)``: ``round(fraction · count)`` of each class held out at random.

    Both arrays are sorted int64; the same labels, fraction and seed always give the same split.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        held.append(idx[: round(fraction * len(idx))])
    out = np.sort(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(len(y), dtype=np.int64), out)
    return kept, out


def write_ids(path: Path, ids: Sequence[str], header: str) -> None:
    """Write one id per line under ``# header`` comment lines (sorted, so diffs stay readable)."""
    lines = [f"# {h}" for h in header.splitlines()] + sorted(ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def read_ids(path: Path) -> list[str]:
    """Read the ids of an id list (blank lines and ``#`` comments skipped); duplicates are refused."""
    try:
        text = path.read_text()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the id list ({e})") from e
    ids = [s.strip() for s in text.splitlines() if s.strip() and not s.lstrip().startswith("#")]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{path}: duplicate ids")
    return ids


def split_by_ids(data: ArrayDataset, ids: Sequence[str]) -> tuple[ArrayDataset, ArrayDataset]:
    """Return ``(rest, listed)``: the images whose id is in ``ids`` and the others, each in dataset order.

    Every listed id must be in ``data`` (a renamed or missing file refuses, naming it).
    """
    if not data.ids:
        raise DatasetError("the dataset has no image ids to split by")
    wanted = set(ids)
    missing = sorted(wanted - set(data.ids))
    if missing:
        raise DatasetError(f"{len(missing)} listed id(s) are not in the dataset, e.g. {missing[:3]}")
    mask = np.array([i in wanted for i in data.ids])
    return data.subset(np.flatnonzero(~mask)), data.subset(np.flatnonzero(mask))

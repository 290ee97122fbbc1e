"""Splitting one labelled dataset into a coordinator's validation share and sites (``fedscan partition``).

Pure: positions in, positions out. Images listed in an exclusion list (a fixed test split) are
left out first; then a stratified validation share for the coordinator
(:func:`learning.splits.stratified_holdout`); the rest goes to sites, either by a metadata field
(:func:`learning.partition.by_field`: one site per acquisition device, hospital, …) or by
Dirichlet label skew (:func:`learning.partition.dirichlet_label_skew`). Writing the index files is
the caller's job (``fedscan/partition_cli.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from learning.datasets import DatasetError
from learning.partition import Key, by_field, dirichlet_label_skew
from learning.splits import stratified_holdout


@dataclass(frozen=True)
class SiteSplit:
    """Positions of each site, of the validation share and of the excluded images."""

    names: list[str]
    parts: list[np.ndarray]
    val: np.ndarray
    excluded: np.ndarray


def split_sites(labels: np.ndarray, *, sites: int, keys: Sequence[Key] | None = None, alpha: float = 0.5,
                min_size: int = 1, seed: int = 0, val_fraction: float = 0.0,
                exclude: np.ndarray | None = None) -> SiteSplit:
    """Split positions ``0..len(labels)-1``: ``exclude`` out, a ``val_fraction`` share, then ``sites`` sites.

    With ``keys`` (one metadata key per image) the sites follow the keys (at most ``sites`` of them,
    at least ``min(3, sites)``, small keys merged, see ``by_field``); without, Dirichlet(``alpha``)
    label skew over ``sites`` sites, each at least ``min_size`` images.
    """
    y = np.asarray(labels)
    n = len(y)
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    if keys is not None and len(keys) != n:
        raise DatasetError(f"{len(keys)} metadata keys for {n} images")
    excluded = np.unique(np.asarray(exclude if exclude is not None else [], dtype=np.int64))
    rest = np.setdiff1d(np.arange(n, dtype=np.int64), excluded)
    val = np.zeros(0, dtype=np.int64)
    if val_fraction > 0:
        keep, held = stratified_holdout(y[rest], val_fraction, seed)
        rest, val = rest[keep], rest[held]
    if keys is not None:
        fp = by_field([keys[i] for i in rest], min_size=min_size, max_sites=sites, min_sites=min(3, sites))
        names, parts = fp.names, [rest[p] for p in fp.parts]
    else:
        parts = [rest[p] for p in dirichlet_label_skew(y[rest], sites, alpha, seed=seed, min_size=min_size)]
        names = [f"site-{i + 1}" for i in range(sites)]
    return SiteSplit(names=names, parts=parts, val=val, excluded=excluded)

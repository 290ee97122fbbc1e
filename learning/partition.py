"""Partitioners: split sample indices over sites, at random (seeded non-IID) or by a metadata field.

Every random partitioner returns ``list[np.ndarray]`` (int64 index arrays, sorted ascending), one per
site; the arrays are disjoint and together cover ``range(n)``. The same arguments always give
the same split (``numpy.random.default_rng(seed)``; retries draw from the same generator, so
they are deterministic too). :func:`by_field` makes sites from the values of a metadata field (for
ISIC: the acquisition resolution, i.e. the device), merging rare values deterministically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from learning.datasets import DatasetError
from learning.records import MissingField, dotted_get


def _check_sites(n: int, k: int, min_size: int) -> None:
    if k < 1:
        raise ValueError(f"need at least one site, got k={k}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if n < k * min_size:
        raise ValueError(f"{n} samples cannot give {k} sites at least {min_size} each")


def _finish(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(n: int, k: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle ``range(n)`` and deal it into ``k`` sites whose sizes differ by at most one."""
    _check_sites(n, k, 1)
    perm = np.random.default_rng(seed).permutation(n)
    return _finish(np.array_split(perm, k))


def quantity_skew(n: int, k: int, alpha: float = 1.0, seed: int = 0, *, min_size: int = 1) -> list[np.ndarray]:
    """IID labels, skewed amounts: site sizes are ``min_size`` plus a Dirichlet(alpha) share of the rest.

    Small ``alpha`` (0.1) gives a few large sites and many small ones; large ``alpha`` (100) nears :func:`iid`.
    """
    _check_sites(n, k, min_size)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.full(k, float(alpha)))
    sizes = min_size + rng.multinomial(n - k * min_size, shares)
    perm = rng.permutation(n)
    return _finish(np.split(perm, np.cumsum(sizes)[:-1]))


def dirichlet_label_skew(
    labels: np.ndarray | Sequence[int],
    k: int,
    alpha: float = 0.5,
    seed: int = 0,
    *,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label and quantity skew (per-class split, NIID-Bench / Yurochkin et al. 2019): for each class, its samples go to sites in Dirichlet(alpha) shares, so site sizes vary as much as label mixes (PneumoniaMNIST, 5 sites, α = 0.5, seed 0: one site holds 65 % of the images).

    Draws are repeated (from the same seeded generator) until every site holds at least
    ``min_size`` samples; a site already above ``n / k`` gets no further share of a class
    (the usual balancing step, NIID-Bench), which keeps retries rare. If ``max_tries`` draws all
    leave a site short, the last draw is repaired by moving samples from the largest site to the
    short ones. ``ValueError`` only when ``n < k * min_size``.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    n = int(y.shape[0])
    _check_sites(n, k, min_size)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    sites: list[np.ndarray] = []
    for _ in range(max(1, max_tries)):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        counts = np.zeros(k, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(k, float(alpha)))
            p = np.where(counts < n / k, p, 0.0)
            total = p.sum()
            p = p / total if total > 0 else np.full(k, 1.0 / k)
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].append(chunk)
                counts[site] += len(chunk)
        sites = [np.concatenate(p) for p in parts]
        if counts.min() >= min_size:
            return _finish(sites)
    # Still short after max_tries (few samples, tiny alpha): top the short sites up with samples
    # taken from the largest site, one at a time. Deterministic, and feasible since n >= k*min_size.
    sites = [rng.permutation(s) for s in sites]
    while True:
        sizes = np.array([len(s) for s in sites])
        short = int(np.argmin(sizes))
        if sizes[short] >= min_size:
            return _finish(sites)
        donor = int(np.argmax(sizes))
        sites[short] = np.append(sites[short], sites[donor][-1])
        sites[donor] = sites[donor][:-1]


def label_histogram(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int | None = None) -> np.ndarray:
    """``(k, C)`` counts of each class per site, for reports and tests."""
    y = np.asarray(labels)
    c = int(num_classes if num_classes is not None else (y.max() + 1 if y.size else 0))
    return np.stack([np.bincount(y[p], minlength=c) for p in parts]) if parts else np.zeros((0, c), np.int64)


# ---------------------------------------------------------------------------------------------- by field
Key = tuple[Any, ...]


@dataclass(frozen=True)
class FieldPartition:
    """Sites made from the values of a metadata field: index arrays, a name per site, the merged keys."""

    parts: list[np.ndarray]
    names: list[str]
    members: list[list[Key]]  # the field values (keys) each site holds; the first is the site's own


def field_keys(records: Sequence[Mapping[str, Any]], fields: Sequence[str],
               ids: Sequence[str] | None = None) -> list[Key]:
    """One key per record: the values at the dotted ``fields`` (e.g. ``meta.acquisition.pixelsX``)."""
    if not fields:
        raise ValueError("name at least one field")
    keys = []
    for i, rec in enumerate(records):
        try:
            keys.append(tuple(dotted_get(rec, f) for f in fields))
        except MissingField as e:
            who = ids[i] if ids is not None else f"record {i}"
            raise DatasetError(f"{who}: field {e.field!r} is missing or null") from e
    return keys


def _key_name(key: Key) -> str:
    return "x".join(str(v) for v in key)


def _numeric(key: Key) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in key)


def _log_distance(a: Key, b: Key) -> float:
    return float(sum(abs(math.log(float(x) / float(y))) for x, y in zip(a, b, strict=True)))


def by_field(keys: Sequence[Key], *, min_size: int = 1, max_sites: int | None = None,
             min_sites: int = 1) -> FieldPartition:
    """Sites by the value of a field (a device, a hospital): one site per key, small keys merged.

    Deterministic, no randomness: keys are ranked by count (ties by name). The keys holding at
    least ``min_size`` samples become sites (the largest ``max_sites`` of them when set; the next
    largest are promoted when fewer than ``min_sites`` qualify). Every other key joins a site: for
    positive numeric keys (resolutions) the nearest kept key in log scale (ties: the larger site),
    else one ``other`` site when it reaches ``min_size``, or the smallest site when it does not.
    :class:`~learning.datasets.DatasetError` when there are fewer distinct keys than ``min_sites``.
    """
    if min_size < 1 or min_sites < 1 or (max_sites is not None and max_sites < min_sites):
        raise ValueError(f"need min_size >= 1 and 1 <= min_sites <= max_sites, got {min_size}, {min_sites}, {max_sites}")
    groups: dict[Key, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(tuple(k), []).append(i)
    if len(groups) < min_sites:
        raise DatasetError(f"{len(groups)} distinct value(s) cannot make {min_sites} sites")
    ranked = sorted(groups, key=lambda k: (-len(groups[k]), _key_name(k)))
    kept = [k for k in ranked if len(groups[k]) >= min_size][: max_sites or len(ranked)]
    for k in ranked:
        if len(kept) >= min_sites:
            break
        if k not in kept:
            kept.append(k)
    members: dict[Key, list[Key]] = {k: [k] for k in kept}
    rest = [k for k in ranked if k not in members]
    other: list[Key] = []
    for k in rest:
        if _numeric(k) and all(_numeric(c) and len(c) == len(k) for c in kept):
            target = min(kept, key=lambda c: (_log_distance(k, c), -len(groups[c]), _key_name(c)))
            members[target].append(k)
        else:
            other.append(k)
    sites = [(k, members[k]) for k in kept]
    if other:
        if sum(len(groups[k]) for k in other) >= min_size:
            sites.append((("other",), other))
        else:
            smallest = min(range(len(sites)), key=lambda s: (sum(len(groups[k]) for k in sites[s][1]), s))
            sites[smallest][1].extend(other)
    parts = _finish([np.concatenate([np.asarray(groups[k], dtype=np.int64) for k in ks]) for _, ks in sites])
    return FieldPartition(parts=parts, names=[_key_name(k) for k, _ in sites], members=[list(ks) for _, ks in sites])

"""Seeded non-IID partitioners: split sample indices over ``k`` sites.

Every partitioner returns ``list[np.ndarray]`` (int64 index arrays, sorted ascending), one per
site; the arrays are disjoint and together cover ``range(n)``. The same arguments always give
the same split (``numpy.random.default_rng(seed)``; retries draw from the same generator, so
they are deterministic too).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
    """Label and quantity skew (per-class split, NIID-Bench / Yurochkin et al. 2019): for each class,
    its samples go to sites in Dirichlet(alpha) shares, so site sizes vary as much as label mixes
    (PneumoniaMNIST, 5 sites, α = 0.5, seed 0: one site holds 65 % of the images).

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

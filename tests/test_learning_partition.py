from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from learning.partition import dirichlet_label_skew, iid, label_histogram, quantity_skew


def assert_partition(parts: list[np.ndarray], n: int, k: int, min_size: int) -> None:
    assert len(parts) == k
    assert all(p.dtype == np.int64 for p in parts)
    assert min(len(p) for p in parts) >= min_size
    joined = np.concatenate(parts)
    assert len(joined) == n  # disjoint ...
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))  # ... and covering


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), k=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_iid_properties(n: int, k: int, seed: int) -> None:
    if n < k:
        with pytest.raises(ValueError):
            iid(n, k, seed)
        return
    parts = iid(n, k, seed)
    assert_partition(parts, n, k, 1)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid(n, k, seed), strict=True))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 500),
    k=st.integers(1, 20),
    alpha=st.floats(0.05, 100),
    min_size=st.integers(0, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantity_skew_properties(n: int, k: int, alpha: float, min_size: int, seed: int) -> None:
    if n < k * min_size:
        with pytest.raises(ValueError):
            quantity_skew(n, k, alpha, seed, min_size=min_size)
        return
    parts = quantity_skew(n, k, alpha, seed, min_size=min_size)
    assert_partition(parts, n, k, min_size)
    again = quantity_skew(n, k, alpha, seed, min_size=min_size)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=16, max_size=400),
    k=st.integers(1, 8),
    alpha=st.floats(0.1, 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_label_skew_properties(labels: list[int], k: int, alpha: float, seed: int) -> None:
    y = np.array(labels)
    min_size = 2
    parts = dirichlet_label_skew(y, k, alpha, seed, min_size=min_size)
    assert_partition(parts, len(y), k, min_size)
    again = dirichlet_label_skew(y, k, alpha, seed, min_size=min_size)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    hist = label_histogram(y, parts, 5)
    np.testing.assert_array_equal(hist.sum(axis=0), np.bincount(y, minlength=5))


def test_label_skew_is_skewed_and_alpha_controls_it() -> None:
    y = np.repeat(np.arange(4), 500)

    def mean_tv_from_global(alpha: float) -> float:
        hist = label_histogram(y, dirichlet_label_skew(y, 10, alpha, seed=3, min_size=10), 4).astype(float)
        dist = hist / hist.sum(axis=1, keepdims=True)
        return float(np.abs(dist - 0.25).sum(axis=1).mean() / 2)

    assert mean_tv_from_global(0.1) > 0.4
    assert mean_tv_from_global(1000.0) < 0.05
    assert mean_tv_from_global(0.1) > mean_tv_from_global(1.0) > mean_tv_from_global(1000.0)


def test_seed_changes_the_split() -> None:
    y = np.repeat(np.arange(3), 100)
    a = dirichlet_label_skew(y, 5, 0.5, seed=1)
    b = dirichlet_label_skew(y, 5, 0.5, seed=2)
    assert any(not np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert any(not np.array_equal(p, q) for p, q in zip(iid(300, 5, 1), iid(300, 5, 2), strict=True))


def test_impossible_min_size_and_bad_arguments_raise() -> None:
    y = np.zeros(30, dtype=np.int64)
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_label_skew(y, 4, 0.5, min_size=10)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_label_skew(y, 2, 0.0)
    with pytest.raises(ValueError, match="at least one site"):
        iid(10, 0)
    with pytest.raises(ValueError, match="1-D"):
        dirichlet_label_skew(np.zeros((4, 2)), 2)


def test_label_skew_repairs_when_draws_keep_failing() -> None:
    # one class, tiny alpha, a floor of exactly n/k: Dirichlet draws (almost) never satisfy it
    y = np.zeros(40, dtype=np.int64)
    parts = dirichlet_label_skew(y, 4, 0.01, seed=0, min_size=10, max_tries=5)
    assert_partition(parts, 40, 4, 10)
    assert [len(p) for p in parts] == [10, 10, 10, 10]
    again = dirichlet_label_skew(y, 4, 0.01, seed=0, min_size=10, max_tries=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    # the worst case hypothesis could pick stays fast
    parts = dirichlet_label_skew(np.zeros(20, dtype=np.int64), 8, 0.1, seed=1, min_size=2)
    assert_partition(parts, 20, 8, 2)

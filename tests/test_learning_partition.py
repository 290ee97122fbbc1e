from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from learning.partition import by_field, dirichlet_label_skew, field_keys, iid, label_histogram, quantity_skew


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


# ---------------------------------------------------------------------------------------------- by field
def test_by_field_keeps_large_groups_and_merges_small_ones_to_the_nearest() -> None:
    keys = [(1000, 750)] * 6 + [(2000, 1500)] * 5 + [(3000, 2000)] * 4 + [(1010, 760)] * 2 + [(2900, 2000)]
    fp = by_field(keys, min_size=4)
    assert fp.names == ["1000x750", "2000x1500", "3000x2000"]
    assert [len(p) for p in fp.parts] == [8, 5, 5]  # 1010x760 joined 1000x750, 2900x2000 joined 3000x2000
    assert fp.members[0] == [(1000, 750), (1010, 760)] and fp.members[2] == [(3000, 2000), (2900, 2000)]
    assert_partition(fp.parts, len(keys), 3, 1)
    for part, member in zip(fp.parts, fp.members, strict=True):
        assert {keys[i] for i in part} == set(member)
    # deterministic: the same keys in the same order give the same sites
    again = by_field(list(keys), min_size=4)
    assert all(np.array_equal(a, b) for a, b in zip(again.parts, fp.parts, strict=True))


def test_by_field_max_min_sites_and_non_numeric_keys() -> None:
    keys = [(1000, 750)] * 6 + [(2000, 1500)] * 5 + [(3000, 2000)] * 4
    capped = by_field(keys, min_size=4, max_sites=2, min_sites=2)
    assert capped.names == ["1000x750", "2000x1500"] and [len(p) for p in capped.parts] == [6, 9]
    promoted = by_field(keys, min_size=6, min_sites=3)  # only one group qualifies; the next two are promoted
    assert [len(p) for p in promoted.parts] == [6, 5, 4]
    hospitals = [("a",)] * 5 + [("b",)] * 5 + [("c",)] * 2 + [("d",)] * 2
    fp = by_field(hospitals, min_size=4)
    assert fp.names == ["a", "b", "other"] and [len(p) for p in fp.parts] == [5, 5, 4]
    small_rest = by_field([("a",)] * 5 + [("b",)] * 4 + [("c",)], min_size=4)
    assert small_rest.names == ["a", "b"] and [len(p) for p in small_rest.parts] == [5, 5]
    with pytest.raises(ValueError, match="cannot make 3 sites"):
        by_field([("a",), ("b",)], min_sites=3)
    with pytest.raises(ValueError, match="min_size"):
        by_field(keys, min_size=0)


def test_field_keys_reads_dotted_fields_and_names_missing_ones() -> None:
    recs = [{"meta": {"acquisition": {"pixelsX": 10, "pixelsY": 20}}}, {"meta": {"acquisition": {"pixelsX": 10}}}]
    assert field_keys(recs[:1], ["meta.acquisition.pixelsX", "meta.acquisition.pixelsY"]) == [(10, 20)]
    with pytest.raises(ValueError, match=r"ISIC_2: field 'meta\.acquisition\.pixelsY' is missing"):
        field_keys(recs, ["meta.acquisition.pixelsX", "meta.acquisition.pixelsY"], ids=["ISIC_1", "ISIC_2"])

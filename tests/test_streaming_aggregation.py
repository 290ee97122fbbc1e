"""Streaming aggregation (issue 19 item 1): memory grows with the model, not with the number of agents.

The FedAvg family reads each client's tensors once, in order, through ``aggregate_stream`` and
keeps one accumulator; the result is bit-identical to averaging the list. Strategies that need
every update at once fall back to loading them all, with the same result as ``aggregate``.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from coordinator.aggregate import WeightedMean, weighted_average, weighted_average_stream
from coordinator.strategies import ClientResult, build_strategy
from coordinator.strategies.base import ClientInfo

SHAPES = {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "fc.weight": (2, 8)}


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _reference_mean(updates: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """The list form, written out: per tensor, a float64 sum over the clients in order."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    out = {}
    for k in updates[0]:
        acc = np.zeros(updates[0][k].shape, dtype=np.float64)
        for wi, u in zip(w, updates, strict=True):
            acc += wi * u[k].astype(np.float64)
        out[k] = acc.astype(np.float32)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_mean_streams_bit_identical_to_list(seed: int) -> None:
    rng = np.random.default_rng(seed)
    updates = [_model(rng) for _ in range(17)]
    weights = [float(x) for x in rng.integers(1, 500, size=17)]
    ref = _reference_mean(updates, weights)
    for got in (weighted_average(updates, weights), weighted_average_stream(iter(updates), weights)):
        assert list(got) == list(ref)
        for k in ref:
            assert got[k].dtype == np.float32
            assert np.array_equal(got[k], ref[k]), k


def test_weighted_mean_refuses_mismatches() -> None:
    rng = np.random.default_rng(0)
    a, b = _model(rng), _model(rng)
    mean = WeightedMean([1.0, 1.0])
    mean.add(a)
    with pytest.raises(ValueError, match="different shapes"):
        mean.add({**b, "fc.weight": np.zeros((3, 8), np.float32)})
    with pytest.raises(ValueError, match="different tensor sets"):
        mean.add({k: v for k, v in b.items() if k != "conv.bias"})
    with pytest.raises(ValueError, match="1 updates added for 2 weights"):
        mean.result()
    mean.add(b)
    with pytest.raises(ValueError, match="more updates than"):
        mean.add(b)
    with pytest.raises(ValueError, match="non-negative"):
        WeightedMean([1.0, -1.0])
    with pytest.raises(ValueError, match="non-negative"):
        WeightedMean([])


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi"])
def test_count_weighted_strategies_hold_at_most_two_updates(name: str) -> None:
    """Each client's tensors are read once, in order, and dropped before the one after next is read."""
    rng = np.random.default_rng(3)
    base = _model(rng)
    models = [_model(rng) for _ in range(12)]
    infos = [ClientInfo(f"a{i:02d}", int(c)) for i, c in enumerate(rng.integers(10, 200, size=12))]
    alive: list[weakref.ref[np.ndarray]] = []
    order: list[int] = []

    def load(i: int) -> dict[str, np.ndarray]:
        gc.collect(0)  # the young generation: a full collection per load took ~1 s in a loaded test worker
        live = sum(r() is not None for r in alive)
        assert live <= 1, f"loading client {i} while {live} earlier updates are still held"
        order.append(i)
        out = {k: v.copy() for k, v in models[i].items()}  # a fresh copy, as a decode makes
        alive.append(weakref.ref(out["conv.weight"]))
        return out

    strategy = build_strategy(name)
    assert strategy.streams
    streamed, report = strategy.aggregate_stream(1, base, infos, load)
    assert order == list(range(12))
    listed, report2 = build_strategy(name).aggregate(
        1, base, [ClientResult(c.agent_id, m, c.sample_count) for c, m in zip(infos, models, strict=True)])
    assert report.details == report2.details
    for k in base:
        assert np.array_equal(streamed[k], listed[k]), k


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum"])
def test_strategies_needing_all_updates_load_them_all_with_the_same_result(name: str) -> None:
    rng = np.random.default_rng(4)
    base = _model(rng)
    models = [_model(rng) for _ in range(7)]
    infos = [ClientInfo(f"a{i}", 50 + i) for i in range(7)]
    strategy = build_strategy(name)
    assert not strategy.streams
    streamed, _ = strategy.aggregate_stream(1, base, infos, lambda i: models[i])
    listed, _ = build_strategy(name).aggregate(
        1, base, [ClientResult(c.agent_id, m, c.sample_count) for c, m in zip(infos, models, strict=True)])
    for k in base:
        assert np.array_equal(streamed[k], listed[k]), k

"""bench/_common.pool: one worker means this process (an executor that runs each call at once, as
every ``--quick`` uses), more means spawned worker processes; both hand back results and errors
through their futures the same way, so a bench's code does not care which it got."""

from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _common import InlineExecutor, default_workers, pool


def _square_or_fail(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x * x


def test_one_worker_runs_in_this_process_in_order_with_errors_in_the_future() -> None:
    calls: list[int] = []

    def record(x: int) -> int:
        calls.append(x)
        return _square_or_fail(x)

    with pool(1) as ex:
        assert isinstance(ex, InlineExecutor)
        fut = ex.submit(record, 3)
        assert fut.done() and fut.result() == 9 and calls == [3]  # ran at once, here
        bad = ex.submit(record, -2)
        assert bad.done()
        with pytest.raises(ValueError, match="negative: -2"):
            bad.result()
        assert list(ex.map(record, [1, 2, 4])) == [1, 4, 16]
    assert calls == [3, -2, 1, 2, 4]


def test_more_workers_are_spawned_processes_and_quick_runs_use_none() -> None:
    ex = pool(2)
    try:
        assert isinstance(ex, ProcessPoolExecutor)
    finally:
        ex.shutdown()
    assert default_workers(quick=True) == 1 and default_workers(quick=False) >= 1
    assert isinstance(pool(0), InlineExecutor)

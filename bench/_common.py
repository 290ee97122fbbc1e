"""Shared bench plumbing: argument parsing, result rows to ``bench/results/NAME.json``, tables."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny run for CI: checks the bench still works")
    return p


class InlineExecutor(Executor):
    """Run each submitted call at once in this process: what ``--quick`` uses instead of workers.

    A spawned worker imports torch and fedscan again (about 5 s of CPU on this machine), more than
    a quick run's whole work; ``make test`` runs every bench's ``--quick``.
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:  # type: ignore[override]
        """Call ``fn`` now; its result (or exception) is in the returned, already done future."""
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as exc:  # handed to the caller through the future, as a pool does
            fut.set_exception(exc)
        return fut


def pool(workers: int) -> Executor:
    """``workers`` spawned worker processes, or this process itself when ``workers`` is 1 or less."""
    if workers <= 1:
        return InlineExecutor()
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))


def default_workers(quick: bool) -> int:
    """One worker per core for a real run; none (this process) for ``--quick``."""
    return 1 if quick else (os.cpu_count() or 2)


_IMPORTED = time.time()


def _process_start() -> float:
    """When this process started (Linux: /proc/self/stat field 22, in clock ticks since boot)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


def _commit() -> str:
    """The checkout's commit, ``+dirty`` when tracked files other than results differ, ``unknown`` outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=root,  # results files are outputs, not code
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def standard_meta(*, quick: bool) -> dict[str, Any]:
    """What every results file names: commit, date, machine load, --quick, and what the bench process cost."""
    return {"commit": _commit(), "quick": quick,
            "load_avg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            # the whole bench process so far: what it costs `make bench`
            "process_wall_seconds": round(time.time() - _process_start(), 1)}


def write_rows(name: str, rows: list[dict[str, Any]], *, quick: bool, meta: dict[str, Any] | None = None) -> Path:
    """Write ``{"rows": [...], "meta": {...}}``; a --quick run writes NAME.quick.json (never the real figures).

    ``meta`` always names the commit, the date, the machine's load average and whether it was ``--quick``.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (f"{name}.quick.json" if quick else f"{name}.json")
    payload = {"rows": rows, "meta": {**standard_meta(quick=quick), **(meta or {})}}
    path.write_text(json.dumps(payload, indent=2))
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True)))

"""Every bench's ``--quick``, two at a time (what ``make test`` runs): ``python tools/bench_quick.py BENCH...``

Each bench writes to its own log; a line per bench says whether it passed and how long it took, and a
failed bench's log is printed. Exits 1 when any bench failed (after all have run). Two at a time
because a quick bench leaves part of a core idle (brokers, I/O); ``BENCH_JOBS`` sets how many.
Each bench runs as ``python bench/NAME.py --quick`` would, but forked from one interpreter that has
imported torch and the other libraries once (``tools/forkserver.py``; ``FEDSCAN_TEST_FORKSERVER=0``
starts plain interpreters): ~3 s of CPU saved per bench.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools import forkserver  # noqa: E402


def main(names: list[str]) -> int:
    jobs = int(os.environ.get("BENCH_JOBS", "2"))
    logs = Path(tempfile.mkdtemp(prefix="bench-quick-"))
    pending = [n for n in names if (ROOT / "bench" / f"{n}.py").exists()]
    running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    failed: list[str] = []
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            with open(logs / f"{name}.log", "wb") as fh:
                proc = subprocess.Popen([*forkserver.script_command(ROOT / "bench" / f"{name}.py"), "--quick"],
                                        cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            running[name] = (proc, time.monotonic())
        time.sleep(0.1)
        for name, (proc, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            took = time.monotonic() - started
            if proc.returncode == 0:
                print(f"== bench/{name}.py --quick: ok ({took:.0f} s)", flush=True)
            else:
                failed.append(name)
                print(f"== bench/{name}.py --quick: FAILED, exit {proc.returncode} ({took:.0f} s)", flush=True)
                print((logs / f"{name}.log").read_text(errors="replace"), flush=True)
    shutil.rmtree(logs, ignore_errors=True)
    if failed:
        print(f"failed quick benches: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

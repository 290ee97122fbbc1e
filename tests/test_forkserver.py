"""The fork server the multi-process tests start their processes through (tools/forkserver.py) behaves
like a plain interpreter where those tests look: output, exit status, argv, environment, directory,
signals (forwarded, SIGSTOP, SIGKILL of either side) and fresh random states."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools import forkserver

CHILD = r'''
import json, os, random, signal, sys, time
import numpy as np

def on_term(signum, frame):
    print("got SIGTERM", flush=True)
    sys.exit(7)

signal.signal(signal.SIGTERM, on_term)
mode = sys.argv[1]
if mode == "report":
    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": os.environ.get("FORKSERVER_PROBE"),
                      "path0": sys.path[0], "random": random.random(), "np": float(np.random.random()),
                      "pid": os.getpid()}))
    sys.stderr.write("to stderr\n")
    sys.exit(int(sys.argv[2]))
if mode == "tick":  # write a counter to a file every 20 ms until told to stop
    out = sys.argv[2]
    n = 0
    while True:
        n += 1
        with open(out + ".tmp", "w") as fh:
            fh.write(f"{os.getpid()} {n}")
        os.replace(out + ".tmp", out)
        time.sleep(0.02)
'''

pytestmark = pytest.mark.skipif(not forkserver.enabled(), reason="FEDSCAN_TEST_FORKSERVER=0")


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fork") / "child.py"
    path.write_text(CHILD)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")


def _ticks(path: Path) -> tuple[int, int]:
    pid, n = path.read_text().split()
    return int(pid), int(n)


def _wait_file(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.02)


def test_output_exit_code_argv_env_cwd_and_random_state(script: Path, tmp_path: Path) -> None:
    argv = forkserver.script_command(script)
    assert str(forkserver.CLIENT) in argv, "the fork server is not in use"
    runs = [subprocess.run([*argv, "report", "3"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                           env=dict(os.environ, FORKSERVER_PROBE=f"run-{i}")) for i in range(2)]
    reports = []
    for i, r in enumerate(runs):
        assert r.returncode == 3, r.stderr
        assert r.stderr.endswith("to stderr\n"), r.stderr
        rep = json.loads(r.stdout)
        assert rep["argv"] == [str(script), "report", "3"] and rep["cwd"] == str(tmp_path)
        assert rep["env"] == f"run-{i}" and rep["path0"] == str(script.parent)
        reports.append(rep)
    assert reports[0]["pid"] != reports[1]["pid"]
    assert reports[0]["random"] != reports[1]["random"] and reports[0]["np"] != reports[1]["np"], \
        "each child must get fresh random states, as a fresh interpreter would"


def test_module_mode_runs_like_python_dash_m(tmp_path: Path) -> None:
    r = subprocess.run([*forkserver.command("fedscan"), "nosuch-command"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    plain = subprocess.run([sys.executable, "-m", "fedscan", "nosuch-command"], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)
    assert r.returncode == plain.returncode == 2
    assert forkserver.command("fedscan", forked=False) == [sys.executable, "-m", "fedscan"]
    assert "No such command" in r.stderr and r.stderr == plain.stderr


def test_sigterm_is_forwarded_and_the_exit_code_comes_back(script: Path, tmp_path: Path) -> None:
    out = tmp_path / "ticks"
    proc = subprocess.Popen([*forkserver.script_command(script), "tick", str(out)], stdout=subprocess.PIPE)
    _wait_file(out)
    child, _ = _ticks(out)
    assert child != proc.pid
    proc.terminate()
    assert proc.wait(30) == 7
    assert proc.stdout is not None and proc.stdout.read() == b"got SIGTERM\n"
    assert not _alive(child)


def test_sigstop_reaches_the_child_and_sigcont_resumes_it(script: Path, tmp_path: Path) -> None:
    out = tmp_path / "ticks"
    proc = subprocess.Popen([*forkserver.script_command(script), "tick", str(out)])
    try:
        _wait_file(out)
        forkserver.send_signal(proc, signal.SIGSTOP)
        time.sleep(0.2)
        _, n = _ticks(out)
        time.sleep(0.5)
        assert _ticks(out)[1] == n, "a stopped child must not run"
        forkserver.send_signal(proc, signal.SIGCONT)
        time.sleep(0.5)
        assert _ticks(out)[1] > n
    finally:
        proc.kill()
        proc.wait(30)


@pytest.mark.parametrize("target", ["client", "child"])
def test_sigkill_of_either_side_ends_both(script: Path, tmp_path: Path, target: str) -> None:
    out = tmp_path / "ticks"
    proc = subprocess.Popen([*forkserver.script_command(script), "tick", str(out)])
    _wait_file(out)
    child, _ = _ticks(out)
    if target == "client":
        proc.send_signal(signal.SIGKILL)  # what a test's Popen.kill() does: the server kills the child
    else:
        forkserver.send_signal(proc, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the child outlived its client"
        time.sleep(0.02)

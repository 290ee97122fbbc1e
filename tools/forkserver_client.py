"""The client half of ``tools/forkserver.py``: stands in for one ``python -m MODULE ARGS`` process.

Usage: ``python -S forkserver_client.py SOCKET (-m MODULE | SCRIPT) ARGS...``. Standard library only (it
starts in a few milliseconds). It hands its stdio, argv, environment and directory to the fork server,
forwards the signals a test sends to the forked child, and exits as the child exits (same code, or
killed by the same signal). If this process is SIGKILLed, the server kills the child.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
import time

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _connect(path: str, timeout: float = 180.0) -> socket.socket:
    """Connect once the server listens (it binds after its imports, several seconds after it starts)."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise SystemExit(f"forkserver_client: no fork server at {path} after {timeout:.0f} s") from None
            time.sleep(0.05)


def main() -> None:
    path, argv = sys.argv[1], sys.argv[2:]
    conn = _connect(path)
    body = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    socket.send_fds(conn, [struct.pack("!I", len(body))], [0, 1, 2])
    conn.sendall(body)
    reader = conn.makefile("r")
    first = reader.readline().split()
    if first[:1] == ["nofork"]:  # the server cannot fork safely: be a plain interpreter instead
        print(f"forkserver_client: {' '.join(first[1:])}; starting a plain interpreter", file=sys.stderr)
        conn.close()
        os.execv(sys.executable, [sys.executable, *argv])
    if len(first) != 2 or first[0] != "pid":
        raise SystemExit(f"forkserver_client: the server refused the request ({first})")
    child = int(first[1])
    marker = os.path.join(os.path.dirname(path), f"{os.getpid()}.child")  # for forkserver.send_signal (SIGSTOP)
    with open(marker + ".tmp", "w") as fh:
        fh.write(str(child))
    os.rename(marker + ".tmp", marker)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    while True:
        try:
            line = reader.readline()
            break
        except InterruptedError:
            continue
    words = line.split()
    if len(words) != 2 or words[0] != "exit":
        raise SystemExit(f"forkserver_client: lost the fork server (child {child})")
    status = int(words[1])
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        for s in FORWARDED:
            signal.signal(s, signal.SIG_DFL)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        time.sleep(1)
    sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


if __name__ == "__main__":
    main()

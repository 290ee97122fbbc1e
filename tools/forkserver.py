"""A fork server for the multi-process tests and the quick benches: processes without the import bill.

Every ``fedscan coordinator`` / ``fedscan agent`` process spends ~5 s of CPU importing torch and the
project before it does anything; the multi-process tests start well over a hundred of them on a
two-core machine. Here one interpreter per pytest worker (and one for the quick benches) imports the
third-party libraries once (which ones: below), then forks a child per requested process.

What a test sees is still a process of its own: ``command()`` returns an argv that starts a small
client (``tools/forkserver_client.py``, the standard library only, started with ``-S``), which hands
its stdin/stdout/stderr, argv, environment and working directory to the server; the server forks a
child that takes those over, sets ``sys.argv``/``sys.path`` as ``python -m`` / ``python SCRIPT`` would
and runs the module or script as ``__main__``. The client forwards the signals a test sends (SIGTERM,
SIGINT, SIGHUP, SIGUSR1/2) to the child (SIGSTOP cannot be caught: tests stall a process with
``send_signal(proc, SIGSTOP)``, which signals the child itself) and ends as the child ends: the same exit code, or killed by
the same signal. SIGKILL cannot be forwarded: the server notices the client's death (its end of the
socket closes) and SIGKILLs the child at once. So ``Popen.wait()``, ``returncode``, ``terminate()``,
``send_signal(SIGKILL)`` and log files behave as with ``python -m fedscan``; what differs is the pid
(the client's) and that the child is not the test's child (no test looks at either).

Forking is only safe from a single-threaded process, and onnx/onnxruntime start a native thread on
import; so the server imports the third-party libraries a process start imports (found by one probe
interpreter that imports ``fedscan.cli`` and ``fedscan.compose``) except the onnx family, plus the
libraries our code imports on first use (scikit-learn, SciPy, MONAI; not opacus, which configures
logging on import), and not our own modules: each child imports those, and onnx, itself (~0.8 s of
CPU instead of ~5). torch is imported, never run, so no OpenMP pool exists. The server counts its
native threads before every fork; if there is more than one it answers "nofork" and the client
starts a plain interpreter instead. Python's and NumPy's global random states are reseeded in each
child, as a fresh interpreter's would be.

``FEDSCAN_TEST_FORKSERVER=0`` turns it off (plain ``python -m fedscan``); tests that need a process in
another network namespace (``ip netns exec``) start real interpreters themselves.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "forkserver_client.py"
OURS = frozenset({"protocol", "firmware", "learning", "coordinator", "edge_agent", "export", "fedscan", "bench"})
THREADED = frozenset({"onnx", "onnxruntime", "onnxscript", "onnx_ir", "float16", "fusion_utils", "onnx_model"})
"""Top-level packages that start a thread on import (onnx, onnxruntime and what they pull): never preloaded."""
ON_FIRST_USE = ("sklearn.metrics", "sklearn.linear_model", "scipy.optimize", "scipy.ndimage", "monai.data.meta_obj",
                "monai.losses.dice", "monai.metrics.meandice", "monai.networks.nets.unet", "monai.transforms")
"""Libraries our modules import inside functions (grep for them there): preloaded too."""
_server: subprocess.Popen[bytes] | None = None
_socket_path: str | None = None


def enabled() -> bool:
    return os.environ.get("FEDSCAN_TEST_FORKSERVER", "1") != "0"


def _ensure_server() -> str:
    """Start this worker's server (once); return its socket path. The clients wait for it to listen."""
    global _server, _socket_path
    if _server is None or _server.poll() is not None:
        _socket_path = os.path.join(tempfile.mkdtemp(prefix="fedscan-fork-"), "sock")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        _server = subprocess.Popen([sys.executable, str(Path(__file__)), _socket_path], env=env,
                                   stdin=subprocess.DEVNULL)
        atexit.register(_stop, _server, os.path.dirname(_socket_path))
    assert _socket_path is not None
    return _socket_path


def _stop(server: subprocess.Popen[bytes], folder: str) -> None:
    """At exit: end the server (it also ends by itself once its parent is gone) and remove its folder."""
    server.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(10)
    shutil.rmtree(folder, ignore_errors=True)


def _prefix(target: list[str], forked: bool) -> list[str]:
    """``python TARGET`` through the fork server's client when ``forked`` and enabled, else plainly."""
    if not (forked and enabled()):
        return [sys.executable, *target]
    return [sys.executable, "-S", str(CLIENT), _ensure_server(), *target]


def command(module: str = "fedscan", *, forked: bool = True) -> list[str]:
    """The argv prefix that runs ``python -m MODULE`` (append its arguments), through the fork server
    unless it is disabled or ``forked`` is False (a test that needs a plain interpreter's start)."""
    return _prefix(["-m", module], forked)


def script_command(path: Path) -> list[str]:
    """The argv prefix that runs ``python PATH`` (append its arguments), through the fork server when enabled."""
    return _prefix([str(path)], True)


def send_signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the process that does ``proc``'s work: the forked child behind a client, else ``proc``.

    The client forwards the signals it can catch; SIGSTOP cannot be caught, so a test that stalls a
    process (SIGSTOP ... SIGCONT) sends both through this. A SIGKILL sent here kills the child at once
    (the client then ends killed by SIGKILL too), rather than the child shortly after its client."""
    args = proc.args if isinstance(proc.args, list) else []
    if str(CLIENT) not in map(str, args):
        proc.send_signal(sig)
        return
    if proc.poll() is not None:  # as Popen.send_signal: nothing to signal once it has ended
        return
    marker = Path(str(args[args.index(str(CLIENT)) + 1])).parent / f"{proc.pid}.child"
    deadline = time.monotonic() + 60
    while not marker.exists():  # written as soon as the server has forked the child
        if proc.poll() is not None or time.monotonic() > deadline:
            raise ProcessLookupError(f"no forked child behind client {proc.pid}")
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
        os.kill(int(marker.read_text()), sig)


# ---- the server (run as a script) -------------------------------------------------------------------

def _recv_request(conn: socket.socket) -> tuple[dict[str, object], list[int]]:
    head, fds, _flags, _addr = socket.recv_fds(conn, 4, 3)
    if len(head) < 4:
        raise ConnectionError("short request")
    (size,) = struct.unpack("!I", head)
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("truncated request")
        body += chunk
    return json.loads(body), list(fds)


def _serve(path: str) -> tuple[socket.socket, dict[str, object], list[int], list[socket.socket]] | None:
    """Accept requests and fork; returns only in a child (its request), or None when the server should end."""
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    os.rename(path + ".tmp", path)  # clients connect once the preload is done
    listener.listen(64)
    children: dict[socket.socket, int] = {}  # client connection -> running child pid
    by_pid: dict[int, socket.socket] = {}
    while os.getppid() == parent:
        ready, _, _ = select.select([listener, *children], [], [], 0.05)
        for s in ready:
            if s is listener:
                conn, _ = listener.accept()
                try:
                    request, fds = _recv_request(conn)
                except (ConnectionError, OSError, ValueError):
                    conn.close()
                    continue
                threads = _threads()
                if threads != 1:  # a fork would copy locks held by threads that the child does not have
                    conn.sendall(f"nofork {threads} threads in the fork server\n".encode())
                    conn.close()
                    for fd in fds:
                        os.close(fd)
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    return conn, request, fds, [listener, *children]
                for fd in fds:
                    os.close(fd)
                children[conn] = pid
                by_pid[pid] = conn
                conn.sendall(f"pid {pid}\n".encode())
            elif not s.recv(64):  # the client is gone (SIGKILL, or it died): its child goes too
                pid = children.pop(s)
                s.close()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = by_pid.pop(pid, None)
            if conn is not None and conn in children:
                children.pop(conn)
                with contextlib.suppress(OSError):
                    conn.sendall(f"exit {status}\n".encode())
                conn.close()
    for pid in by_pid:  # the pytest worker is gone
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return None


def _become(conn: socket.socket, request: dict[str, object], fds: list[int], inherited: list[socket.socket]) -> None:
    """In the forked child: take over the client's stdio, environment and directory; run its target."""
    import random
    import runpy

    for s in (conn, *inherited):
        s.close()
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
        os.close(fd)
    os.chdir(str(request["cwd"]))
    env = request["env"]
    assert isinstance(env, dict)
    os.environ.clear()
    os.environ.update(env)
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    argv = request["argv"]
    assert isinstance(argv, list)
    if argv[0] == "-m":
        module = argv[1]
        sys.argv = [module, *argv[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(argv[0])
        sys.argv = [argv[0], *argv[1:]]
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _preload() -> None:
    """Import what a process start imports, but for our modules and the THREADED family, and ON_FIRST_USE."""
    import importlib

    probe = "import json, sys, fedscan.cli, fedscan.compose; print(json.dumps(list(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    try:
        names = [n for n in json.loads(run.stdout) if n.split(".")[0] not in OURS | THREADED]
    except ValueError:  # our modules do not import: each child fails as a plain process would, with its own log
        print(f"forkserver: the import probe failed, preloading less:\n{run.stderr[-2000:]}", file=sys.stderr)
        names = []
    for name in [*names, *ON_FIRST_USE]:
        try:
            importlib.import_module(name)
        except Exception:  # aliases and modules made at run time; the child imports what it needs
            continue


def main(path: str) -> None:
    sys.path[0] = os.getcwd()  # not tools/ (this script's folder); each child sets its own sys.path[0]
    _preload()
    child = _serve(path)
    if child is None:
        sys.exit(0)
    _become(*child)


if __name__ == "__main__":
    main(sys.argv[1])

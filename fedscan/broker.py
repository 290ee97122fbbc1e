"""Start an MQTT broker for the demo: a local ``mosquitto`` if installed, else the embedded pure-Python amqtt broker in a child process.

Both listen on loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fedscan.broker")

# Limits set on purpose: mosquitto's default max_queued_messages (1000) silently drops QoS-1
# messages for a slow subscriber (2,560 of 20,000 lost in our measurement); uploads are paced
# and acknowledged end to end, and the queue is large enough for a round of chunks.
MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 20000
max_inflight_messages 64
message_size_limit 16777216
"""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    """Return once something listens on 127.0.0.1:``port``; ``TimeoutError`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"broker did not listen on 127.0.0.1:{port} within {timeout}s")


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 60.0) -> None:
    """SIGTERM every process, wait for each (they exit cleanly on it), SIGKILL what is left.

    ``timeout`` is generous: on a loaded two-core box a coordinator took 20.6 s from SIGTERM to a clean
    exit (0), and the old 15 s killed it (-9), failing ``fedscan demo``.
    """
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


@dataclass
class RunningBroker:
    """A broker process this code started: its kind (mosquitto or embedded), port and process."""
    kind: str
    port: int
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        """Terminate the broker (SIGKILL if it does not exit within 5 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def local_broker(workdir: Path, *, prefer: str = "auto") -> Iterator[RunningBroker]:
    """A private broker on a free loopback port for the block: mosquitto when installed, else the embedded one."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    use_mosquitto = prefer in ("auto", "mosquitto") and shutil.which("mosquitto") is not None
    if prefer == "mosquitto" and not use_mosquitto:
        raise RuntimeError("mosquitto is not installed")
    if use_mosquitto:
        conf = workdir / "mosquitto.conf"
        conf.write_text(MOSQUITTO_CONF.format(port=port))
        cmd, kind = ["mosquitto", "-c", str(conf)], "mosquitto"
    else:
        cmd, kind = [sys.executable, "-m", "fedscan", "broker", "--port", str(port)], "embedded (amqtt)"
    with open(workdir / "broker.log", "wb") as logf:
        broker = RunningBroker(kind, port, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logf))
        try:
            wait_port(port)
            log.info("broker: %s on 127.0.0.1:%d", kind, port)
            yield broker
        finally:
            broker.stop()


def run_embedded(port: int) -> None:
    """Run the amqtt broker until interrupted (MQTT 3.1.1, loopback, anonymous)."""
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 1000}},
        "sys_interval": 0,
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def main() -> None:
        broker = Broker(config)
        await broker.start()
        try:
            await asyncio.Event().wait()
        finally:
            await broker.shutdown()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())

"""Start a private mosquitto on a free loopback port for one test (never the one on 1883)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedscan.broker import free_port, wait_port


@dataclass
class Broker:
    port: int
    conf: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def mosquitto(tmp: Path, extra_conf: str = "") -> Iterator[Broker]:
    if shutil.which("mosquitto") is None:
        import pytest

        pytest.skip("mosquitto binary not installed (apt-get install mosquitto)")
    port = free_port()
    conf = tmp / f"mosquitto-{port}.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 100000\nmax_inflight_messages 100\nmessage_size_limit 0\n" + extra_conf
    )
    broker = Broker(port, conf)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()

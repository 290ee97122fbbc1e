"""Start the shipped TLS+ACL mosquitto config (deploy/mosquitto/mosquitto-tls.conf) on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mqtt_broker import free_port, wait_port

from coordinator.acl import DEPLOY_CONF, render_broker_config


@dataclass
class TlsBroker:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def tls_mosquitto(tmp: Path, pki_dir: Path, acl_file: Path) -> Iterator[TlsBroker]:
    if shutil.which("mosquitto") is None:
        import pytest

        pytest.skip("mosquitto binary not installed")
    state = tmp / "broker-state"
    state.mkdir(exist_ok=True)
    port = free_port()
    extra = "user root\n" if os.geteuid() == 0 else ""  # as root, mosquitto would drop to `mosquitto`
    conf = tmp / "mosquitto-tls.conf"
    conf.write_text(render_broker_config(DEPLOY_CONF.read_text(), port=port, pki_dir=pki_dir, acl_file=acl_file,
                                         state_dir=state, extra=extra))
    log = tmp / "mosquitto.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_port(port, 5)
        yield TlsBroker(port, proc, log)
    finally:
        proc.kill()
        proc.wait(5)

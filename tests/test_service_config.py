"""Running as a service (issue 19 item 8): the systemd units pass ``systemd-analyze verify`` with no
complaint, and ``--config FILE`` is equivalent to the flags -- validated at start-up (typed, unknown
keys refused, errors name file, line and field; CLI exit 2), overridden by flags given on the command
line; the shipped example configs are valid."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedscan import compose
from fedscan.cli import CONFIGURABLE, app
from fedscan.config_file import load_config

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
EXAMPLES = ROOT / "deploy" / "config"


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace the processes with a recorder of the configuration they would run with."""
    seen: dict[str, Any] = {}

    def record(kind: str) -> Any:
        def run(cfg: Any, *args: Any) -> int:
            seen[kind] = cfg
            return 0
        return run

    monkeypatch.setattr(compose, "run_agent", record("agent"))
    monkeypatch.setattr(compose, "run_coordinator", record("coordinator"))
    return seen


def _squash(text: str) -> str:
    """Text without whitespace and the error panel's box drawing (the panel wraps long lines)."""
    return "".join(c for c in text if not c.isspace() and c not in "│╭╮╰╯─")


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "fedscan.yaml"
    p.write_text(text)
    return p


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed on this machine (systemd package)")
    assert {u.name for u in UNITS} == {"fedscan-agent.service", "fedscan-coordinator.service",
                                       "fedscan-broker.service"}
    # verify checks that ExecStart's program exists: put a stand-in where the install puts fedscan
    fake = tmp_path / "opt" / "fedscan" / ".venv" / "bin" / "fedscan"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    copies = []
    for unit in UNITS:
        text = unit.read_text().replace("/opt/fedscan/.venv/bin/fedscan", str(fake))
        if not Path("/usr/sbin/mosquitto").exists():
            text = text.replace("/usr/sbin/mosquitto", str(fake))
        (tmp_path / unit.name).write_text(text)
        copies.append(str(tmp_path / unit.name))
    out = subprocess.run([tool, "verify", "--man=no", *copies], capture_output=True, text=True, timeout=60)
    # verify exits 0 on ignored lines (unknown keys, bad values): any complaint about our units fails
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if str(tmp_path) in line]
    assert out.returncode == 0 and not complaints, out.stdout + out.stderr


def test_units_carry_restart_limits_and_hardening() -> None:
    for unit in UNITS:
        text = unit.read_text()
        for line in ("Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                     "ProtectHome=yes", "MemoryMax=", "TasksMax=", "StateDirectory=fedscan/", "ReadWritePaths=",
                     "SystemCallFilter=@system-service"):
            assert line in text, f"{unit.name}: {line}"
    agent = (ROOT / "deploy" / "systemd" / "fedscan-agent.service").read_text()
    assert "CPUWeight=20" in agent and "Nice=10" in agent  # training yields to clinical work
    assert "--config /etc/fedscan/agent.yaml" in agent and "RestartPreventExitStatus=2" in agent


@pytest.mark.parametrize("kind", ["agent", "coordinator"])
def test_example_configs_are_valid(kind: str) -> None:
    values = load_config(EXAMPLES / f"{kind}.yaml", CONFIGURABLE[kind])
    assert values["broker"].startswith("mqtts://") and str(values["state"]).startswith("/var/lib/fedscan/")


def test_agent_config_file_is_equivalent_to_the_flags(tmp_path: Path, captured: dict[str, Any]) -> None:
    conf = _write(tmp_path, f"id: box-7\nbroker: 127.0.0.1:1999\nstate: {tmp_path / 'st'}\nthreads: 2\n"
                            "dicom_aet: [CT1, CT2]\ntelemetry: false\nhttp_port: 8081\n")
    r = CliRunner().invoke(app, ["agent", "--config", str(conf)])
    assert r.exit_code == 0, r.output
    cfg = captured["agent"]
    assert (cfg.agent_id, cfg.broker, cfg.state_dir, cfg.threads) == ("box-7", "127.0.0.1:1999", tmp_path / "st", 2)
    assert cfg.dicom_aets == ("CT1", "CT2") and cfg.telemetry is False and cfg.http_port == 8081


def test_flags_override_the_file(tmp_path: Path, captured: dict[str, Any]) -> None:
    conf = _write(tmp_path, f"state: {tmp_path / 'c'}\nrounds: 3\nmin_clients: 4\nmode: async\nexport: false\n"
                            "downlink_codec: delta|topk:0.05|q:4|ef|zstd\n")
    r = CliRunner().invoke(app, ["coordinator", "--rounds", "7", "--config", str(conf), "--export"])
    assert r.exit_code == 0, r.output
    cfg = captured["coordinator"]
    assert cfg.rounds == 7 and cfg.export is True  # given on the command line (before or after --config)
    assert cfg.min_clients == 4 and cfg.mode == "async" and cfg.downlink_codec == "delta|topk:0.05|q:4|ef|zstd"
    r = CliRunner().invoke(app, ["agent", "--config", str(_write(tmp_path, "id: from-file\n")), "--id", "from-flag",
                                 "--state", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert captured["agent"].agent_id == "from-flag"


@pytest.mark.parametrize(("text", "expected"), [
    ("rounds: 3\n  min_clients: [\n", "fedscan.yaml:2: not valid YAML"),
    ("rounds: 3\nmin_clientz: 4\n", "fedscan.yaml:2: min_clientz: unknown setting"),
    ("rounds: 3\nmin-clients: 4\n", "fedscan.yaml:2: min-clients: unknown setting (did you mean min_clients?)"),
    ("state: /tmp/x\n\nrounds: many\n", "fedscan.yaml:3: rounds: Input should be a valid integer"),
    ("- rounds\n- 3\n", "a config file must be a mapping"),
])
def test_bad_config_files_are_refused_naming_file_line_and_field(tmp_path: Path, captured: dict[str, Any],
                                                                  text: str, expected: str) -> None:
    r = CliRunner().invoke(app, ["coordinator", "--config", str(_write(tmp_path, text))])
    assert r.exit_code == 2, r.output
    assert _squash(expected) in _squash(r.output), r.output
    assert "coordinator" not in captured  # refused before anything starts


def test_missing_config_file_is_refused(tmp_path: Path, captured: dict[str, Any]) -> None:
    r = CliRunner().invoke(app, ["agent", "--config", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "cannot read" in r.output and "agent" not in captured

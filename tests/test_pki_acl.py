"""PKI (coordinator.pki + deploy/pki/fedscan-pki) and ACL generation (coordinator.acl), no broker."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from coordinator.acl import AGENT_READS, AGENT_WRITES, DEPLOY_CONF, FLEET_KINDS, generate_acl, render_broker_config
from coordinator.pki import FleetPKI, PKIError, common_name, fingerprint
from protocol.topics import Kind

CLI = Path(__file__).resolve().parent.parent / "deploy" / "pki" / "fedscan-pki"


def test_ca_device_server_certificates(tmp_path: Path) -> None:
    pki = FleetPKI.init(tmp_path / "pki", "lab")
    dev = pki.issue_device("cxr-01")
    srv = pki.issue_server("broker", hosts=["127.0.0.1", "localhost"])
    ca = x509.load_pem_x509_certificate(pki.ca_path.read_bytes())
    cert = x509.load_pem_x509_certificate(dev.cert.read_bytes())
    assert common_name(cert) == "cxr-01"
    cert.verify_directly_issued_by(ca)
    assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    s = x509.load_pem_x509_certificate(srv.cert.read_bytes())
    san = s.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    for key in (dev.key, srv.key, pki.root / "ca.key"):
        assert key.stat().st_mode & 0o777 == 0o600
    assert pki.get("cxr-01").fingerprint == fingerprint(dev.cert)


def test_duplicates_reserved_names_revocation_and_reopen(tmp_path: Path) -> None:
    pki = FleetPKI.init(tmp_path / "pki", "lab")
    with pytest.raises(PKIError, match="already holds"):
        FleetPKI.init(tmp_path / "pki", "lab")
    first = fingerprint(pki.issue_device("a1").cert)
    with pytest.raises(PKIError, match="already has a valid certificate"):
        pki.issue_device("a1")
    with pytest.raises(PKIError, match="reserved"):
        pki.issue_device("coordinator")
    with pytest.raises(Exception, match="illegal"):
        pki.issue_device("a/#")
    old_cert = pki.paths("a1").cert.read_bytes()
    pki.issue_device("a1", replace=True)  # replacing revokes the old serial
    (tmp_path / "old.crt").write_bytes(old_cert)
    assert pki.is_revoked(tmp_path / "old.crt")
    assert not pki.is_revoked(pki.paths("a1").cert)
    assert fingerprint(pki.paths("a1").cert) != first
    reopened = FleetPKI(tmp_path / "pki")
    reopened.revoke("a1")
    assert reopened.is_revoked(pki.paths("a1").cert)
    with pytest.raises(PKIError, match="no valid certificate"):
        reopened.revoke("a1")
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(PKIError, match="expire before"):
        pki.issue_device("a2", not_before=now, not_after=now - dt.timedelta(days=1))


def test_cli_round_trip(tmp_path: Path) -> None:
    d = str(tmp_path / "pki")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(CLI), "--dir", d, *args], capture_output=True, text=True,
                              timeout=30)

    assert run("init", "--fleet", "lab").returncode == 0
    assert run("device", "cxr-01").returncode == 0
    dup = run("device", "cxr-01")
    assert dup.returncode == 2 and "already has a valid certificate" in dup.stderr
    assert run("server", "--host", "10.0.0.2").returncode == 0
    assert run("revoke", "cxr-01").returncode == 0
    listed = {i["name"]: i for i in json.loads(run("list").stdout)}
    assert listed["cxr-01"]["revoked"] and not listed["broker"]["revoked"]
    assert FleetPKI(Path(d)).is_revoked(Path(d) / "issued" / "cxr-01.crt")


def test_acl_per_agent_blocks() -> None:
    text = generate_acl("lab", ["a2", "a1"], observers=["auditor"])
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in text.split("\n\n") if b.startswith("user ")}
    assert set(blocks) == {"user coordinator", "user auditor", "user a1", "user a2"}
    assert blocks["user coordinator"] == ["topic readwrite fedscan/v1/lab/#"]
    assert blocks["user auditor"] == ["topic read fedscan/v1/lab/#"]
    a1 = blocks["user a1"]
    p = "fedscan/v1/lab"
    assert sorted(a1) == sorted([
        f"topic write {p}/agents/a1/status", f"topic write {p}/agents/a1/telemetry",
        f"topic write {p}/agents/a1/shadow/reported", f"topic write {p}/agents/a1/updates/#",
        f"topic write {p}/agents/a1/models/request", f"topic write {p}/agents/a1/events",
        f"topic read {p}/agents/a1/tasks", f"topic read {p}/agents/a1/acks",
        f"topic read {p}/agents/a1/shadow/desired", f"topic read {p}/agents/a1/downloads",
        f"topic read {p}/models/#",
        f"topic read {p}/coordinator/status",
    ])
    # nothing outside user blocks: no `pattern` lines that would apply to unenrolled CNs
    assert not any(ln.startswith(("pattern", "topic")) for ln in text.split("\nuser ")[0].splitlines())
    with pytest.raises(ValueError, match="collides"):
        generate_acl("lab", ["coordinator"])
    with pytest.raises(Exception, match="illegal"):
        generate_acl("lab", ["a+"])


def test_render_broker_config_only_moves_paths_and_port(tmp_path: Path) -> None:
    tpl = DEPLOY_CONF.read_text()
    out = render_broker_config(tpl, port=18999, pki_dir=tmp_path / "pki", acl_file=tmp_path / "acl",
                               state_dir=tmp_path / "state")
    settings = "\n".join(ln for ln in out.splitlines() if not ln.startswith("#"))
    assert "listener 18999 127.0.0.1" in settings
    assert "/etc/fedscan" not in settings and "/var/lib/fedscan" not in settings
    keep = [ln for ln in tpl.splitlines() if ln and not ln.startswith(("#", "listener")) and "/" not in ln]
    assert all(ln in out.splitlines() for ln in keep)
    with pytest.raises(ValueError, match="listener"):
        render_broker_config("port 1\n", port=1, pki_dir=tmp_path, acl_file=tmp_path, state_dir=tmp_path)


def test_every_topic_kind_has_an_acl_decision() -> None:
    """A topic kind added to protocol.topics must be classified here, or agents lose (or gain) access."""
    for kind in Kind:
        owners = [kind in AGENT_WRITES, kind in AGENT_READS, kind in FLEET_KINDS]
        assert sum(owners) == 1, kind

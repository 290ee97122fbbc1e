"""Fleet PKI: one CA per fleet, one certificate per device, coordinator and broker; CRL.

Used by ``deploy/pki/fedscan-pki`` (the operator CLI) and by tests. Layout of a PKI folder::

    ca.crt  ca.key        fleet CA (self-signed, pathlen 0)
    crl.pem               certificate revocation list, signed by the CA (always present:
                          mosquitto's ``crlfile`` needs one even when nothing is revoked)
    index.json            every certificate issued: name, serial, kind, fingerprint, revoked
    issued/{name}.crt     leaf certificates, ``issued/{name}.key`` their keys

Keys are ECDSA P-256 (fast to make on an edge box, supported by OpenSSL/mosquitto and Python
``ssl``) and written with mode 0600; the folder itself is 0700. A device certificate's subject
CN is the agent id, which is also its MQTT client id and, with mosquitto's
``use_identity_as_username`` + ``use_username_as_clientid``, its broker user name: that is
what ties a TLS identity to the agent's own topic subtree in the ACL.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.errors import FedscanError, Reason
from protocol.identifiers import validate_id

Kind = Literal["device", "coordinator", "server", "admin"]
COORDINATOR_CN = "coordinator"
CRL_DAYS = 30


class PKIError(FedscanError):
    """A PKI operation was refused (unknown name, duplicate, not initialised ...)."""

    reason = Reason.PKI_ERROR


@dataclass(frozen=True)
class Issued:
    """One certificate the fleet CA has issued."""

    name: str
    kind: str
    serial: int
    fingerprint: str  # sha256 of the DER certificate, lower-case hex
    not_after: str  # ISO 8601
    revoked: bool = False
    revoked_at: str | None = None


@dataclass(frozen=True)
class CertPaths:
    """Where one issued certificate, its key and the CA certificate lie."""

    cert: Path
    key: Path
    ca: Path


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret with mode 0600 from the start (no window where it is world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def fingerprint(cert: x509.Certificate | Path) -> str:
    """SHA-256 fingerprint (hex) of a certificate, as stored in the registry's ``cert_fingerprint``."""
    if isinstance(cert, Path):
        cert = x509.load_pem_x509_certificate(cert.read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()


def common_name(cert: x509.Certificate | Path) -> str:
    """The common name of a certificate (or of the certificate file at ``cert``)."""
    if isinstance(cert, Path):
        cert = x509.load_pem_x509_certificate(cert.read_bytes())
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        raise PKIError("certificate has no CN")
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode()


class FleetPKI:
    """A fleet CA on disk. ``FleetPKI.init(root, fleet)`` creates one; ``FleetPKI(root)`` opens it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not (self.root / "ca.crt").exists() or not (self.root / "ca.key").exists():
            raise PKIError(f"no fleet CA in {self.root} (run `fedscan-pki init` first)")
        self.ca_cert = x509.load_pem_x509_certificate((self.root / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((self.root / "ca.key").read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PKIError("fleet CA key is not an EC key")
        self._ca_key = key

    # -- paths ----------------------------------------------------------------------------
    @property
    def ca_path(self) -> Path:
        """The CA certificate file."""
        return self.root / "ca.crt"

    @property
    def crl_path(self) -> Path:
        """The certificate revocation list file."""
        return self.root / "crl.pem"

    def paths(self, name: str) -> CertPaths:
        """The files of the certificate issued to ``name``."""
        return CertPaths(self.root / "issued" / f"{name}.crt", self.root / "issued" / f"{name}.key", self.ca_path)

    # -- creation -----------------------------------------------------------------------------
    @classmethod
    def init(cls, root: Path, fleet: str, *, days: int = 3650) -> FleetPKI:
        """Create a new fleet CA under ``root``."""
        validate_id(fleet, "fleet")
        root = Path(root)
        if (root / "ca.key").exists():
            raise PKIError(f"{root} already holds a fleet CA; refusing to overwrite it")
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedscan"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"fedscan fleet CA {fleet}"),
            ]
        )
        now = _utcnow()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(root / "ca.key", _key_pem(key))
        _write_public(root / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
        (root / "issued").mkdir(exist_ok=True)
        _write_public(root / "index.json", json.dumps({"fleet": fleet, "issued": []}, indent=1).encode())
        pki = cls(root)
        pki.write_crl()
        return pki

    # -- index ----------------------------------------------------------------------------------
    def _load_index(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.root / "index.json").read_text())
        return data

    def issued(self) -> list[Issued]:
        """Every certificate issued so far."""
        raw = self._load_index()["issued"]
        assert isinstance(raw, list)
        return [Issued(**item) for item in raw]

    def _save_issued(self, items: Sequence[Issued]) -> None:
        data = self._load_index()
        data["issued"] = [asdict(i) for i in items]
        _write_public(self.root / "index.json", json.dumps(data, indent=1).encode())

    @property
    def fleet(self) -> str:
        """The fleet this CA serves."""
        return str(self._load_index()["fleet"])

    def get(self, name: str) -> Issued:
        """The valid (not revoked) certificate issued to ``name``; PKIError if none."""
        for item in self.issued():
            if item.name == name and not item.revoked:
                return item
        raise PKIError(f"no valid certificate issued to {name!r}")

    # -- issuing ----------------------------------------------------------------------------------
    def issue(
        self,
        name: str,
        kind: Kind,
        *,
        hosts: Sequence[str] = (),
        days: int = 825,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        replace: bool = False,
    ) -> CertPaths:
        """Issue a key + certificate with CN ``name``.

        ``kind``: ``device`` (client auth; ``name`` must be a legal agent id and not the
        coordinator's CN), ``coordinator``/``admin`` (client auth), ``server`` (server auth with
        ``hosts`` as DNS/IP SANs; the broker). ``not_before``/``not_after`` override the validity
        window (tests make expired certificates with them). A name that already holds a valid
        certificate is refused unless ``replace`` (which revokes the old one).
        """
        validate_id(name, "certificate name")
        if kind == "device" and name == COORDINATOR_CN:
            raise PKIError(f"{COORDINATOR_CN!r} is reserved for the coordinator")
        existing = [i for i in self.issued() if i.name == name and not i.revoked]
        if existing and not replace:
            raise PKIError(f"{name!r} already has a valid certificate (serial {existing[0].serial}); "
                           "revoke it or pass replace=True")
        if existing:
            self.revoke(name)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _utcnow()
        start = not_before or now - dt.timedelta(minutes=5)
        end = not_after or now + dt.timedelta(days=days)
        if end <= start:
            raise PKIError("certificate would expire before it starts")
        serial = x509.random_serial_number()
        eku = [ExtendedKeyUsageOID.SERVER_AUTH] if kind == "server" else [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedscan"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"{self.fleet}/{kind}"),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()), critical=False
            )
        )
        if kind == "server":
            if not hosts:
                raise PKIError("a server certificate needs at least one host (DNS name or IP)")
            sans: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    sans.append(x509.DNSName(h))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        paths = self.paths(name)
        _write_private(paths.key, _key_pem(key))
        _write_public(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
        self._save_issued([*self.issued(), Issued(name, kind, serial, fingerprint(cert), end.isoformat())])
        return paths

    def issue_device(self, agent_id: str, **kw: object) -> CertPaths:
        """Issue an agent's client certificate (CN = agent id)."""
        return self.issue(agent_id, "device", **kw)  # type: ignore[arg-type]

    def issue_coordinator(self, name: str = COORDINATOR_CN, **kw: object) -> CertPaths:
        """Issue the coordinator's client certificate."""
        return self.issue(name, "coordinator", **kw)  # type: ignore[arg-type]

    def issue_server(self, name: str = "broker", hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                     **kw: object) -> CertPaths:
        """Issue the broker's server certificate for ``hosts``."""
        return self.issue(name, "server", hosts=hosts, **kw)  # type: ignore[arg-type]

    # -- revocation -----------------------------------------------------------------------------
    def revoke(self, name: str) -> Path:
        """Revoke every valid certificate of ``name`` and rewrite the CRL; return its path.

        The broker reads the CRL at start (and on SIGHUP, see ``deploy/mosquitto``).
        """
        items = self.issued()
        hit = False
        now = _utcnow().isoformat()
        out: list[Issued] = []
        for i in items:
            if i.name == name and not i.revoked:
                i = Issued(i.name, i.kind, i.serial, i.fingerprint, i.not_after, True, now)
                hit = True
            out.append(i)
        if not hit:
            raise PKIError(f"no valid certificate issued to {name!r}")
        self._save_issued(out)
        return self.write_crl()

    def write_crl(self, *, days: int = CRL_DAYS) -> Path:
        """(Re)write ``crl.pem`` listing every revoked serial, valid for ``days``.

        Re-run before ``next_update`` passes (e.g. from a daily timer): an expired CRL makes
        OpenSSL refuse *every* client.
        """
        now = _utcnow()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=days))
        )
        for i in self.issued() if (self.root / "index.json").exists() else []:
            if i.revoked:
                when = dt.datetime.fromisoformat(i.revoked_at) if i.revoked_at else now
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(i.serial).revocation_date(when).build()
                )
        crl = builder.sign(self._ca_key, hashes.SHA256())
        _write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_path

    def is_revoked(self, cert_path: Path) -> bool:
        """Whether the certificate at ``cert_path`` is on the CRL."""
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None

"""Ed25519 signatures over model manifests, the agents' trust store, and key rotation.

A signature covers ``Manifest.canonical_bytes()`` (every field except ``signature``), so any
change to any other field — weights hash, metrics, targets — breaks it. A key is named by its
*key id*: the first 16 hex digits of SHA-256 over the raw 32-byte public key.

Key rotation: the holder of a trusted key announces a new public key in a
:class:`KeyAnnouncement` signed by the old key (optionally retiring keys at the same time). A
:class:`TrustStore` accepts an announcement only when its signer is currently trusted; a retired
key is never trusted again, not even when re-announced.

Refusal reasons (:class:`SignatureError`): ``unsigned``, ``unknown_key``, ``bad_signature``,
``retired_key``, ``wrong_target``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from protocol.errors import ManifestError, Reason
from protocol.manifest import Manifest, Signature
from protocol.messages import RollbackOrder, dumps_canonical

SIGNATURE_REASONS: tuple[Reason, ...] = (
    Reason.UNSIGNED, Reason.UNKNOWN_KEY, Reason.BAD_SIGNATURE, Reason.RETIRED_KEY, Reason.WRONG_TARGET,
)
_ANNOUNCE_DOMAIN = b"fedscan/v1/key-announcement\x00"


class SignatureError(ManifestError):
    """A manifest (or key announcement) whose signature does not establish trust."""

    reason = Reason.BAD_SIGNATURE


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise SignatureError(f"{what} is not base64", reason=Reason.BAD_SIGNATURE) from exc


def raw_public(key: Ed25519PublicKey) -> bytes:
    """The raw 32 bytes of an Ed25519 public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(public: Ed25519PublicKey | bytes) -> str:
    """The key id: first 16 hex digits of SHA-256 over the raw public key."""
    raw = public if isinstance(public, bytes) else raw_public(public)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public(raw: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from its raw 32 bytes; ``bad_signature`` otherwise."""
    if len(raw) != 32:
        raise SignatureError(f"an Ed25519 public key has 32 bytes, got {len(raw)}", reason=Reason.BAD_SIGNATURE)
    return Ed25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True)
class SigningKey:
    """A private Ed25519 key with its id."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        """A new random signing key."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def public(self) -> Ed25519PublicKey:
        """The public half."""
        return self.private.public_key()

    @property
    def public_raw(self) -> bytes:
        """The public half, raw 32 bytes."""
        return raw_public(self.public)

    @property
    def key_id(self) -> str:
        """This key's id."""
        return key_id_of(self.public_raw)

    def sign_bytes(self, data: bytes) -> bytes:
        """Sign arbitrary bytes (callers add their own domain tag)."""
        return self.private.sign(data)

    def sign_rollback(self, order: RollbackOrder) -> RollbackOrder:
        """A copy of ``order`` signed by this key."""
        unsigned = order.model_copy(update={"key_id": self.key_id, "signature": ""})
        return unsigned.model_copy(update={"signature": _b64(self.sign_bytes(unsigned.signed_bytes()))})

    def sign_manifest(self, manifest: Manifest) -> Manifest:
        """A copy of ``manifest`` carrying this key's signature over its canonical bytes."""
        value = _b64(self.sign_bytes(manifest.canonical_bytes()))
        return manifest.model_copy(update={"signature": Signature(key_id=self.key_id, value=value)})

    def to_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (written with 0600 permissions by callers)."""
        return self.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        """Load a private key from PEM; ``bad_signature`` if it is not Ed25519."""
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise SignatureError("signing key file does not hold an Ed25519 key", reason=Reason.BAD_SIGNATURE)
        return cls(key)

    def save(self, path: Path) -> None:
        """Write the private key (mode 0600, atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(self.to_pem())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """Load a private key from a PEM file."""
        return cls.from_pem(path.read_bytes())


class KeyAnnouncement(BaseModel):
    """A new trusted public key, signed by a key the receiver already trusts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int = 1
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    public_key: str  # base64 of the raw 32 bytes
    retires: list[str] = []  # key ids that stop being trusted when this is accepted
    signed_by: str = Field(pattern=r"^[0-9a-f]{16}$")
    signature: str  # base64

    def signed_bytes(self) -> bytes:
        """The bytes its signature covers: a domain tag and every field but the signature."""
        body = self.model_dump(mode="json", exclude={"signature"})
        return _ANNOUNCE_DOMAIN + dumps_canonical(body)

    @classmethod
    def create(cls, new_public: bytes, signer: SigningKey, retires: list[str] | None = None) -> KeyAnnouncement:
        """Announce ``new_public`` (optionally retiring keys), signed by ``signer``."""
        unsigned = cls(key_id=key_id_of(new_public), public_key=_b64(new_public), retires=list(retires or []),
                       signed_by=signer.key_id, signature="")
        return unsigned.model_copy(update={"signature": _b64(signer.sign_bytes(unsigned.signed_bytes()))})


@dataclass
class TrustStore:
    """Public keys an agent (or the coordinator) trusts, by key id, and keys it retired."""

    keys: dict[str, bytes] = field(default_factory=dict)
    retired: set[str] = field(default_factory=set)

    # -- management -------------------------------------------------------------------------------
    def trust(self, public_raw: bytes) -> str:
        """Trust a key directly (provisioning). A retired key is refused."""
        kid = key_id_of(load_public(public_raw))
        if kid in self.retired:
            raise SignatureError(f"key {kid} was retired and cannot be trusted again", reason=Reason.RETIRED_KEY)
        self.keys[kid] = public_raw
        return kid

    def retire(self, key_id: str) -> None:
        """Stop trusting ``key_id`` for good."""
        self.keys.pop(key_id, None)
        self.retired.add(key_id)

    def is_trusted(self, key_id: str) -> bool:
        """Whether ``key_id`` is trusted now (known and not retired)."""
        return key_id in self.keys and key_id not in self.retired

    def _public(self, key_id: str) -> Ed25519PublicKey:
        if key_id in self.retired:
            raise SignatureError(f"signed by retired key {key_id}", reason=Reason.RETIRED_KEY)
        raw = self.keys.get(key_id)
        if raw is None:
            raise SignatureError(f"signed by unknown key {key_id}", reason=Reason.UNKNOWN_KEY)
        return load_public(raw)

    def accept(self, ann: KeyAnnouncement) -> str:
        """Verify and apply a key announcement; return the new key id. Trust is unchanged on refusal."""
        signer = self._public(ann.signed_by)
        try:
            signer.verify(_unb64(ann.signature, "announcement signature"), ann.signed_bytes())
        except InvalidSignature as exc:
            raise SignatureError(f"key announcement for {ann.key_id}: signature does not verify",
                                 reason=Reason.BAD_SIGNATURE) from exc
        raw = _unb64(ann.public_key, "announced public key")
        if key_id_of(load_public(raw)) != ann.key_id:
            raise SignatureError("announced key id does not match the announced key", reason=Reason.BAD_SIGNATURE)
        if ann.key_id in self.retired:
            raise SignatureError(f"key {ann.key_id} was retired and cannot be trusted again", reason=Reason.RETIRED_KEY)
        if ann.key_id in ann.retires:
            raise SignatureError("an announcement cannot retire the key it announces", reason=Reason.BAD_SIGNATURE)
        self.keys[ann.key_id] = raw
        for kid in ann.retires:
            self.retire(kid)
        return ann.key_id

    # -- verification -----------------------------------------------------------------------------
    def verify_manifest(self, manifest: Manifest, *, profile: str | None = None) -> str:
        """Return the signer's key id, or raise :class:`SignatureError` with a reason."""
        sig = manifest.signature
        if sig is None:
            raise SignatureError(f"model {manifest.version} is unsigned", reason=Reason.UNSIGNED)
        public = self._public(sig.key_id)
        try:
            public.verify(_unb64(sig.value, "signature"), manifest.canonical_bytes())
        except InvalidSignature as exc:
            raise SignatureError(f"model {manifest.version}: signature by {sig.key_id} does not verify",
                                 reason=Reason.BAD_SIGNATURE) from exc
        if manifest.targets is not None and profile is not None and profile not in manifest.targets:
            raise SignatureError(f"model {manifest.version} targets {manifest.targets}, this box is {profile!r}",
                                 reason=Reason.WRONG_TARGET)
        return sig.key_id

    def verify_rollback(self, order: RollbackOrder) -> str:
        """Return the signer's key id of a rollback order, or raise :class:`SignatureError`."""
        if not order.signature:
            raise SignatureError(f"rollback to {order.to_version} is unsigned", reason=Reason.UNSIGNED)
        try:
            self._public(order.key_id).verify(_unb64(order.signature, "signature"), order.signed_bytes())
        except InvalidSignature as exc:
            raise SignatureError(f"rollback to {order.to_version}: signature by {order.key_id} does not verify",
                                 reason=Reason.BAD_SIGNATURE) from exc
        return order.key_id

    # -- persistence ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The store as JSON-able data."""
        return {"v": 1, "keys": {k: _b64(v) for k, v in sorted(self.keys.items())}, "retired": sorted(self.retired)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrustStore:
        """A store from :meth:`to_json` data; ``bad_trust_store`` if malformed."""
        if not isinstance(data, dict) or data.get("v") != 1:
            raise SignatureError("trust store: unsupported format", reason=Reason.BAD_TRUST_STORE)
        store = cls(retired=set(data.get("retired", [])))
        for kid, b64 in data.get("keys", {}).items():
            raw = _unb64(b64, f"trusted key {kid}")
            if key_id_of(load_public(raw)) != kid:
                raise SignatureError(f"trust store: key id {kid} does not match its key", reason=Reason.BAD_TRUST_STORE)
            if kid not in store.retired:
                store.keys[kid] = raw
        return store

    def save(self, path: Path) -> None:
        """Write the store atomically to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> TrustStore:
        """Read a store from ``path``; ``bad_trust_store`` if unreadable."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SignatureError(f"cannot read trust store {path}: {exc}", reason=Reason.BAD_TRUST_STORE) from exc
        return cls.from_json(data)
